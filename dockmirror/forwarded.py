"""The client's address behind trusted reverse proxies.

With ``[server] trusted_proxies``, a request whose peer is in one of those
networks takes its client address from the header the proxies write
(``X-Forwarded-For``, or ``Forwarded`` as RFC 7239 has it): the right-most
address there that is not itself a trusted proxy.  What a client may have
written, the part of the header left of that address and the other header,
is never read.  A hop that does not parse as an IP address ends the walk at
the nearest trusted hop.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

from twisted.web.http_headers import Headers

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Header names that may carry the client's address.
HEADERS = ("x-forwarded-for", "forwarded")
#: Hops looked at, from the right; a longer chain stops at the nearest trusted hop.
MAX_HOPS = 16

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PAIR = re.compile(rf'({_TOKEN})=({_TOKEN}|"[^"\\]*")')
_NODE = re.compile(
    r"\[(?P<bracketed>[0-9A-Fa-f:.]+)\](?::(?P<port6>\d{1,5}))?"
    r"|(?P<v4>[0-9.]+)(?::(?P<port4>\d{1,5}))?"
    r"|(?P<v6>[0-9A-Fa-f:.]+)"
)


def parse_ip(text: str) -> IPAddress | None:
    """An IP address, IPv4-mapped IPv6 as IPv4; None if *text* is not one."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            return None
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
    return address


def parse_node(text: str) -> IPAddress | None:
    """A hop as proxies write it: ``192.0.2.1``, ``192.0.2.1:80``, ``[2001:db8::1]:80``..."""
    m = _NODE.fullmatch(text.strip())
    if m is None or int(m["port4"] or m["port6"] or 0) > 65535:
        return None
    if m["v4"] is not None:
        return parse_ip(m["v4"])
    v6 = m["bracketed"] or m["v6"]
    return parse_ip(v6) if ":" in v6 else None


def _forwarded_for(element: str) -> str | None:
    """The ``for`` parameter of one ``Forwarded`` element; None if it is malformed."""
    found = None
    for pair in element.split(";"):
        m = _PAIR.fullmatch(pair.strip())
        if m is None:
            return None
        if m.group(1).lower() == "for":
            found = m.group(2).strip('"')
    return found


class ClientAddresses:
    """Finds a request's client address, trusting headers from *trusted* peers only."""

    def __init__(self, trusted: Iterable[str] = (), header: str = "X-Forwarded-For") -> None:
        self._trusted = [ipaddress.ip_network(cidr, strict=False) for cidr in trusted]
        self._header = header.lower()
        if self._header not in HEADERS:
            raise ValueError(f"{header!r} is not X-Forwarded-For or Forwarded")

    def _is_trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self._trusted)

    def _hops(self, headers: Headers) -> Sequence[str | None]:
        """The header's hops, left to right, the last :data:`MAX_HOPS` only."""
        # Bytes, read as Latin-1: a stray octet must not fail the request.
        values = [v.decode("latin-1") for v in headers.getRawHeaders(self._header.encode()) or []]
        elements = ",".join(values).split(",")[-MAX_HOPS:]
        if self._header == "forwarded":
            return [_forwarded_for(element) for element in elements]
        return list(elements)

    def client(self, peer: str, headers: Headers) -> str:
        """The client's address for a request that came from *peer* with *headers*."""
        address = parse_ip(peer)
        if address is None or not self._trusted or not self._is_trusted(address):
            return peer
        for hop in reversed(self._hops(headers)):
            found = parse_node(hop) if hop is not None else None
            if found is None:
                break
            address = found
            if not self._is_trusted(found):
                break
        return str(address)
