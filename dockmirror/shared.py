"""Results that concurrent requests wait for together."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

T = TypeVar("T")


class Event(Generic[T]):
    """A result that many may wait for; cancelling one wait leaves the others."""

    def __init__(self) -> None:
        self._waiting: list[Deferred[T]] = []
        self._result: T | Exception | None = None
        self.fired = False

    def wait(self) -> Deferred[T]:
        if self.fired:
            if isinstance(self._result, Exception):
                return fail(self._result)
            return succeed(self._result)  # type: ignore[arg-type]
        d: Deferred[T] = Deferred(self._waiting.remove)
        self._waiting.append(d)
        return d

    def fire(self, result: T | Exception) -> None:
        """Give every waiter *result*, or fail them with it if it is an exception."""
        if self.fired:
            return
        self.fired, self._result = True, result
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if isinstance(result, Exception):
                d.errback(result)
            else:
                d.callback(result)


class SingleFlight:
    """At most one run of a coroutine per key; concurrent callers share its result.

    The run belongs to no caller: one that stops waiting (its client went
    away) leaves it running for the others.
    """

    def __init__(self) -> None:
        self._running: dict[Hashable, Event[Any]] = {}

    def __repr__(self) -> str:
        return f"<SingleFlight {len(self._running)} running>"

    def run(self, key: Hashable, start: Callable[[], Coroutine[Any, Any, T]]) -> Deferred[T]:
        event = self._running.get(key)
        if event is None:
            event = self._running[key] = Event()
            Deferred.fromCoroutine(start()).addBoth(self._finished, key, event)
        return event.wait()

    def _finished(self, result: Any, key: Hashable, event: Event[Any]) -> None:
        del self._running[key]
        event.fire(result.value if isinstance(result, Failure) else result)
