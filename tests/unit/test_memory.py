"""The allocator's thresholds, set once the mirror's process starts."""

from __future__ import annotations

from typing import Any

import pytest

from dockmirror import memory


class FakeMallopt:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.argtypes: Any = None
        self.restype: Any = None

    def __call__(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return 1


class GlibcLike:
    def __init__(self) -> None:
        self.mallopt = FakeMallopt()

    def gnu_get_libc_version(self) -> bytes:
        return b"2.36"


class MuslLike:
    def __init__(self) -> None:
        self.mallopt = FakeMallopt()


def test_glibc_keeps_freed_chunks_for_the_next_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = GlibcLike()
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: libc)
    assert memory.tune_allocator()
    assert libc.mallopt.calls == [
        (memory.M_TRIM_THRESHOLD, memory.TRIM_THRESHOLD),
        (memory.M_MMAP_THRESHOLD, memory.MMAP_THRESHOLD),
    ]
    # Larger than any chunk of a body, small enough not to matter in a process.
    assert 1 << 20 <= memory.MMAP_THRESHOLD <= memory.TRIM_THRESHOLD <= 64 << 20


def test_another_libc_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = MuslLike()
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: libc)
    assert not memory.tune_allocator()
    assert libc.mallopt.calls == []


def test_no_libc_to_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> Any:
        raise OSError("not found")

    monkeypatch.setattr(memory.ctypes, "CDLL", missing)
    assert not memory.tune_allocator()
