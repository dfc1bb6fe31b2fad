"""email-service: welcomes every new user, then announces ``EmailSent``.

Run alone against RabbitMQ::

    BANYAN_URL=amqp://guest:guest@localhost/ banyan run examples.signup.email_service:bus
"""

from __future__ import annotations

import uuid
from typing import Protocol

from dishka import Provider, Scope, provide

from banyan_bus import EventHandler, Logger, MessageBus
from contracts.users import EmailSent, UserCreated

SERVICE = "email-service"


class EmailService(Protocol):
    """Sends an email; returns the provider's id for it."""

    async def send(self, to: str, template: str, data: dict[str, str]) -> str: ...


class ConsoleEmailService:
    """Sends nothing: records the email, so the example needs no SMTP server.

    Swap in a real implementation through the provider below; the handler
    does not change.
    """

    def __init__(self) -> None:
        self.outbox: list[tuple[str, str, dict[str, str]]] = []

    async def send(self, to: str, template: str, data: dict[str, str]) -> str:
        self.outbox.append((to, template, data))
        return f"eml_{uuid.uuid4().hex[:12]}"


class EmailProvider(Provider):
    email = provide(ConsoleEmailService, provides=EmailService, scope=Scope.APP)


@EventHandler(UserCreated, concurrency=5)
class SendWelcomeEmail:
    """Constructor parameters are injected; a new instance handles each message."""

    def __init__(self, email: EmailService, bus: MessageBus, log: Logger) -> None:
        self.email = email
        self.bus = bus
        self.log = log

    async def handle(self, event: UserCreated) -> None:
        email_id = await self.email.send(event.email, "welcome", {"name": event.name})
        # Published inside a handler: correlation id and causation id are carried over.
        await self.bus.publish(EmailSent(email_id=email_id, to=event.email, template="welcome"))
        self.log.info("welcome_email_sent", to=event.email, email_id=email_id)


def create_bus(url: str | None = None) -> MessageBus:
    bus = MessageBus(SERVICE, url, providers=[EmailProvider()], publishes=[EmailSent])
    bus.include(SendWelcomeEmail)
    return bus


bus = create_bus()
