"""Watching the engine from outside: phases, forward passes and windows, told to an observer.

The engine tells its :class:`Observer` (given when a separator is built) when each phase of its
work starts and ends, and hands it every window's last-stage output; the observer does nothing by
default. What measures (a phase clock, an op counter) lives with the bench; :class:`ForwardTimer`
is here because the catalog's workers use it too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PHASES = ("decode", "resample_in", "network", "resample_out", "encode")
_NOTHING = contextlib.nullcontext()


class Observer:
    """Told of the engine's phases; the base class observes nothing.

    ``serial`` asks the engine to do all of a call's work in the calling thread (first passes,
    read-ahead, encoding), for an observer that times phases and is not thread-safe."""

    serial = False

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        """A context around the engine's work in phase ``name`` (one of :data:`PHASES`)."""
        return _NOTHING

    def window(self, source: str, segment: torch.Tensor) -> None:
        """One window's segment of a track's network output, (channels, 4, n) at the last
        stage's rate, in time order."""


class ForwardTimer(Observer):
    """Device time of the forward passes, from CUDA events around each (no synchronisation:
    :meth:`take` waits for the last one only). Observes nothing on other devices."""

    def __init__(self, device: torch.device) -> None:
        self._on_cuda = torch.device(device).type == "cuda"
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self._timed() if name == "network" and self._on_cuda else _NOTHING

    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        started = torch.cuda.Event(enable_timing=True)
        started.record()
        yield
        ended = torch.cuda.Event(enable_timing=True)
        ended.record()
        self._events.append((started, ended))

    def take(self) -> float | None:
        """Seconds of forward passes since the last call (None off CUDA)."""
        if not self._on_cuda:
            return None
        if self._events:
            self._events[-1][1].synchronize()
        seconds = sum(start.elapsed_time(end) for start, end in self._events) / 1000
        self._events.clear()
        return seconds
