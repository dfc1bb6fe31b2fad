"""Message contracts: pydantic models that know their wire name and version.

A contract is the only thing two services share, so it is strict where a
mistake would spread: the naming rule (events are facts, ``UserCreated``, not
commands, ``CreateUser``) and the uniqueness of ``(message type, version)`` are
checked when the class is defined, i.e. at import time of the service.

Example::

    class UserCreated(Event):                       # type "UserCreated", version 1
        user_id: str

    class UserCreatedV2(Event, name="UserCreated", version=2):
        user_id: str
        preferences: dict[str, bool] = {}
"""

from __future__ import annotations

import re
import warnings
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar, Literal, cast

from pydantic import BaseModel, ConfigDict, PydanticDeprecatedSince20
from pydantic._internal._model_construction import ModelMetaclass
from pydantic.alias_generators import to_camel

from banyan_bus.errors import ContractError
from banyan_bus.wire import format_timestamp, mark_decimal, unmark_decimals_text, unmark_tree

MessageKind = Literal["event", "command", "query"]

_TYPE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,99}$")
_VERSION_SUFFIX = re.compile(r"^(?P<base>.+?)V(?P<version>\d+)$")
_WORDS = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")

# Irregular past tenses and participles that do not end in "ed". A name ending in one
# of these reads as a fact ("EmailSent", "OrderPaid").
_IRREGULAR_PAST = frozenset(
    """
    arisen awoke awoken begun began bent bid bitten blown borne bought bound broken brought
    built burnt cast caught chosen come cut dealt done drawn driven drunk dug eaten fallen
    fed felt fought found flown forbidden forgotten forgiven frozen given gone got gotten
    grown held hidden hit hung hurt kept knelt known laid led left lent let lit lost made
    meant met overdrawn overridden paid put quit read rebuilt redone reset resent rewritten
    ridden rung risen run said sat seen sent set shaken shown shot shrunk shut sold sought
    spent split spoken spread stolen struck stuck stood sung sunk sworn swept swung taken
    taught thought thrown told torn understood undone undid upheld withdrawn withheld woken
    won worn wound written
    """.split()
)
# Words ending in "ed" that are not past tenses.
_NOT_PAST = frozenset("bed breed embed exceed feed need proceed seed speed succeed".split())


# The particles of phrasal verbs: "LoggedIn", "SignedUp", "CheckedOut", "SetUp".
_PARTICLES = frozenset(
    "about across along around aside away back by down in off on out over through up".split()
)
_PASCAL_CASE = re.compile(r"^[A-Z][A-Za-z0-9]*$")

Naming = Literal["strict", "free"]
"""``"strict"`` (the default) applies the platform's naming rule; ``"free"`` opts out."""


def is_past_tense(word: str) -> bool:
    """Whether ``word`` reads as a past tense or participle (``Created``, ``Sent``)."""
    w = word.lower()
    if w in _NOT_PAST:
        return False
    return (w.endswith("ed") and len(w) > 3) or w in _IRREGULAR_PAST


def reads_as_fact(message_type: str) -> bool:
    """``{Noun}{PastTenseVerb}``, the verb possibly phrasal: ``UserCreated``, ``UserLoggedIn``."""
    words = _WORDS.findall(message_type)
    if words and words[-1].lower() in _PARTICLES and len(words) >= 3:
        words = words[:-1]
    return len(words) >= 2 and is_past_tense(words[-1])


def routing_key_for(message_type: str) -> str:
    """The root-exchange routing key of a message type: lowercase, no dashes/underscores."""
    return message_type.lower().replace("-", "").replace("_", "")


