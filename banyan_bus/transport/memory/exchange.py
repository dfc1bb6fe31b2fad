"""Exchanges of the memory broker, and how each type picks the bindings a message takes.

Only the exchange types the bus declares are emulated: ``direct`` and
``fanout`` (AMQP's built-ins and the command exchange), ``topic`` (the root
event exchange and the delay levels) and ``x-consistent-hash`` (ordered
subscriptions). A headers exchange is refused rather than half-emulated: a
claim the emulator makes is a claim the transport suite must hold against
RabbitMQ.

An exchange only answers "which of my bindings match"; following bindings to
other exchanges, and onto queues, is the broker's job (it owns both tables).
"""

from __future__ import annotations

import bisect
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from banyan_bus.errors import TopologyError
from banyan_bus.transport.base import Headers, HeaderValue

EXCHANGE_TYPES: Final = frozenset({"topic", "direct", "fanout", "x-consistent-hash"})
#: The exchanges every RabbitMQ vhost has from the start (besides the default one).
PREDECLARED: Final = {"amq.direct": "direct", "amq.fanout": "fanout", "amq.topic": "topic"}
#: Ring points per unit of binding weight: enough that a few queues share keys evenly.
_POINTS_PER_WEIGHT: Final = 64


@lru_cache(maxsize=4096)
def _topic_regex(pattern: str) -> re.Pattern[str]:
    """Compile a topic binding key into a regex over keys written as ``word.word.``.

    Terminating every word with a dot makes ``#`` ("zero or more words") a plain
    repetition of ``[^.]*\\.``, so empty words and ``a.#.b`` need no special case.
    """
    parts: list[str] = []
    words = pattern.split(".") if pattern else []
    for previous, word in zip([None, *words], words, strict=False):
        if word == "#":
            if previous != "#":  # '#.#' means '#'; collapsing avoids regex backtracking
                parts.append(r"(?:[^.]*\.)*")
        elif word == "*":
            parts.append(r"[^.]*\.")
        else:
            parts.append(re.escape(word) + r"\.")
    return re.compile("".join(parts))


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: words split on '.', ``*`` one word, ``#`` zero or more.

    As in RabbitMQ, the empty key has zero words and ``a..b`` has an empty middle word.
    """
    return _topic_regex(pattern).fullmatch(routing_key + "." if routing_key else "") is not None


def _hash_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    return b"" if value is None else str(value).encode()


@dataclass(frozen=True, slots=True)
class Binding:
    """A binding from an exchange to a queue, or to another exchange (``to_exchange``)."""

    destination: str
    to_exchange: bool
    routing_key: str
    arguments: dict[str, HeaderValue]


class Exchange:
    """One exchange: its declaration and its bindings (in the order they were made).

    Bindings are indexed so that neither declaring nor routing scans them all: a
    service with thousands of subscriptions binds thousands of group exchanges to
    the root exchange, and each bind and each publish must not cost O(bindings).
    ``direct`` bindings are found by their routing key; ``topic`` bindings whose
    last word is a literal by that word (a key's last word must equal it), the
    rest (``*``/``#`` last) are tried on every message. Matches keep binding order.
    """

    __slots__ = (
        "_by_destination",
        "_by_word",
        "_ring",
        "_seq",
        "_wild",
        "arguments",
        "durable",
        "name",
        "type",
    )

    def __init__(
        self, name: str, type: str, durable: bool, arguments: dict[str, HeaderValue]
    ) -> None:
        self.name = name
        self.type = type
        self.durable = durable
        self.arguments = arguments
        self._seq = 0
        # Lists, not dicts: most hold one or two bindings, and there is one per
        # destination and per word (a few hundred bytes a subscription saved).
        #: (destination, to_exchange) -> its bindings
        self._by_destination: dict[tuple[str, bool], list[Binding]] = {}
        #: direct: routing key; topic: the binding key's last (literal) word ->
        #: (sequence number, binding), in binding order
        self._by_word: dict[str, list[tuple[int, Binding]]] = {}
        #: topic keys ending in '*' or '#' (or empty); every fanout and hash binding
        self._wild: list[tuple[int, Binding]] = []
        self._ring: tuple[list[int], list[Binding]] | None = None

    @property
    def bindings(self) -> list[Binding]:
        """Every binding, in the order they were made."""
        found = [*self._wild, *(item for same in self._by_word.values() for item in same)]
        return [b for _, b in sorted(found, key=lambda item: item[0])]

    def describe(self) -> dict[str, object]:
        """What a re-declaration must repeat exactly (else ``TopologyMismatch``)."""
        return {"type": self.type, "durable": self.durable, **self.arguments}

    def _word(self, binding: Binding) -> str | None:
        """The routing index key of ``binding``: None for the unindexed (``_wild``) ones."""
        if self.type == "direct":
            return binding.routing_key
        last = binding.routing_key.rpartition(".")[2]
        if self.type != "topic" or not binding.routing_key or last in ("*", "#"):
            return None
        return last

    def bind(self, binding: Binding) -> None:
        """Add a binding; an identical one is a no-op, as in AMQP.

        A consistent-hash binding's routing key is its weight, which RabbitMQ
        requires to be a positive integer.
        """
        if self.type == "x-consistent-hash":
            weight = binding.routing_key
            if not (weight.isascii() and weight.isdigit()) or int(weight) < 1:
                raise TopologyError(
                    f"cannot bind {binding.destination!r} to {self.name!r}: "
                    f"the weight {weight!r} must be an int >= 1"
                )
        key = (binding.destination, binding.to_exchange)
        same = self._by_destination.get(key)
        if same is None:
            self._by_destination[key] = [binding]
        elif binding in same:
            return
        else:
            same.append(binding)
        self._seq += 1
        word = self._word(binding)
        if word is None:
            self._wild.append((self._seq, binding))
        elif (bucket := self._by_word.get(word)) is None:
            self._by_word[word] = [(self._seq, binding)]
        else:
            bucket.append((self._seq, binding))
        self._ring = None

    def unbind(self, destination: str, to_exchange: bool) -> None:
        """Drop every binding to ``destination`` (it was deleted)."""
        gone = self._by_destination.pop((destination, to_exchange), None)
        if not gone:
            return
        for binding in gone:
            word = self._word(binding)
            bucket = self._wild if word is None else self._by_word[word]
            bucket[:] = [item for item in bucket if item[1] is not binding]
            if word is not None and not bucket:
                del self._by_word[word]
        self._ring = None

    def matching(self, routing_key: str, headers: Headers) -> list[Binding]:
        """The bindings a message with this routing key and these headers takes."""
        if self.type == "direct":
            return [b for _, b in self._by_word.get(routing_key, ())]
        if self.type == "topic":
            literal = self._by_word.get(routing_key.rpartition(".")[2])
            if literal and self._wild:
                candidates = sorted([*literal, *self._wild], key=lambda item: item[0])
            else:
                candidates = literal or self._wild
            return [b for _, b in candidates if topic_matches(b.routing_key, routing_key)]
        if self.type == "fanout":
            return [b for _, b in self._wild]
        chosen = self._hash_lookup(self._hash_input(routing_key, headers))
        return [] if chosen is None else [chosen]

    def _hash_input(self, routing_key: str, headers: Headers) -> bytes:
        # Like the plugin: a missing header hashes as "undefined", so all such
        # messages land on one queue rather than being dropped.
        header = self.arguments.get("hash-header")
        if isinstance(header, str):
            return _hash_bytes(headers.get(header))
        return routing_key.encode()

    def _hash_lookup(self, key: bytes) -> Binding | None:
        """Pick the binding owning the first ring point at or after the key's hash.

        Points derive from the destination's name (not binding order), so a key
        keeps its queue across restarts and re-declarations.
        """
        if self._ring is None:
            points: list[tuple[int, int]] = []
            bindings = self.bindings
            for index, b in enumerate(bindings):
                kind = "e" if b.to_exchange else "q"
                for i in range(int(b.routing_key) * _POINTS_PER_WEIGHT):
                    points.append((zlib.crc32(f"{kind}:{b.destination}:{i}".encode()), index))
            points.sort()
            self._ring = ([p for p, _ in points], [bindings[i] for _, i in points])
        hashes, owners = self._ring
        if not hashes:
            return None
        return owners[bisect.bisect_left(hashes, zlib.crc32(key)) % len(hashes)]
