"""Range requests on cached blobs."""

from __future__ import annotations

import pytest

from dockmirror.errors import RegistryError
from dockmirror.pull.ranges import parse_range


@pytest.mark.parametrize(
    "header, span",
    [
        (None, None),
        ("bytes=0-9", (0, 10)),
        ("bytes=10-", (10, 100)),
        ("bytes=-10", (90, 100)),
        ("bytes=-1000", (0, 100)),
        ("bytes=90-1000", (90, 100)),
        ("bytes=0-1,5-6", None),
        ("items=0-1", None),
        ("bytes=a-b", None),
        ("bytes=-", None),
        ("Bytes=0-9", (0, 10)),
        # Invalid ranges are ignored, not refused (RFC 9110 14.2).
        ("bytes=5-4", None),
        ("bytes=5-3", None),
        ("bytes=-5-3", None),
        ("bytes=+1-2", None),
        ("bytes=1-+2", None),
        ("bytes= 1-2,", None),
        ("bytes=١-٢", None),
        ("bytes=0-" + "9" * 5000, None),
        ("bytes=" + "9" * 21 + "-", None),
    ],
)
def test_parse_range(header, span):
    assert parse_range(header, 100) == span


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=100-200", "bytes=-0"])
def test_unsatisfiable_ranges(header):
    with pytest.raises(RegistryError) as info:
        parse_range(header, 100)
    assert info.value.status == 416
    assert info.value.headers == {"Content-Range": "bytes */100"}
