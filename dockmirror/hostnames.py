"""Registry host names as clients send them, and the alias patterns they are matched to.

Whatever a client names a registry with (a path prefix, containerd's ``?ns=``,
the ``Host`` header) is parsed with a strict grammar before it is compared
with anything: DNS labels of ``[a-z0-9-]``, dot-separated, with a port only
where it is written as one.  A pattern is a host name, a host name with a
port, or ``*.`` and a host name, which matches exactly one more label.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_RE = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")
_PORT_RE = re.compile(r"[1-9][0-9]{0,4}")
#: The longest DNS name (RFC 1035), without a trailing dot.
HOST_MAX = 253


@dataclass(frozen=True)
class HostName:
    """A DNS host name (lower-case, no trailing dot) and an optional port."""

    host: str
    port: int | None = None

    def __str__(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"


def _port(text: str) -> int | None:
    if not _PORT_RE.fullmatch(text) or int(text) > 65535:
        return None
    return int(text)


def is_host_name(text: str) -> bool:
    """Whether *text* is a lower-case DNS host name (not an IP address)."""
    return (
        len(text) <= HOST_MAX
        and _HOST_RE.fullmatch(text) is not None
        and not text.rpartition(".")[2].isdigit()
    )


def parse_host(text: str) -> HostName | None:
    """``host`` or ``host:port`` as a :class:`HostName`; None for anything else.

    Only ASCII is looked at (``str.lower`` maps some non-ASCII letters to
    ASCII ones), then case is folded: DNS names are case-insensitive.  IP
    addresses, trailing dots, ``_``, ``%``, ``@``, ``#``, ``/``, ``?`` and
    empty labels are refused.
    """
    if not text.isascii():
        return None
    host, colon, port_text = text.lower().partition(":")
    if not is_host_name(host):
        return None
    if not colon:
        return HostName(host)
    port = _port(port_text)
    return None if port is None else HostName(host, port)


def parse_host_header(value: str) -> str | None:
    """The host of a ``Host`` header without its port: a DNS name or an IP address.

    None when the header is neither (the port, if any, must be a port number).
    """
    value = value.strip()
    if not value.isascii():
        return None
    value = value.lower()
    if value.startswith("["):
        address, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and (rest[0] != ":" or _port(rest[1:]) is None)):
            return None
        try:
            return f"[{ipaddress.IPv6Address(address)}]"
        except ValueError:
            return None
    host, colon, port_text = value.partition(":")
    if colon and _port(port_text) is None:
        return None
    if is_host_name(host):
        return host
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        return None


@dataclass(frozen=True)
class HostPattern:
    """``host``, ``host:port``, or ``*.host``: any one label, then ``.host``."""

    host: str
    port: int | None = None
    wildcard: bool = False

    @classmethod
    def parse(cls, text: str) -> HostPattern:
        """Parse an alias pattern; ValueError says what is wrong with it."""
        wildcard = text.startswith("*.")
        name = parse_host(text[2:] if wildcard else text)
        if name is None:
            raise ValueError(
                f"{text!r} is not a host name: labels of a-z, 0-9 and '-'"
                " separated by dots, optionally ':PORT', or '*.' and such a name"
            )
        return cls(name.host, name.port, wildcard)

    def matches(self, name: HostName) -> bool:
        if name.port != self.port:
            return False
        if not self.wildcard:
            return name.host == self.host
        label, dot, rest = name.host.partition(".")
        return bool(label and dot) and rest == self.host

    def __str__(self) -> str:
        text = f"*.{self.host}" if self.wildcard else self.host
        return text if self.port is None else f"{text}:{self.port}"
