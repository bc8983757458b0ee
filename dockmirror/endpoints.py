"""The endpoints of one upstream: its URL, then its mirrors, each behind a circuit breaker.

A request goes to the first endpoint whose breaker lets it through, and
moves on to the next one when that endpoint cannot be reached, times out, or
answers 5xx or 429.  An endpoint that failed is skipped for a backoff period
that doubles with each failure (up to :data:`BACKOFF_MAX`); once it is over,
one request probes the endpoint again.  When every endpoint is backing off,
each is tried all the same, in order: a request is never refused unasked.
Worker processes tell each other when an endpoint fails or comes back, so
one worker finding it down spares the others their own failed request.

A tag is believed only from the primary and the mirrors with ``trust_tags``;
a blob or a manifest by digest may come from any endpoint, since its digest
is checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IResponse

from dockmirror._interfaces import INotifier
from dockmirror.metrics import Metrics
from dockmirror.reference import is_digest
from dockmirror.upstream import UpstreamClient, UpstreamError, discard

log = Logger()

#: Seconds an endpoint is skipped after its first failure; doubled after each next one.
BACKOFF_FIRST = 5.0
#: The longest an endpoint is skipped before it is probed again.
BACKOFF_MAX = 300.0

#: What a worker tells the others of an endpoint: [upstream, endpoint, failures, backoff],
#: no failures being an endpoint back, or [upstream, endpoint, "probing", seconds].
BREAKER_TOPIC = "breaker"
#: Seconds the other workers leave an endpoint to a worker's probe of it (it may die).
PROBE_WINDOW = 60.0
#: The most failures counted, as heard from another worker.
MAX_FAILURES = 1 << 20

CLOSED, OPEN, PROBING = "closed", "open", "half-open"
#: The value of ``dockmirror_upstream_endpoint_state`` for each state.
STATE_VALUES = {CLOSED: 0, PROBING: 1, OPEN: 2}


class Breaker:
    """The circuit breaker of one endpoint."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.failures = 0
        self.open_until = 0.0
        self.probing = False
        #: Until when another process probes the endpoint.
        self.probed_elsewhere_until = 0.0

    @property
    def state(self) -> str:
        if self.failures == 0:
            return CLOSED
        return PROBING if self.probing else OPEN

    def available(self) -> bool:
        """Whether the endpoint is up, or due for a probe that nobody has taken."""
        if self.failures == 0:
            return True
        now = self._clock.seconds()
        return not self.probing and now >= max(self.open_until, self.probed_elsewhere_until)

    def admit(self) -> bool:
        """Whether a request may go to the endpoint now, taking the probe if one is due."""
        if self.failures == 0:
            return True
        if not self.available():
            return False
        self.probing = True
        return True

    def release(self) -> None:
        """A probe ended with no verdict (cancelled): the next request probes again."""
        self.probing = False

    def failed_elsewhere(self, failures: int, backoff: float) -> None:
        """Another process found the endpoint failing: skip it as long as it does."""
        self.failures = max(self.failures, failures)
        self.open_until = max(self.open_until, self._clock.seconds() + backoff)
        self.probed_elsewhere_until = 0.0

    def probing_elsewhere(self, seconds: float) -> None:
        """Another process probes the endpoint: leave it the probe for *seconds* at most."""
        self.probed_elsewhere_until = self._clock.seconds() + seconds

    def succeeded(self) -> None:
        self.failures = 0
        self.probing = False
        self.probed_elsewhere_until = 0.0

    def failed(self) -> float:
        """Open (again); the seconds until the next probe."""
        self.failures += 1
        self.probing = False
        backoff = min(BACKOFF_FIRST * 2 ** min(self.failures - 1, 16), BACKOFF_MAX)
        self.open_until = self._clock.seconds() + backoff
        return backoff

    def reset(self) -> None:
        self.failures = 0
        self.probing = False
        self.open_until = 0.0
        self.probed_elsewhere_until = 0.0


@dataclass
class Endpoint:
    """One URL of an upstream, with its own client (and so its own credentials)."""

    client: UpstreamClient
    primary: bool
    trust_tags: bool
    breaker: Breaker
    label: str = field(init=False)

    def __post_init__(self) -> None:
        self.label = host_port(self.client.base_url)

    def describe(self, now: float) -> str:
        state = self.breaker.state
        if state == OPEN:
            wait = max(self.breaker.open_until - now, 0.0)
            return f"{self.label} open ({self.breaker.failures} failures, probed in {wait:.0f}s)"
        return f"{self.label} {state}"


