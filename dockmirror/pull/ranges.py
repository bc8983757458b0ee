"""The ``Range`` header of a blob request: one range or the whole blob."""

from __future__ import annotations

import re

from dockmirror.errors import RegistryError

#: A single byte range (RFC 9110): ``first-last``, ``first-`` or ``-suffix``;
#: positions of more than 20 digits (past any blob) are not parsed.
_RANGE_RE = re.compile(r"bytes=[ \t]*([0-9]{0,20})-([0-9]{0,20})[ \t]*", re.IGNORECASE)


def range_spec(header: str | None) -> tuple[str, str] | None:
    """The first and last position of a single well-formed range; None to ignore *header*.

    Several ranges, a header that cannot be parsed, and a range whose last
    position is before its first are ignored (RFC 9110 14.2): the whole
    blob is served.
    """
    match = _RANGE_RE.fullmatch(header) if header else None
    if match is None:
        return None
    first, last = match.groups()
    if not (first or last) or (first and last and int(last) < int(first)):
        return None
    return first, last


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The [start, end) of a single-range ``Range`` header; None serves the whole blob.

    A range that starts past the end is refused with a 416.
    """
    spec = range_spec(header)
    if spec is None:
        return None
    first, last = spec
    if first:
        start = int(first)
        end = min(int(last) + 1, size) if last else size
    else:
        start, end = max(size - int(last), 0), size
    if start >= end or start >= size:
        raise RegistryError(
            "RANGE_INVALID",
            "requested range not satisfiable",
            {"size": size},
            headers={"Content-Range": f"bytes */{size}"},
        )
    return start, end
