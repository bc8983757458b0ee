"""Suite-wide settings: the strict switch CI runs under.

With ``DOCKMIRROR_TEST_STRICT=1`` (``.ci/run`` sets it) a skipped test is a
failure: a missing ``docker-registry``, ``skopeo``, ``ssh``, ``systemd-analyze``,
root or mount namespaces must fail the run rather than shrink it.  Expected
failures (``xfail``) stay what they are.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

STRICT = os.environ.get("DOCKMIRROR_TEST_STRICT", "") not in ("", "0")


def pytest_report_header() -> str:
    return "DOCKMIRROR_TEST_STRICT: " + ("on, skips fail" if STRICT else "off, skips allowed")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[Any]:
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under DOCKMIRROR_TEST_STRICT, where nothing may skip: {reason}"
