"""The engine's threads and what crosses them, each stopped by the one that owns it.

Every thread here has an owner that stops it in a ``with`` or ``finally``: a :class:`ReadAhead`
is closed by the track (or the pass) that opened it, a pool by the call that made it (:func:`thread_pool`). Nothing is left for the garbage collector to stop: a pool inside an
abandoned generator, finalised at an arbitrary moment, once deadlocked a whole process (a thread
being started held the lock that the finaliser's ``join`` needed).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch


class Once:
    """``function()`` computed by the first caller, in any thread; later callers wait for that
    and get the same result (or the same exception)."""

    def __init__(self, function: Callable[[], Any]) -> None:
        self._function, self._lock, self._outcome = function, threading.Lock(), None

    def __call__(self) -> Any:
        with self._lock:
            if self._outcome is None:
                try:
                    self._outcome = (True, self._function())
                except Exception as error:
                    self._outcome = (False, error)
        succeeded, value = self._outcome
        if not succeeded:
            raise value
        return value


class Download:
    """A device tensor copied to the host asynchronously (pinned, with an event on CUDA);
    :meth:`numpy` waits for that copy only."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._event = None
        if tensor.device.type != "cuda":
            self._host = tensor.cpu()
            return
        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def numpy(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        return self._host.numpy()


class Inline:
    """An executor that runs each task at once, in the calling thread (for a serial observer)."""

    def submit(self, function: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(function(*args))
        except Exception as error:
            future.set_exception(error)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


class ReadAhead:
    """Blocks of an iterator, each read in a thread of its own while the caller works on the one
    before (decoding overlaps the device's work). One read is in flight at a time.

    Use it in a ``with`` block, or call :meth:`close` from a ``finally``: closing waits for the
    read in flight and stops the thread, so the source is never read after it is closed."""

    def __init__(self, blocks: Iterator[np.ndarray]) -> None:
        self._blocks = blocks
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="metasep-read")
        self._pending: Future | None = self._reader.submit(next, blocks, None)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        if self._pending is None:
            raise StopIteration
        block = self._pending.result()
        self._pending = None if block is None else self._reader.submit(next, self._blocks, None)
        if block is None:
            raise StopIteration
        return block

    def close(self) -> None:
        self._pending = None
        self._reader.shutdown(wait=True, cancel_futures=True)
        finish = getattr(self._blocks, "close", None)  # a generator's: closed here, not by gc
        if finish is not None:
            finish()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def thread_pool(threads: int, serial: bool, name: str) -> Iterator[ThreadPoolExecutor | Inline]:
    """A pool of ``threads`` for one call's work (inline when ``serial``). Leaving it cancels
    the tasks not yet started and waits for those running, also when the call failed."""
    pool = Inline() if serial else ThreadPoolExecutor(max(1, threads), f"metasep-{name}")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def encode_threads(outputs: int) -> int:
    """Threads of the encoding pool: every core, and at least one per output file."""
    return max(outputs, os.cpu_count() or 1)
