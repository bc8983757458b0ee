"""Throttling of repeated login failures.

appIds are not secret (they are in logs and in clients' config files), so a
failure counts against the address it came from, never against the key
alone: an attacker who knows a victim's appId throttles their own address,
not the victim.  See :class:`LoginThrottle`.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict, deque

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from dockmirror._interfaces import INotifier

log = Logger()

#: Failures allowed within the window; further attempts are refused.
LIMIT = 10
WINDOW = 60.0
#: Subjects tracked at most per kind; the least recently failed go first.
MAX_TRACKED = 100_000
#: Failures from one address (an IPv6 /64), whatever the appIds.
ADDRESS_LIMIT = 30
#: Failures for one appId from all addresses: reached only by many addresses at once.
APP_ID_CEILING = 300
#: appIds tracked at most for the ceiling.
MAX_APP_IDS = 10_000
#: The characters of an appId that name it here.
APP_ID_SHOWN = 80
#: What workers tell each other of a failed login: [appId, address].
FAILED_TOPIC = "login-failed"


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
        action: str = "throttling it",
        event: str = "failed to log in",
    ) -> None:
        self._clock = clock
        self._action = action
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

    def failures(self, subject: str) -> int:
        """Failures of *subject* within the window (at most :attr:`limit`)."""
        times = self._recent(subject, self._clock.seconds())
        return len(times) if times is not None else 0

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
                    "{subject} {event} {limit} times within {window:.0f}s; {action}",
                    subject=subject,
                    event=self._event,
                    action=self._action,
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


class LoginThrottle:
    """Login failures counted per (appId, address), per address and per appId.

    An attempt is refused (before the key is checked) when its address has
    :data:`ADDRESS_LIMIT` failures within the window, or its (appId,
    address) pair :data:`LIMIT`.  An appId with :data:`APP_ID_CEILING`
    failures from all addresses together is under a distributed attack: it
    is logged, and then any address that has failed with that appId even
    once is refused.  An address that has not been failing is never refused,
    so the right key from it always gets through.

    With a *notifier*, failures are counted in every worker process: each
    tells the others of its own, and counts theirs.
    """

    def __init__(
        self, clock: IReactorTime, window: float = WINDOW, notifier: INotifier | None = None
    ) -> None:
        self.pairs = Throttle(clock, LIMIT, window, MAX_TRACKED)
        self.addresses = Throttle(clock, ADDRESS_LIMIT, window, MAX_TRACKED)
        self.app_ids = Throttle(
            clock,
            APP_ID_CEILING,
            window,
            MAX_APP_IDS,
            "from many addresses (a distributed attack?); refusing every address"
            " that failed with it, while the right key from others still logs in",
        )
        self._notifier = notifier
        if notifier is not None:
            notifier.subscribe(FAILED_TOPIC, self._heard)

    def retry_after(self, app_id: str, address: str) -> int | None:
        """Seconds before *address* may try to log in as *app_id* again; None: go ahead."""
        network, pair, key = _subjects(app_id, address)
        wait = self.pairs.retry_after(pair)
        wait = _later(wait, self.addresses.retry_after(network))
        if self.pairs.failures(pair):
            wait = _later(wait, self.app_ids.retry_after(key))
        return wait

    def failed(self, app_id: str, address: str) -> None:
        """Count a failed login as *app_id* from *address*."""
        self._count(app_id, address)
        if self._notifier is not None:
            self._notifier.publish(FAILED_TOPIC, [app_id[:APP_ID_SHOWN], address])

    def _heard(self, message: list[str]) -> None:
        """Count a failure that another worker saw."""
        if len(message) == 2 and len(message[0]) <= APP_ID_SHOWN and len(message[1]) <= 100:
            self._count(*message)

    def _count(self, app_id: str, address: str) -> None:
        network, pair, key = _subjects(app_id, address)
        self.pairs.failed(pair)
        self.addresses.failed(network)
        self.app_ids.failed(key)


def _subjects(app_id: str, address: str) -> tuple[str, str, str]:
    network = client_subject(address)
    key = f"appId {app_id[:APP_ID_SHOWN]!r}"
    return network, f"{key} from {network}", key


def _later(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)
