"""The FastAPI helper through HTTP: examples/fastapi_signup driven with httpx's ASGI transport.

The app's lifespan (``bus_lifespan``) starts its bus; ``POST /users`` publishes
``UserCreated`` through the ``Bus`` dependency; another service on the same broker
handles it. Runs on memory:// and RabbitMQ.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx

from banyan_bus import MessageBus
from contracts.users import UserCreated
from examples.fastapi_signup.app import SERVICE, create_app
from tests.support import wait_until


async def test_a_sign_up_over_http_is_published_and_handled(
    bus_url: str, unique: Callable[[str], str]
) -> None:
    app = create_app(bus_url)
    welcomed: list[tuple[str, str]] = []

    async def welcome(event: UserCreated) -> None:
        welcomed.append((event.user_id, event.email))

    mailer = MessageBus(unique("welcome-mailer"), bus_url)
    await mailer.subscribe(UserCreated, welcome)
    async with mailer, app.router.lifespan_context(app):
        bus = app.state.banyan_bus
        assert bus.started
        assert bus.service == SERVICE
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://signup") as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["ready"] is True
            response = await client.post("/users", json={"email": "ada@example.com", "name": "Ada"})
            assert response.status_code == 202, response.text
            body = response.json()
            assert body["event_id"].startswith("evt_")
            refused = await client.post("/users", json={"email": "not-an-email", "name": "X"})
            assert refused.status_code == 422
        await wait_until(lambda: bool(welcomed), timeout=10, what="the welcome handler")
    assert welcomed == [(body["user_id"], "ada@example.com")]
    assert not bus.started  # stopped with the app


async def test_an_endpoint_gets_503_while_the_bus_is_not_running(memory_url: str) -> None:
    app = create_app(memory_url)
    app.state.banyan_bus = MessageBus(SERVICE, memory_url)  # as the lifespan leaves it, unstarted
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://signup") as client:
        response = await client.post("/users", json={"email": "ada@example.com", "name": "Ada"})
    assert response.status_code == 503
    assert "not running" in response.text
