"""Example shared contracts: the only code the example services share.

In a real platform this package is versioned and published on its own, and
every service depends on it.
"""

from contracts.orders import OrderPlaced, OrderShipped, PaymentProcessed, PlaceOrder
from contracts.users import CreateUser, EmailSent, GetUser, UserCreated, UserCreatedV2, UserView

__all__ = [
    "CreateUser",
    "EmailSent",
    "GetUser",
    "OrderPlaced",
    "OrderShipped",
    "PaymentProcessed",
    "PlaceOrder",
    "UserCreated",
    "UserCreatedV2",
    "UserView",
]
