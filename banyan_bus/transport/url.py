"""Broker URLs in messages and logs: the password never shows.

Every URL a user gives banyan_bus (``amqp://``, ``redis://``, ``postgresql://``,
a comma-separated list of cluster nodes) is printed through :func:`mask_url`.
"""

from __future__ import annotations

MASK = "***"


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``; the rest is kept as written.

    >>> mask_url("amqp://guest:guest@localhost:5672/%2F")
    'amqp://guest:***@localhost:5672/%2F'
    >>> mask_url("amqp://u:a@n1/,amqp://u:b@n2/")
    'amqp://u:***@n1/,amqp://u:***@n2/'

    The user name stays (it says which account was used). The text is not
    parsed into a URL object and printed back, so nothing is re-encoded or
    re-cased, and a URL too broken to parse is still masked rather than hidden.
    """
    return ",".join(_mask_one(part) for part in url.split(","))


def _mask_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # RFC 3986: the authority ends at the first "/", "?" or "#" after "//".
    end = len(rest)
    for stop in "/?#":
        found = rest.find(stop)
        if found != -1:
            end = min(end, found)
    authority, tail = rest[:end], rest[end:]
    # The last "@" ends the user info: an unescaped "@" in a password stays masked.
    userinfo, at, host = authority.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:{MASK}@{host}{tail}"