def _check_name(kind: MessageKind, message_type: str, class_name: str) -> None:
    """The platform's naming rule, checked where a wrong name would be defined, not read.

    Events are facts, ``{Noun}{PastTenseVerb}`` (phrasal verbs too); commands and
    queries are instructions and questions, so a name that reads as a fact is refused
    for them; every message type is PascalCase, the form every platform service
    (and its generated TypeScript types) expects.
    """
    opt_out = (
        f"If the name is right for your platform, opt out on the class: "
        f'`class {class_name}({kind.capitalize()}, naming="free")` and say why in its docstring.'
    )
    if not _PASCAL_CASE.match(message_type):
        raise ContractError(
            f"{kind.capitalize()} {class_name!r}: message type {message_type!r} is not "
            f"PascalCase; write it like 'UserCreated' or 'CreateUser' (letters and digits, "
            f"each word capitalised, no '_'). {opt_out}"
        )
    if kind == "event" and not reads_as_fact(message_type):
        raise ContractError(
            f"Event {class_name!r} (message type {message_type!r}) does not read as a fact: "
            f"events are named {{Noun}}{{PastTenseVerb}}, so that subscribers read what "
            f"happened, not what to do. Accepted: 'UserCreated', 'PaymentProcessed', "
            f"'EmailSent', 'UserLoggedIn', 'CartCheckedOut' (a noun, then a past participle, "
            f"optionally with its particle). {opt_out}"
        )
    if kind != "event" and reads_as_fact(message_type):
        raise ContractError(
            f"{kind.capitalize()} {class_name!r} (message type {message_type!r}) reads as a "
            f"fact, like an event: commands are imperative ('CreateUser', 'ShipOrder') and "
            f"queries ask ('GetUser', 'FindOrders'). If it reports something that happened, "
            f"make it an Event. {opt_out}"
        )


class ContractRegistry:
    """Maps ``(message type, version)`` to the contract class, across the process.

    A class defined again under the same module and qualified name replaces
    the old one (module reloads, notebooks); any other clash is an error,
    because two contracts for one wire name would make decoding ambiguous.
    """

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, int], type[Message]] = {}
        # Each type's versions, oldest first: ``versions`` is asked per subscription at
        # start and per decoded message, so it must not scan (or sort) the whole registry.
        self._by_type: dict[str, dict[int, type[Message]]] = {}

    def register(self, cls: type[Message]) -> None:
        key = (cls.__message_type__, cls.__message_version__)
        existing = self._by_key.get(key)
        if existing is not None and (existing.__module__, existing.__qualname__) != (
            cls.__module__,
            cls.__qualname__,
        ):
            raise ContractError(
                f"{cls.__qualname__} declares message type {key[0]!r} version {key[1]}, "
                f"which {existing.__module__}.{existing.__qualname__} already declares. "
                f"Give the new class another version (`version={key[1] + 1}`) or another name."
            )
        self._by_key[key] = cls
        versions = self._by_type.setdefault(key[0], {})
        versions[key[1]] = cls
        if list(versions) != sorted(versions):
            self._by_type[key[0]] = dict(sorted(versions.items()))

    def get(self, message_type: str, version: int) -> type[Message] | None:
        return self._by_key.get((message_type, version))

    def versions(self, message_type: str) -> dict[int, type[Message]]:
        """Every registered version of ``message_type``, oldest first (a copy)."""
        return dict(self._by_type.get(message_type, ()))

    def __iter__(self) -> Any:
        return iter(list(self._by_key.values()))


#: The process-wide registry every contract class registers into when defined.
registry = ContractRegistry()


class _ContractMeta(ModelMetaclass):
    """pydantic's model metaclass, quiet about the one deprecation contracts rely on.

    The wire forms of datetimes and decimals (``wire.py``) need a serializer for two
    types wherever they appear in a contract, containers included, without the user
    annotating each field; pydantic 2 does that only through ``json_encoders``,
    which it marks deprecated (still supported until pydantic 3, hence the ``<3``
    pin). The warning is silenced exactly while a contract class is built, for no
    other model of the user's and whatever warning filters a test runner installs.
    """

    def __new__(
        mcs,
        cls_name: str,
        bases: tuple[type[Any], ...],
        namespace: dict[str, Any],
        **kwargs: Any,
    ) -> type:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore",
                message="`json_encoders` is deprecated",
                category=PydanticDeprecatedSince20,
            )
            return super().__new__(mcs, cls_name, bases, namespace, **kwargs)


