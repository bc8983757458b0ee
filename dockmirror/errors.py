"""Registry-format errors: ``{"errors": [{"code", "message", "detail"}]}``."""

from __future__ import annotations

import json
import re
from email.utils import parsedate_to_datetime
from typing import Any

#: The distribution spec's error codes, with the HTTP status each one goes with.
STATUS = {
    "BLOB_UNKNOWN": 404,
    "BLOB_UPLOAD_INVALID": 400,
    "BLOB_UPLOAD_UNKNOWN": 404,
    "DIGEST_INVALID": 400,
    "MANIFEST_BLOB_UNKNOWN": 404,
    "MANIFEST_INVALID": 400,
    "MANIFEST_UNKNOWN": 404,
    "NAME_INVALID": 400,
    "NAME_UNKNOWN": 404,
    "PAGINATION_NUMBER_INVALID": 400,
    "SIZE_INVALID": 400,
    "TAG_INVALID": 400,
    "UNAUTHORIZED": 401,
    "DENIED": 403,
    "UNSUPPORTED": 405,
    "RANGE_INVALID": 416,
    "TOOMANYREQUESTS": 429,
    "UNKNOWN": 500,
    "UNAVAILABLE": 503,
}


class RegistryError(Exception):
    """An error answered to the client in the registry's JSON format."""

    def __init__(
        self,
        code: str,
        message: str,
        detail: Any = None,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.detail = detail
        self.status = status if status is not None else STATUS.get(code, 500)
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        entry: dict[str, Any] = {"code": self.code, "message": self.message}
        entry["detail"] = self.detail if self.detail is not None else {}
        return json.dumps({"errors": [entry]}).encode()


def upstream_unavailable(upstream: str, why: str, status: int = 503) -> RegistryError:
    """The upstream could not be reached or answered with a server error."""
    return RegistryError(
        "UNAVAILABLE",
        f"upstream {upstream} is unavailable: {why}",
        {"upstream": upstream},
        status=status,
    )


#: The longest wait passed on from an upstream's ``Retry-After``, in seconds ...
RETRY_AFTER_MAX = 3600
#: ... and the wait announced when it gave none that can be used.
RETRY_AFTER_DEFAULT = 60


def retry_after(value: str | None, now: float) -> int:
    """Seconds to wait, from an upstream's ``Retry-After`` (seconds or HTTP-date).

    A missing or malformed value gives :data:`RETRY_AFTER_DEFAULT`; the
    result is at least 1 and at most :data:`RETRY_AFTER_MAX`.
    """
    value = (value or "").strip()[:64]
    if re.fullmatch(r"[0-9]+", value):
        seconds = int(value)
    else:
        try:
            seconds = int(parsedate_to_datetime(value).timestamp() - now)
        except (TypeError, ValueError, IndexError, OverflowError):
            seconds = RETRY_AFTER_DEFAULT
    return min(max(seconds, 1), RETRY_AFTER_MAX)
