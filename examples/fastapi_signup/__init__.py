"""A FastAPI service that publishes through banyan_bus (``app.py``)."""
