"""What the readers of a blob being filled see, whoever fills it."""

from __future__ import annotations

from collections.abc import Callable

from dockmirror.shared import Event


class FillProgress:
    """How far a fill of *digest* got, and its changes, for the readers following it.

    :attr:`ready` fires once there is a file to read; :attr:`finished` once
    the blob is committed, or fails with the reason it is not.  Listeners
    hear of every change of :attr:`written` and of :attr:`verified`, which
    lets readers send the last byte.
    """

    def __init__(self, digest: str, size: int, temp_path: str) -> None:
        self.digest = digest
        self.size = size
        self.temp_path = temp_path
        self.ready: Event[None] = Event()
        self.finished: Event[None] = Event()
        #: Bytes in the temporary file, readable by followers.
        self.written = 0
        #: The whole body is written and matches the digest: readers may finish.
        self.verified = False
        self.committed = False
        self.error: Exception | None = None
        self._listeners: list[Callable[[], None]] = []

    @property
    def done(self) -> bool:
        return self.committed or self.error is not None

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener()
