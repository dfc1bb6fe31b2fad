"""analytics-service: counts signups and emails with plain function handlers.

Function handlers are the lightest way in: ``async def h(event)`` or
``async def h(event, ctx)``, subscribed with ``bus.subscribe``.

Run alone against RabbitMQ::

    BANYAN_URL=amqp://guest:guest@localhost/ banyan run examples.signup.analytics_service:bus
"""

from __future__ import annotations

from collections import Counter

import structlog

from banyan_bus import MessageBus, MessageContext
from contracts.users import EmailSent, UserCreated

SERVICE = "analytics-service"


class SignupStats:
    """In-memory counters (a metrics store in real life)."""

    def __init__(self) -> None:
        self.signups_by_role: Counter[str] = Counter()
        self.emails_by_template: Counter[str] = Counter()


def create_bus(url: str | None = None) -> MessageBus:
    bus = MessageBus(SERVICE, url, publishes=[])
    stats = SignupStats()
    log = structlog.get_logger("examples.analytics").bind(group=SERVICE)

    async def count_signup(event: UserCreated, ctx: MessageContext) -> None:
        stats.signups_by_role[event.role] += 1
        log.info(
            "signup_counted",
            role=event.role,
            total=sum(stats.signups_by_role.values()),
            event_id=ctx.id,
        )

    async def count_email(event: EmailSent) -> None:
        stats.emails_by_template[event.template] += 1
        log.info("email_counted", template=event.template, total=stats.emails_by_template.total())

    bus.handler(UserCreated)(count_signup)
    bus.handler(EmailSent)(count_email)
    return bus


bus = create_bus()
