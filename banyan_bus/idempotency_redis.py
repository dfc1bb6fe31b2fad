"""The Redis idempotency store: processed keys shared by every instance of a service.

Why Redis: an in-process store (``MemoryIdempotencyStore``) deduplicates only
what one process sees, and two instances of a service each see some copies of
an event. The store keeps the claim/complete/release protocol of
:class:`~banyan_bus.idempotency.IdempotencyStore` atomic per key across all of
them with one Lua script per operation, and lets Redis expire old keys itself.
redis-py is an optional dependency (``pip install "banyan-bus[redis]"``),
imported when a store is built.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from banyan_bus.errors import ConfigurationError, IdempotencyStoreError
from banyan_bus.idempotency import _DONE, ClaimResult, _check_token, _positive
from banyan_bus.transport.url import mask_url

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = ["RedisIdempotencyStore"]

# Claim in one round trip: SET NX PX, else read what holds the key. One script, so
# the key cannot expire between the SET and the GET.
_CLAIM_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return 'claimed'
end
local value = redis.call('GET', KEYS[1])
if value == ARGV[3] then
    return 'done'
end
if value == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 'claimed'
end
return 'busy'
"""

# Compare-and-set: only the token's holder (or nobody) may mark the key done.
_COMPLETE_LUA = """
local value = redis.call('GET', KEYS[1])
if value == ARGV[1] or value == false then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
    return 1
end
return 0
"""

# Compare-and-delete: a stale worker never frees someone else's claim.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

_CLAIM_RESULTS: dict[str, ClaimResult] = {"claimed": "claimed", "done": "done", "busy": "busy"}

_INSTALL_HINT = 'RedisIdempotencyStore needs redis-py: pip install "banyan-bus[redis]"'


def _milliseconds(name: str, seconds: float) -> int:
    return max(1, math.ceil(_positive(name, seconds) * 1000))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisIdempotencyStore:
    """Keys in Redis, shared by every instance of a service (redis-py asyncio).

    Each key is ``prefix + key``; a claim is ``SET key token NX PX lease``, a
    completion overwrites it with ``"done"`` and a ``PX`` of ``ttl``, so Redis
    itself forgets old keys. ``complete`` and ``release`` are Lua
    compare-and-set scripts on the token.

    Give ``url`` (the store opens and closes its own client, with ``timeout``
    seconds for connecting and for each command), or a ready ``client`` (which
    the store uses as is and never closes). Redis errors surface as
    :class:`IdempotencyStoreError`.

    >>> store = RedisIdempotencyStore("redis://localhost:6379/0")  # doctest: +SKIP
    """

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        prefix: str = "banyan:idem:",
        client: Redis | None = None,
        timeout: float = 5.0,
    ) -> None:
        try:
            import redis.asyncio as redis_asyncio
            import redis.exceptions
        except ModuleNotFoundError as exc:
            raise ConfigurationError(_INSTALL_HINT) from exc
        self._redis_error = redis.exceptions.RedisError
        self._prefix = prefix
        self._owns_client = client is None
        if client is None:
            timeout = _positive("timeout", timeout)
            client = redis_asyncio.Redis.from_url(
                url, socket_connect_timeout=timeout, socket_timeout=timeout
            )
            self._where = mask_url(url)
        else:
            self._where = "the given redis client"
        self._client = client
        self._claim: AsyncScript = client.register_script(_CLAIM_LUA)
        self._complete: AsyncScript = client.register_script(_COMPLETE_LUA)
        self._release: AsyncScript = client.register_script(_RELEASE_LUA)

    async def _run(self, operation: str, script: AsyncScript, key: str, *args: str | int) -> str:
        try:
            result = await script(keys=[self._prefix + key], args=list(args))
        except self._redis_error as exc:
            raise IdempotencyStoreError(
                f"idempotency store at {self._where} failed to {operation} key {key!r}: "
                f"{type(exc).__name__}: {exc}. Is Redis up? (`bash scripts/services.sh redis` "
                f"starts a local one.)"
            ) from exc
        return _text(result)

    async def claim(self, key: str, *, token: str, lease: float) -> ClaimResult:
        _check_token(token)
        ms = _milliseconds("lease", lease)
        result = await self._run("claim", self._claim, key, token, ms, _DONE)
        claimed = _CLAIM_RESULTS.get(result)
        if claimed is None:
            raise IdempotencyStoreError(f"claim script at {self._where} returned {result!r}")
        return claimed

    async def complete(self, key: str, *, token: str, ttl: float) -> bool:
        _check_token(token)
        ms = _milliseconds("ttl", ttl)
        return await self._run("complete", self._complete, key, token, _DONE, ms) == "1"

    async def release(self, key: str, *, token: str) -> bool:
        _check_token(token)
        return await self._run("release", self._release, key, token) == "1"

    async def close(self) -> None:
        """Close the client if this store opened it."""
        if self._owns_client:
            await self._client.aclose()