def host_port(url: str) -> str:
    """``host:port`` of *url*, its label in metrics."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def by_digest(path: str) -> bool:
    """Whether *path* asks for content named by its digest (``blobs/…``, ``manifests/…``)."""
    kind, _, reference = path.partition("/")
    return kind in ("blobs", "manifests") and is_digest(reference)


def _failed(response: IResponse) -> bool:
    return response.code == 429 or response.code >= 500


class EndpointSet:
    """The endpoints of one upstream, in the order they are tried."""

    def __init__(
        self, upstream: str, endpoints: list[Endpoint], clock: IReactorTime, metrics: Metrics
    ) -> None:
        self.upstream = upstream
        self.endpoints = endpoints
        self._clock = clock
        self._metrics = metrics
        self._notifier: INotifier | None = None
        for endpoint in endpoints:
            self._show(endpoint)

    def share(self, notifier: INotifier) -> None:
        """Tell the other processes when an endpoint fails or is back, and hear of theirs."""
        self._notifier = notifier
        notifier.subscribe(BREAKER_TOPIC, self._heard)

    def _tell(self, endpoint: Endpoint, seconds: float, what: str | None = None) -> None:
        """Tell the others of *endpoint*: its failures (by default) and backoff, or *what*."""
        if self._notifier is not None:
            what = str(endpoint.breaker.failures) if what is None else what
            self._notifier.publish(
                BREAKER_TOPIC, [self.upstream, endpoint.label, what, str(seconds)]
            )

    def _heard(self, message: list[str]) -> None:
        """Another process's news of an endpoint; checked like any input."""
        if len(message) != 4 or message[0] != self.upstream:
            return
        _, label, failures_text, backoff_text = message
        endpoint = next((e for e in self.endpoints if e.label == label), None)
        probing = failures_text == "probing"
        try:
            failures, backoff = 0 if probing else int(failures_text), float(backoff_text)
        except ValueError:
            return
        limit = PROBE_WINDOW if probing else BACKOFF_MAX
        if endpoint is None or not (0 <= failures <= MAX_FAILURES and 0 <= backoff <= limit):
            return
        if probing:
            endpoint.breaker.probing_elsewhere(backoff)
            return
        if failures == 0:
            if endpoint.breaker.state != CLOSED:
                log.info(
                    "upstream {upstream}: endpoint {endpoint} is back, says another worker",
                    upstream=self.upstream,
                    endpoint=label,
                )
                endpoint.breaker.succeeded()
        else:
            endpoint.breaker.failed_elsewhere(failures, backoff)
            log.info(
                "upstream {upstream}: endpoint {endpoint} failed in another worker;"
                " skipped for {backoff:.0f}s",
                upstream=self.upstream,
                endpoint=label,
                backoff=backoff,
            )
        self._show(endpoint)

    def __repr__(self) -> str:
        now = self._clock.seconds()
        states = ", ".join(e.describe(now) for e in self.endpoints)
        return f"<endpoints of {self.upstream}: {states}>"

    def status(self) -> dict[str, Any]:
        """Each endpoint's state, for ``/healthz``."""
        now = self._clock.seconds()
        result: dict[str, Any] = {}
        for e in self.endpoints:
            entry: dict[str, Any] = {"state": e.breaker.state, "trust_tags": e.trust_tags}
            if e.breaker.state == OPEN:
                entry["failures"] = e.breaker.failures
                entry["retry_in"] = round(max(e.breaker.open_until - now, 0.0), 1)
            result[e.label] = entry
        return result

    def reset(self) -> str:
        """Close every breaker: each endpoint is tried again at the next request."""
        for endpoint in self.endpoints:
            endpoint.breaker.reset()
            self._show(endpoint)
        return repr(self)

    def _show(self, endpoint: Endpoint) -> None:
        self._metrics.endpoint_state.labels(self.upstream, endpoint.label).set(
            STATE_VALUES[endpoint.breaker.state]
        )

    async def request(
        self,
        method: str,
        repository: str,
        path: str,
        headers: dict[str, str] | None = None,
        params: list[tuple[str, str]] | None = None,
    ) -> IResponse:
        """Send a request to the first endpoint that answers it usably.

        The answer of the last endpoint tried is returned even if it is a
        5xx or 429, so the caller can tell an outage from a rate limit.
        """
        candidates = [e for e in self.endpoints if by_digest(path) or e.primary or e.trust_tags]
        available = [e for e in candidates if e.breaker.available()]
        errors: list[str] = []
        error: UpstreamError | None = None
        held: IResponse | None = None  # the last 5xx or 429, returned if nothing better comes
        for endpoint in available or candidates:
            if available and not endpoint.breaker.admit():
                continue  # another request took the probe meanwhile
            if endpoint.breaker.probing:
                self._show(endpoint)
                self._tell(endpoint, PROBE_WINDOW, "probing")
            try:
                response = await endpoint.client.request(method, repository, path, headers, params)
            except UpstreamError as e:
                self._failure(endpoint, str(e))
                errors.append(f"{endpoint.label}: {e}")
                error = e
                continue
            except BaseException:
                endpoint.breaker.release()
                self._show(endpoint)
                if held is not None:
                    discard(held)
                raise
            if held is not None:
                discard(held)
                held = None
            if _failed(response):
                self._failure(endpoint, f"answered {response.code}")
                held = response
                continue
            self._success(endpoint)
            return response
        if held is not None:
            return held
        if error is None:
            raise UpstreamError(f"every endpoint of {self.upstream} is backing off")
        message = str(error) if len(errors) == 1 else "; ".join(errors)
        raise UpstreamError(message, error.status) from error

    def _success(self, endpoint: Endpoint) -> None:
        if endpoint.breaker.state != CLOSED:
            log.info(
                "upstream {upstream}: endpoint {endpoint} is back",
                upstream=self.upstream,
                endpoint=endpoint.label,
            )
            endpoint.breaker.succeeded()
            self._tell(endpoint, 0.0)
        self._show(endpoint)

    def _failure(self, endpoint: Endpoint, error: str) -> None:
        backoff = endpoint.breaker.failed()
        self._metrics.endpoint_failures.labels(self.upstream, endpoint.label).inc()
        self._show(endpoint)
        self._tell(endpoint, backoff)
        if len(self.endpoints) == 1:
            return  # the request's own error says it; there is nothing to skip to
        log.warn(
            "upstream {upstream}: endpoint {endpoint} failed ({error}); skipped for {backoff:.0f}s",
            upstream=self.upstream,
            endpoint=endpoint.label,
            error=error,
            backoff=backoff,
        )
