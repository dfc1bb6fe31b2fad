"""User contracts: what user-service announces and answers."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from banyan_bus import Command, Event, Query


class UserCreated(Event):
    """A user signed up. Version 1."""

    user_id: str
    email: str
    name: str
    role: str = "user"
    created_at: datetime


class UserCreatedV2(Event, name="UserCreated", version=2):
    """Version 2 adds notification preferences and drops ``created_at`` (the envelope has it)."""

    user_id: str
    email: str
    name: str
    role: str = "user"
    preferences: dict[str, bool] = Field(default_factory=dict)


class EmailSent(Event):
    """email-service sent an email."""

    email_id: str
    to: str
    template: str


class UserView(BaseModel):
    """What user-service answers about a user."""

    user_id: str
    email: str
    name: str
    role: str


class CreateUser(Command, result=UserView):
    """Ask user-service to create a user; answered with a ``UserView``."""

    email: str
    name: str
    role: str = "user"


class GetUser(Query, result=UserView):
    user_id: str
