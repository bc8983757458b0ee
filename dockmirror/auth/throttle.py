"""Throttling of repeated login failures."""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict, deque

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()

#: Failures allowed within the window; further attempts are refused.
LIMIT = 10
WINDOW = 60.0
#: Subjects (networks, appIds) tracked at most; the least recently failed go first.
MAX_TRACKED = 100_000


def client_subject(host: str) -> str:
    """The throttling subject for a client address: an IPv6 client by its /64."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"client {host}"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"client {address.ipv4_mapped}"
        return f"client {ipaddress.IPv6Network((address, 64), strict=False)}"
    return f"client {address}"


class Throttle:
    """Counts failures per subject in a sliding window.

    Once a subject has :data:`LIMIT` failures within :data:`WINDOW` seconds,
    attempts are refused until the oldest of them leaves the window.  Refused
    attempts are not failures, so the wait never grows past the window.
    """

    def __init__(
        self,
        clock: IReactorTime,
        limit: int = LIMIT,
        window: float = WINDOW,
        max_tracked: int = MAX_TRACKED,
        event: str = "failed to log in",
    ) -> None:
        self._clock = clock
        self._event = event
        self.limit = limit
        self.window = window
        self._max_tracked = max_tracked
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, subject: str, now: float) -> deque[float] | None:
        times = self._failures.get(subject)
        if times is not None:
            while times and times[0] <= now - self.window:
                times.popleft()
        return times

    def retry_after(self, *subjects: str) -> int | None:
        """Seconds to wait before any of *subjects* may try again; None: go ahead."""
        now = self._clock.seconds()
        waits = []
        for subject in subjects:
            times = self._recent(subject, now)
            if times is not None and len(times) >= self.limit:
                waits.append(times[-self.limit] + self.window - now)
        return max(1, math.ceil(max(waits))) if waits else None

    def failed(self, *subjects: str) -> None:
        """Count a failure against each of *subjects*."""
        now = self._clock.seconds()
        for subject in subjects:
            times = self._recent(subject, now)
            if times is None:
                times = self._failures[subject] = deque(maxlen=self.limit)
            times.append(now)
            self._failures.move_to_end(subject)
            if len(times) == self.limit:
                log.warn(
                    "{subject} {event} {limit} times within {window:.0f}s; throttling it",
                    subject=subject,
                    event=self._event,
                    limit=self.limit,
                    window=self.window,
                )
        self._forget(now)

    def _forget(self, now: float) -> None:
        """Drop subjects whose last failure left the window, and the excess."""
        while self._failures:
            subject, times = next(iter(self._failures.items()))
            if len(self._failures) <= self._max_tracked and times[-1] > now - self.window:
                break
            del self._failures[subject]
