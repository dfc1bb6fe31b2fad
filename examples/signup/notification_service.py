"""notification-service: tells the admins' channel about every signup.

Its group is named explicitly: a second kind of notifier (say, a CRM sync)
could subscribe to ``UserCreated`` in its own group inside the same service
and would get its own copy of every event.

Run alone against RabbitMQ::

    BANYAN_URL=amqp://guest:guest@localhost/ banyan run examples.signup.notification_service:bus
"""

from __future__ import annotations

from typing import Protocol

from dishka import Provider, Scope, provide

from banyan_bus import EventHandler, Logger, MessageBus, RetryPolicy
from contracts.users import UserCreated

SERVICE = "notification-service"


class Notifier(Protocol):
    async def post(self, channel: str, text: str) -> None: ...


class ConsoleNotifier:
    """Posts nowhere; keeps the messages (a chat webhook in real life)."""

    def __init__(self) -> None:
        self.posted: list[tuple[str, str]] = []

    async def post(self, channel: str, text: str) -> None:
        self.posted.append((channel, text))


class NotifierProvider(Provider):
    notifier = provide(ConsoleNotifier, provides=Notifier, scope=Scope.APP)


@EventHandler(
    UserCreated,
    subscription_group="notification-service",
    # A chat webhook is flaky but cheap to retry: 3 quick tries, then two delayed ones.
    retry=RetryPolicy(immediate=2, delayed=2, base=1.0),
)
class NotifyAdmins:
    def __init__(self, notifier: Notifier, log: Logger) -> None:
        self.notifier = notifier
        self.log = log

    async def handle(self, event: UserCreated) -> None:
        text = f"{event.name} <{event.email}> signed up as {event.role}"
        await self.notifier.post("#signups", text)
        self.log.info("admins_notified", channel="#signups", user_id=event.user_id)


def create_bus(url: str | None = None) -> MessageBus:
    bus = MessageBus(SERVICE, url, providers=[NotifierProvider()], publishes=[])
    bus.include(NotifyAdmins)
    return bus


bus = create_bus()
