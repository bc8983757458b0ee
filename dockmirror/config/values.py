"""What every section's values share: sizes, durations, seconds, URLs, secrets, the error."""

from __future__ import annotations

import dataclasses
import re
from fractions import Fraction
from typing import Any
from urllib.parse import SplitResult, urlsplit

from dockmirror.proxy import redact


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and file."""


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE_RE = re.compile(r" *([0-9]{1,20}(?:\.[0-9]{1,9})?) *([a-zA-Z]*) *")


def parse_size(text: str) -> int:
    """Bytes in a size such as ``"500MB"`` (decimal) or ``"5GiB"`` (binary)."""
    m = _SIZE_RE.fullmatch(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"{text!r} is not a size: use a number with B, kB, MB, GB, TB (powers of 1000)"
            ' or KiB, MiB, GiB, TiB (powers of 1024), such as "500MB" or "5GiB"'
        )
    return int(Fraction(m.group(1)) * _UNITS[unit])


def optional_size(text: str | None) -> int | None:
    """Bytes in an optional size key (checked at load); None if it is unset."""
    return None if text is None else parse_size(text)


def check_size(where: str, text: str, positive: bool = True) -> int:
    """Bytes in a size key; ConfigError names *where* (``FILE: cache.max_size``)."""
    try:
        size = parse_size(text)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if positive and size <= 0:
        raise ConfigError(f"{where} must be more than zero bytes")
    return size


_DURATION_RE = re.compile(r"(?:\d+(?:\.\d+)?[smhd])+|\d+(?:\.\d+)?")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``"6h"``, ``"1h30m"``, ``"90s"`` or ``"600"`` (seconds)."""
    text = text.strip()
    if not _DURATION_RE.fullmatch(text):
        raise ValueError(
            f"{text!r} is not a duration: use numbers with s, m, h or d, such as"
            ' "6h", "1h30m" or "90s"'
        )
    if text[-1].isdigit():
        return float(text)
    return sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(text))


#: Field metadata of a value never shown (reprs, ``--check``, the manhole).
SECRET = {"secret": True}
#: Field metadata of a URL whose password is never shown.
SECRET_URL = {"secret": "url"}


def redacted_repr(section: Any) -> str:
    """A config dataclass's repr, with the values of its secret fields shown as ``***``."""

    def shown(f: dataclasses.Field[Any]) -> str:
        value = getattr(section, f.name)
        secret = f.metadata.get("secret")
        if secret == "url" and isinstance(value, str):
            return repr(redact(value))
        return "'***'" if secret and value is not None else repr(value)

    values = ", ".join(f"{f.name}={shown(f)}" for f in dataclasses.fields(section) if f.repr)
    return f"{type(section).__name__}({values})"


#: The longest timeout accepted, in seconds.
TIMEOUT_MAX = 3600.0


def check_seconds(source: str, key: str, value: float) -> None:
    if not 0 < value <= TIMEOUT_MAX:
        raise ConfigError(
            f"{source}: {key} must be more than 0 and at most {TIMEOUT_MAX:.0f} seconds"
        )


def url_parts(url: str) -> SplitResult | None:
    """*url* split, or None if it cannot be (a bad IPv6 literal, a port that is no port)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return None
    return parts


def check_root_url(where: str, url: str, example: str) -> None:
    """*url* is an http(s) URL with no path, as a base URL; ConfigError names *where*."""
    parts = url_parts(url)
    if parts is None or parts.scheme not in ("http", "https") or parts.path not in ("", "/"):
        raise ConfigError(f'{where} must be an http(s) URL with no path, e.g. "{example}"')
