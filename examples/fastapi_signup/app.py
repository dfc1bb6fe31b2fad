"""signup-api: an HTTP front door that turns a sign-up into a ``UserCreated`` event.

The bus starts and stops with the app (``bus_lifespan``); endpoints get the
running bus through the ``Bus`` dependency. ``/readyz`` answers from
``bus.health()``, so a load balancer stops sending sign-ups while the broker
connection is down. The email, analytics and notification services of
``examples/signup`` handle what it publishes.

Run it (``pip install 'banyan-bus[fastapi]' uvicorn``)::

    BANYAN_URL=amqp://guest:guest@localhost/ uvicorn examples.fastapi_signup.app:app
    curl -X POST localhost:8000/users -H 'content-type: application/json' \\
        -d '{"email": "ada@example.com", "name": "Ada"}'
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from banyan_bus import MessageBus
from banyan_bus.fastapi import Bus, bus_lifespan
from contracts.users import UserCreated

SERVICE = "signup-api"


class SignUp(BaseModel):
    email: str = Field(pattern=r"^[^@\s]+@[^@\s]+$")
    name: str = Field(min_length=1, max_length=200)


class SignedUp(BaseModel):
    user_id: str
    event_id: str


def create_app(url: str | None = None) -> FastAPI:
    """The app and its bus (``url`` defaults to ``BANYAN_URL``, else ``memory://``)."""
    bus = MessageBus(SERVICE, url)
    app = FastAPI(title="signup-api", lifespan=bus_lifespan(bus))

    @app.post("/users", status_code=202)
    async def sign_up(body: SignUp, bus: Bus) -> SignedUp:
        user_id = f"usr_{uuid.uuid4().hex[:12]}"
        event = UserCreated(
            user_id=user_id, email=body.email, name=body.name, created_at=datetime.now(UTC)
        )
        # Returns once the broker has the event on every subscribed group's queue.
        event_id = await bus.publish(event)
        return SignedUp(user_id=user_id, event_id=event_id)

    @app.get("/readyz")
    async def ready(bus: Bus) -> JSONResponse:
        report = await bus.health()
        return JSONResponse(report.to_dict(), status_code=200 if report.ready else 503)

    return app


app = create_app()
