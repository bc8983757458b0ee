"""JSON sent by others (upstreams, token services, identity providers, clients).

Python's parser recurses once per nested array or object, so a small
document of nothing but ``[`` raises :class:`RecursionError`, which no
caller expects.  :func:`loads` turns that into the :class:`ValueError`
every caller already handles as "not JSON".
"""

from __future__ import annotations

import json
from typing import Any


def loads(text: bytes | str) -> Any:
    """``json.loads``; ValueError for malformed JSON, and for JSON nested too deeply."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
