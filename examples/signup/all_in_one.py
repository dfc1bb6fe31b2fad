"""The whole signup story in one process, on the embedded ``memory://`` broker.

    python -m examples.signup.all_in_one

Four services, four buses, one in-process broker: exactly the topology they
would use on RabbitMQ, so what you see here is what a deployment does.
"""

from __future__ import annotations

import asyncio
import sys

from banyan_bus import MessageBus, RemoteHandlerError
from contracts.users import CreateUser, UserView
from examples.demo import configure_demo_logging, demo_url, line, settle
from examples.signup import analytics_service, email_service, notification_service, user_service

SIGNUPS = [
    CreateUser(email="alice@example.com", name="Alice"),
    CreateUser(email="bob@example.com", name="Bob", role="admin"),
    CreateUser(email="carol@example.com", name="Carol"),
]


async def main() -> int:
    configure_demo_logging()
    url = demo_url("signup")  # in-process, whatever BANYAN_URL says (and it says so)
    services = [
        m.create_bus(url)
        for m in (user_service, email_service, analytics_service, notification_service)
    ]
    client = MessageBus("signup-web", url)
    for bus in [*services, client]:
        await bus.start()
    try:
        for command in SIGNUPS:
            user = await client.send(command, timeout=5)
            assert isinstance(user, UserView)
            print(line("signup-web", "CreateUser answered", user_id=user.user_id, name=user.name))
        try:
            await client.send(SIGNUPS[0], timeout=5)
        except RemoteHandlerError as exc:
            print(line("signup-web", "CreateUser refused", error=exc))
        await settle(services)
    finally:
        for bus in [client, *services]:
            await bus.stop()
    print(line("demo", "done", users=len(SIGNUPS)))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
