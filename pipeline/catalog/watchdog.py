"""The watchdog of a catalog run: stalled tracks become error rows, and a run ends on time.

Workers tell a :class:`RunBoard` (a small Ray actor of the run) when a call starts, and beat
while their engine makes progress (:class:`Heartbeat`, driven by :class:`Progress`, the engine's
observer). The driver's :class:`Watchdog` thread asks the board which calls made no progress for
the stall timeout: their tracks are marked stalled and their worker is killed, so that Ray
replaces it; the retried call then refuses the stalled tracks (an error row each, "stalled: no
progress for N s") and separates the rest. At the run's deadline the board stops: busy workers
are killed and every later call refuses its tracks as not started, for the next run to do.

A worker stopped as a whole (``SIGSTOP``, a frozen VM) cannot beat: that is what the driver
notices. Time in which a worker's process could not run at all is left out of its model time.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import torch

from pipeline.periodic import Periodic
from pipeline.separator import ForwardTimer

log = logging.getLogger(__name__)

STOPPED = "stopped: the run reached its time limit before this track"
# Stall timeouts by device: a CPU's forward pass over a 34 s window of the paper's model takes
# about half a minute on two cores; a GPU's first call compiles its kernels for a minute or two.
STALL_TIMEOUT = {"cpu": 900.0, "cuda": 600.0}
LATE = 1.0  # seconds a sleeping thread's tick may come late before its process counts as frozen


class RunBoard:
    """What the workers of one run are doing (a Ray actor: create it with ``ray.remote``).

    Times are the board's own monotonic clock, so the clocks of the workers' machines do not
    matter."""

    def __init__(self) -> None:
        self._workers: dict[str, Any] = {}  # every worker that started: its actor handle
        self._calls: dict[str, tuple[Any, list[str], float]] = {}  # worker: handle, tracks, beat
        self._refused: dict[str, str] = {}  # track_id -> why it is not to be separated
        self._stopped = False

    def register(self, worker: str, handle: Any) -> None:
        """A worker's actor is up (busy or not, the run's end stops it)."""
        self._workers[worker] = handle

    def start(self, worker: str, handle: Any, track_ids: list[str]) -> dict[str, str]:
        """A call of ``worker`` (an actor ``handle``) begins on ``track_ids``; returns the tracks
        it must not separate, and why (stalled before, or the run is over)."""
        if self._stopped:
            return dict.fromkeys(track_ids, STOPPED)
        refused = {track: self._refused[track] for track in track_ids if track in self._refused}
        working = [track for track in track_ids if track not in refused]
        self._calls[worker] = (handle, working, time.monotonic())
        return refused

    def beat(self, worker: str) -> None:
        if worker in self._calls:
            handle, tracks, _ = self._calls[worker]
            self._calls[worker] = (handle, tracks, time.monotonic())

    def finish(self, worker: str) -> None:
        self._calls.pop(worker, None)

    def stale(self, seconds: float) -> list[tuple[str, Any, list[str], float]]:
        """The calls silent for more than ``seconds``: (worker, handle, tracks, idle seconds).
        Their tracks are marked stalled from now on."""
        now, found = time.monotonic(), []
        for worker, (handle, tracks, beat) in list(self._calls.items()):
            if now - beat > seconds:
                for track in tracks:
                    self._refused[track] = f"stalled: no progress for {now - beat:.0f} s"
                del self._calls[worker]
                found.append((worker, handle, tracks, now - beat))
        return found

    def stop(self) -> list[tuple[str, Any]]:
        """End the run: every later call refuses its tracks; returns every worker, so that
        none, busy or frozen with a call it never started, holds the run past its end."""
        self._stopped = True
        workers = {**self._workers, **{w: handle for w, (handle, _, _) in self._calls.items()}}
        self._calls.clear()
        return list(workers.items())


class Progress(ForwardTimer):
    """The catalog worker's observer: the device time of its forward passes (on CUDA), and a
    count of the engine's steps, which moves while its work does."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.steps = 0

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        self.steps += 1
        return super().phase(name)


class Heartbeat(Periodic):
    """For one call of a worker: every ``interval`` seconds, tell the board if the engine moved
    since the last step, and add up the time the process could not run at all (a step more than
    :data:`LATE` seconds late). Use it as a context: leaving it stops the thread."""

    def __init__(self, board: Any, worker: str, progress: Progress, interval: float) -> None:
        super().__init__(interval, self._beat, "heartbeat")
        self.board, self.worker, self.progress = board, worker, progress
        self.frozen_s = 0.0
        self._seen, self._tick = progress.steps, time.monotonic()

    def _beat(self) -> None:
        now = time.monotonic()
        if now - self._tick > self.interval + LATE:  # stopped, or its machine was: not working
            self.frozen_s += now - self._tick - self.interval
        self._tick = now
        if self.progress.steps != self._seen:
            self._seen = self.progress.steps
            self.board.beat.remote(self.worker)  # a lost beat is a late beat, no more


class Watchdog(Periodic):
    """The driver's side: every few seconds, replace the workers whose call stalled, and stop
    the run at ``deadline`` (a ``time.time()``); a context that stops its thread on exit."""

    def __init__(self, board: Any, stall_timeout: float, deadline: float | None) -> None:
        super().__init__(min(1.0, stall_timeout / 5), self._watch, "watchdog")
        self.board, self.stall_timeout, self.deadline = board, stall_timeout, deadline
        self.timed_out = False

    def _watch(self) -> None:
        import ray

        for worker, handle, tracks, idle in ray.get(self.board.stale.remote(self.stall_timeout)):
            log.warning(
                "worker %s made no progress for %.0f s on %s: replacing it",
                worker,
                idle,
                ", ".join(tracks) or "no track",
            )
            _kill(handle)
        if self.deadline is not None and not self.timed_out and time.time() > self.deadline:
            self.timed_out = True
            workers = ray.get(self.board.stop.remote())
            log.warning("time limit reached: stopping the run's %d worker(s)", len(workers))
            for _, handle in workers:
                _kill(handle)


def stall_timeout_for(device: str, given: float | None) -> float:
    """The stall timeout: as given, else the default for the workers' device type."""
    return given if given else STALL_TIMEOUT["cuda" if device.startswith("cuda") else "cpu"]


def _kill(handle: Any) -> None:
    """Kill a worker's actor so that Ray starts a new one and retries its call."""
    import ray

    with contextlib.suppress(Exception):
        ray.kill(handle, no_restart=False)
