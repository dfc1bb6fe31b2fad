"""user-service: owns the ``CreateUser`` command and announces ``UserCreated``.

Run alone against RabbitMQ::

    BANYAN_URL=amqp://guest:guest@localhost/ banyan run examples.signup.user_service:bus
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Protocol

from dishka import Provider, Scope, provide

from banyan_bus import CommandHandler, Logger, MessageBus, QueryHandler
from contracts.users import CreateUser, GetUser, UserCreated, UserView

SERVICE = "user-service"


class EmailTaken(Exception):
    """The email address is registered already (the caller gets a RemoteHandlerError)."""


class UserRepository(Protocol):
    """Where users live. The handler depends on this, not on a database."""

    async def add(self, user: UserView) -> None: ...

    async def get(self, user_id: str) -> UserView | None: ...

    async def find_by_email(self, email: str) -> UserView | None: ...


class InMemoryUserRepository:
    """A stand-in for the real database, good for examples and tests."""

    def __init__(self) -> None:
        self._users: dict[str, UserView] = {}

    async def add(self, user: UserView) -> None:
        self._users[user.user_id] = user

    async def get(self, user_id: str) -> UserView | None:
        return self._users.get(user_id)

    async def find_by_email(self, email: str) -> UserView | None:
        return next((u for u in self._users.values() if u.email == email), None)


class UsersProvider(Provider):
    # One repository for the service's lifetime (a connection pool in real life).
    repository = provide(InMemoryUserRepository, provides=UserRepository, scope=Scope.APP)


@CommandHandler(CreateUser)
class CreateUserHandler:
    """Store the user, then tell everyone: the other services react to ``UserCreated``."""

    def __init__(self, users: UserRepository, bus: MessageBus, log: Logger) -> None:
        self.users = users
        self.bus = bus
        self.log = log

    async def handle(self, command: CreateUser) -> UserView:
        if await self.users.find_by_email(command.email) is not None:
            raise EmailTaken(f"{command.email} is already registered")
        user = UserView(
            user_id=f"usr_{uuid.uuid4().hex[:12]}",
            email=command.email,
            name=command.name,
            role=command.role,
        )
        await self.users.add(user)
        await self.bus.publish(
            UserCreated(
                user_id=user.user_id,
                email=user.email,
                name=user.name,
                role=user.role,
                created_at=datetime.now(UTC),
            )
        )
        self.log.info("user_created", user_id=user.user_id, email=user.email)
        return user


@QueryHandler(GetUser)
class GetUserHandler:
    def __init__(self, users: UserRepository) -> None:
        self.users = users

    async def handle(self, query: GetUser) -> UserView:
        user = await self.users.get(query.user_id)
        if user is None:
            raise LookupError(f"no user {query.user_id}")
        return user


def create_bus(url: str | None = None) -> MessageBus:
    """The service's bus (URL from ``url``, else ``BANYAN_URL``, else ``memory://``)."""
    bus = MessageBus(SERVICE, url, providers=[UsersProvider()], publishes=[UserCreated])
    bus.include(CreateUserHandler, GetUserHandler)
    return bus


bus = create_bus()