class Message(BaseModel, metaclass=_ContractMeta):
    """Base of all contracts. Use ``Event``, ``Command`` or ``Query``.

    Fields are snake_case in Python and camelCase on the wire. Unknown wire
    fields are ignored, so a newer publisher can add optional fields without
    breaking older subscribers.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        extra="ignore",
        # The platform's forms (see wire.py): datetimes with milliseconds and Z,
        # decimals as exact JSON numbers.
        json_encoders={datetime: format_timestamp, Decimal: mark_decimal},
    )

    def model_dump_json(self, *args: Any, **kwargs: Any) -> str:
        """As pydantic's, with decimals as exact JSON numbers (see ``wire.py``)."""
        return unmark_decimals_text(super().model_dump_json(*args, **kwargs))

    def model_dump(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """As pydantic's; in ``mode="json"`` decimals are strings, as pydantic writes them."""
        dumped = super().model_dump(*args, **kwargs)
        if kwargs.get("mode") == "json":
            return cast(dict[str, Any], unmark_tree(dumped))
        return dumped

    __message_kind__: ClassVar[MessageKind]
    __message_type__: ClassVar[str]
    __message_version__: ClassVar[int]
    __partition_key__: ClassVar[str | None] = None
    #: What a command or query answers with (``class CreateUser(Command, result=UserView)``).
    __result_type__: ClassVar[Any] = None
    __abstract_contract__: ClassVar[bool] = True

    def __init_subclass__(
        cls,
        *,
        name: str | None = None,
        version: int | None = None,
        naming: Naming = "strict",
        check_name: bool = True,
        partition_key: str | None = None,
        abstract: bool = False,
        result: Any = None,
        **kwargs: Any,
    ) -> None:
        # Pydantic passes the same keywords to __pydantic_init_subclass__, where the
        # fields exist; here we only strip ours so BaseModel does not see them.
        super().__init_subclass__(**kwargs)

    @classmethod
    def __pydantic_init_subclass__(
        cls,
        *,
        name: str | None = None,
        version: int | None = None,
        naming: Naming = "strict",
        check_name: bool = True,
        partition_key: str | None = None,
        abstract: bool = False,
        result: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls.__abstract_contract__ = abstract or "_banyan_base" in cls.__dict__
        if cls.__abstract_contract__:
            return
        message_type = name or cls.__name__
        suffix = _VERSION_SUFFIX.match(cls.__name__)
        if name is None and suffix and version is None:
            raise ContractError(
                f"{cls.__name__} looks like version {suffix['version']} of "
                f"{suffix['base']!r}; say so explicitly: "
                f"`class {cls.__name__}({cls._kind_base()}, name={suffix['base']!r}, "
                f"version={suffix['version']})`."
            )
        if not _TYPE_NAME.match(message_type):
            raise ContractError(
                f"{cls.__name__}: message type {message_type!r} must start with a letter "
                f"and hold only letters, digits and '_' (at most 100 characters)."
            )
        if version is None:
            version = 1
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ContractError(f"{cls.__name__}: version must be an int >= 1, got {version!r}.")
        if partition_key is not None and partition_key not in cls.model_fields:
            raise ContractError(
                f"{cls.__name__}: partition_key={partition_key!r} is not a field; "
                f"fields are {sorted(cls.model_fields)}."
            )
        if naming not in ("strict", "free"):
            raise ContractError(
                f"{cls.__name__}: naming must be 'strict' (the default) or 'free', got {naming!r}."
            )
        # check_name=False is the older spelling of naming="free".
        if naming == "strict" and check_name:
            _check_name(cls.__message_kind__, message_type, cls.__name__)
        cls.__message_type__ = message_type
        cls.__message_version__ = version
        if partition_key is not None:
            cls.__partition_key__ = partition_key
        if result is not None:
            if cls.__message_kind__ == "event":
                raise ContractError(f"{cls.__name__}: events have no result; drop result=")
            cls.__result_type__ = result
        registry.register(cls)

    @classmethod
    def _kind_base(cls) -> str:
        return {"event": "Event", "command": "Command", "query": "Query"}[cls.__message_kind__]

    @classmethod
    def is_abstract_contract(cls) -> bool:
        return cls.__abstract_contract__


class Event(Message):
    """A fact that happened, broadcast to every subscribing service.

    Named ``{Noun}{PastTenseVerb}``: ``UserCreated``, ``OrderShipped``.
    """

    __message_kind__: ClassVar[MessageKind] = "event"
    _banyan_base: ClassVar[bool] = True


class Command(Message):
    """An instruction to exactly one owning service, answered with a result.

    Named imperatively: ``CreateUser``, ``ShipOrder``.
    """

    __message_kind__: ClassVar[MessageKind] = "command"
    _banyan_base: ClassVar[bool] = True


class Query(Message):
    """A question to exactly one owning service; it must not change state.

    Named for what it asks: ``GetUser``, ``FindOrders``.
    """

    __message_kind__: ClassVar[MessageKind] = "query"
    _banyan_base: ClassVar[bool] = True
