"""A test-only service whose class handler needs a dependency nobody provides.

``banyan run`` must fail at start, naming the handler and the parameter, and
with ``--workers 2`` report it once, not once per worker.
"""

from __future__ import annotations

from banyan_bus import Event, EventHandler, MessageBus


class LedgerClosed(Event):
    ledger_id: str


class Ledger:
    """Never registered with a provider."""


@EventHandler(LedgerClosed)
class ArchiveLedger:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def handle(self, event: LedgerClosed) -> None:
        return None


bus = MessageBus("broken-service")
bus.include(ArchiveLedger)
