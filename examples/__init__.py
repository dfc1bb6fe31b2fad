"""Runnable example services built on the shared contracts in ``contracts/``.

``python -m examples.signup.all_in_one`` and ``python -m examples.orders.all_in_one``
run a whole story in one process on the embedded ``memory://`` broker; every
service module also runs alone against RabbitMQ with ``banyan run <module>:bus``.
"""
