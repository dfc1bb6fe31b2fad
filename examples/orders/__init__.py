"""The order story: order-service places, payment-service charges, shipping-service ships.

::

    PlaceOrder ─▶ order-service ─▶ OrderPlaced ─┬─▶ payment-service ─▶ PaymentProcessed ─┐
                                                └─▶ shipping-service ◀───────────────────┘
                                                        │ (retries until the order is paid)
                                                        └─▶ OrderShipped

Every event carries the order id as its partition key.
"""
