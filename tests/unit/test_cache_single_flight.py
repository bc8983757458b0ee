"""Concurrent requests sharing one upstream request."""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError, Deferred

from dockmirror.shared import SingleFlight


def test_callers_share_one_run_and_its_result():
    flights = SingleFlight()
    started: list[Deferred[str]] = []

    async def fetch() -> str:
        d: Deferred[str] = Deferred()
        started.append(d)
        return await d

    first = flights.run("k", fetch)
    second = flights.run("k", fetch)
    other = flights.run("other", fetch)
    assert len(started) == 2
    first.cancel()  # one client leaves; the run goes on for the other
    started[0].callback("body")
    assert second.result == "body"
    first.addErrback(lambda f: f.trap(CancelledError))
    third = flights.run("k", fetch)  # a new run once the last one ended
    assert len(started) == 3
    started[2].errback(ValueError("upstream down"))
    with pytest.raises(ValueError):
        third.result.raiseException()
    third.addErrback(lambda f: None)
    started[1].callback("x")
    assert other.result == "x"
