"""What the bench looks at inside the engine: phase times, window outputs and stage signals.

A :class:`Probe` is the observer the bench builds its separators with: off by default, it times
the engine's phases inside :meth:`Probe.timing` and keeps every window's last-stage output inside
:meth:`Probe.recording`. :func:`stage_mixes` and :func:`last_stage` give the signals the network
is fed and what it puts out, for the bench to compare with the model's own paths.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import numpy as np
import torch

from model import STEMS
from pipeline.bench.process import synchronize
from pipeline.separator import Observer, Separator
from pipeline.separator.sources import ArraySource, checked_audio


class Probe(Observer):
    """Seconds spent in each phase of the engine, and the windows it put out, when asked.

    Each phase's time is its own (a phase entered inside another pauses the outer one), and the
    device is synchronised whenever a phase ends, so that asynchronous GPU work is charged to the
    phase that queued it. While timing, the engine runs serially (everything in the calling
    thread), and that synchronisation serialises host and device: a separation timed this way
    is slower than one without, and only its proportions are meaningful."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}
        self.windows: list[torch.Tensor] = []
        self._timing = self._recording = False
        self._stack: list[str] = []
        self._mark = 0.0

    @property
    def serial(self) -> bool:  # type: ignore[override]
        return self._timing

    @contextlib.contextmanager
    def timing(self) -> Iterator[dict[str, float]]:
        """Time the phases of the separations inside the block; yields the seconds per phase."""
        self.seconds, self._timing = {}, True
        try:
            yield self.seconds
        finally:
            self._timing = False

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[torch.Tensor]]:
        """Keep the window outputs of the separations inside the block (yielded, in order)."""
        self.windows, self._recording = [], True
        try:
            yield self.windows
        finally:
            self._recording = False

    @property
    def current(self) -> str | None:
        """The phase being timed now (the innermost), or None between phases."""
        return self._stack[-1] if self._stack else None

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self._timed(name) if self._timing else contextlib.nullcontext()

    def window(self, source: str, segment: torch.Tensor) -> None:
        if self._recording:
            self.windows.append(segment)

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        self._switch()
        self._stack.append(name)
        try:
            yield
        finally:
            synchronize(self.device)
            self._switch()
            self._stack.pop()

    def _switch(self) -> None:
        now = time.perf_counter()
        if self._stack:
            top = self._stack[-1]
            self.seconds[top] = self.seconds.get(top, 0.0) + now - self._mark
        self._mark = now


def stage_mixes(separator: Separator, audio: np.ndarray, sample_rate: int) -> list[np.ndarray]:
    """The normalised per-stage signals (channels, length * 2**i) the network is given."""
    source = ArraySource(checked_audio(audio, sample_rate), sample_rate)
    with contextlib.ExitStack() as resources:
        _, feed, _ = separator.engine.open_feed(source, resources)
        feed.ensure(feed.length)
        return [
            feed.window(None, 0, feed.length, stage).cpu().numpy()
            for stage in range(len(separator.stage_rates))
        ]


def last_stage(
    separator: Separator, probe: Probe, audio: np.ndarray, sample_rate: int
) -> np.ndarray:
    """The windowed network output at the last stage's rate, (channels, 4, length * 2**s),
    before resampling and scaling (``probe`` is ``separator``'s observer)."""
    with probe.recording() as segments:
        separator.separate(audio, sample_rate)
    return torch.cat(segments, dim=-1).cpu().numpy()


def stem_agreement(reference: np.ndarray, estimate: np.ndarray) -> dict[str, float]:
    """SDR in dB of ``estimate`` against ``reference``, both (channels, 4, samples), per stem
    over all channels: 10 log10(|reference|² / |reference - estimate|²), capped at 200 dB."""
    if reference.shape != estimate.shape:
        raise ValueError(f"shapes differ: {reference.shape} and {estimate.shape}")
    reference, estimate = reference.astype(np.float64), estimate.astype(np.float64)
    signal = (reference**2).sum(axis=(0, 2))
    error = ((reference - estimate) ** 2).sum(axis=(0, 2))
    ratio = signal / np.maximum(error, signal * 1e-20 + 1e-300)
    return {stem: float(10 * np.log10(r)) for stem, r in zip(STEMS, ratio, strict=True)}
