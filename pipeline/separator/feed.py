"""The stage feed: a source's blocks resampled into the stage rates and normalised, as windows
need them.

A track is read twice. The first pass (:func:`measure`) finds its length and each stage signal's
mean and deviation; the second (:class:`StageFeed`) produces the normalised stage signals block by
block, keeps them while a window needs them and drops them after, so memory does not grow with
the track. Both are handed their blocks (device tensors) and their resamplers by the engine.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.audio import AudioError, StreamResampler, TorchResampler
from pipeline.separator.observe import Observer

SILENCE = 1e-5  # floor of the normalising standard deviation (about -100 dBFS)
# resample(block, last): consecutive (channels, n) device blocks resampled as one signal
Resample = Callable[[torch.Tensor, bool], torch.Tensor]


@dataclass
class Statistics:
    """What the first pass over a source finds: its length and each stage's normalisation."""

    frames: int  # source samples
    mean: torch.Tensor  # (stages, channels, 1) float32 on the device
    scale: torch.Tensor  # (stages, channels, 1): the standard deviation, floored at SILENCE
    silent: np.ndarray  # (channels,): no signal beyond a constant (silence or DC) in the source


def make_resampler(
    kind: str,
    from_rate: int,
    to_rate: int,
    channels: int,
    device: torch.device,
    pool: Executor | None = None,
) -> Resample:
    """``resample(block, last)`` of consecutive (channels, n) device blocks as one signal: soxr
    through zero-copy numpy views (``kind="soxr"``, channel groups in ``pool``), or the torch
    resampler on the device (``"torch"``)."""
    if kind == "torch":
        return TorchResampler(from_rate, to_rate, channels, device).push
    stream = StreamResampler(from_rate, to_rate, channels, pool)

    def resample(block: torch.Tensor, last: bool = False) -> torch.Tensor:
        on_host = block.cpu().numpy()
        return torch.from_numpy(stream.push(on_host, last)).to(device)

    return resample


def measure(
    name: str,
    channels: int,
    device: torch.device,
    blocks: Iterable[torch.Tensor],
    resamplers: list[Resample],
    observer: Observer,
) -> Statistics:
    """First pass: the source's length and each stage signal's mean and deviation, from its
    ``blocks`` on ``device`` and one resampler per stage."""
    # Per stage: samples (counted on the host), and the float64 sums of the samples and of
    # their squares (device tensors, replaced rather than updated in place: every op is a
    # kernel launch on a GPU, and an indexed in-place update costs several).
    counts = [0] * len(resamplers)
    zeros = torch.zeros(channels, dtype=torch.float64, device=device)
    totals, squares = [zeros] * len(resamplers), [zeros] * len(resamplers)
    low = torch.full((channels,), math.inf, device=device)
    high = torch.full((channels,), -math.inf, device=device)
    frames = 0
    empty = torch.zeros(channels, 0, device=device)
    for block in itertools.chain(blocks, [None]):
        with observer.phase("resample_in"):
            if block is not None and block.shape[1]:
                frames += block.shape[1]
                smallest, largest = torch.aminmax(block, dim=1)
                low, high = torch.minimum(low, smallest), torch.maximum(high, largest)
            for i, resampler in enumerate(resamplers):
                part = resampler(empty if block is None else block, block is None).double()
                counts[i] += part.shape[1]
                totals[i] = totals[i] + part.sum(1)
                squares[i] = squares[i] + (part * part).sum(1)
    if frames == 0:
        raise AudioError(f"{name}: no audio samples (zero-length)")
    count = torch.tensor(counts, dtype=torch.float64, device=device)[:, None]
    count = count.clamp(min=1)
    mean = torch.stack(totals) / count
    variance = (torch.stack(squares) / count - mean**2).clamp(min=0)
    scale = variance.sqrt().clamp(min=SILENCE)
    silent = ((high - low) <= SILENCE).cpu().numpy()  # constant within -100 dBFS
    return Statistics(frames, mean.float()[..., None], scale.float()[..., None], silent)


class MixtureBuffer:
    """Source-rate blocks kept from when they are read until the output has reached them."""

    def __init__(self) -> None:
        self._blocks: list[torch.Tensor] = []
        self._offset = 0  # source sample index of the first kept sample

    def append(self, block: torch.Tensor) -> None:
        self._blocks.append(block)

    def take(self, start: int, stop: int) -> torch.Tensor:
        """Samples [start, stop); everything before ``stop`` is dropped afterwards."""
        if not self._blocks:
            raise RuntimeError("internal error: mixture requested before it was read")
        data = torch.cat(self._blocks, dim=1) if len(self._blocks) > 1 else self._blocks[0]
        if start < self._offset or stop - self._offset > data.shape[1]:
            raise RuntimeError("internal error: mixture requested outside the kept span")
        part = data[:, start - self._offset : stop - self._offset]
        self._blocks = [data[:, stop - self._offset :]]
        self._offset = stop
        return part


class StageFeed:
    """The normalised per-stage signals of a source on the device, produced as windows need them
    and dropped when no window needs them any more. ``open_blocks()`` gives the source's blocks
    on the device, called when the first window needs them. ``length`` is the base-rate length the
    network runs on (the source's, padded with zeros up to the window alignment); each source
    block also goes to ``mixture`` when one is given."""

    def __init__(
        self,
        open_blocks: Callable[[], Iterator[torch.Tensor]],
        resamplers: list[Resample],
        statistics: Statistics,
        length: int,
        mixture: MixtureBuffer | None = None,
    ) -> None:
        self._open_blocks, self._resamplers = open_blocks, resamplers
        self._blocks: Iterator[torch.Tensor] | None = None
        self.length, self._mixture = length, mixture
        # Each stage's (channels, 1) views, taken once rather than indexed for every block
        self._means, self._scales = statistics.mean.unbind(), statistics.scale.unbind()
        channels = statistics.mean.shape[1]
        self._empty = torch.zeros(channels, 0, device=statistics.mean.device)
        stages = len(resamplers)
        # Each stage's signal as the blocks it was produced in (appending never copies what is
        # kept), from stage sample `_offsets[i]` on; `_held[i]` samples in all.
        self._parts: list[deque[torch.Tensor]] = [deque() for _ in range(stages)]
        self._offsets, self._held = [0] * stages, [0] * stages
        self._assembled: list[tuple[int, int, torch.Tensor] | None] = [None] * stages
        self._exhausted = False

    def ensure(self, end: int) -> None:
        """Make base-rate samples up to ``end`` available in every stage."""
        if self._blocks is None:
            self._blocks = self._open_blocks()
        while not self._exhausted and any(
            offset + held < end * 2**i
            for i, (offset, held) in enumerate(zip(self._offsets, self._held, strict=True))
        ):
            block = next(self._blocks, None)
            if block is not None and self._mixture is not None:
                self._mixture.append(block)
            self._exhausted = block is None
            for i, resample in enumerate(self._resamplers):
                part = resample(self._empty if block is None else block, block is None)
                self._append(i, (part - self._means[i]) / self._scales[i])
        if self._exhausted:  # zero padding up to the planned length, nothing beyond it
            for i, parts in enumerate(self._parts):
                size = self.length * 2**i - self._offsets[i]
                while self._held[i] > size:
                    excess = self._held[i] - size
                    if parts[-1].shape[1] <= excess:
                        self._held[i] -= parts.pop().shape[1]
                    else:
                        parts[-1] = parts[-1][:, : parts[-1].shape[1] - excess]
                        self._held[i] = size
                if self._held[i] < size:
                    self._append(
                        i, self._empty.new_zeros(self._empty.shape[0], size - self._held[i])
                    )

    def _append(self, stage: int, part: torch.Tensor) -> None:
        if part.shape[1]:
            self._parts[stage].append(part)
            self._held[stage] += part.shape[1]

    def release(self, begin: int) -> None:
        """Drop the blocks that lie wholly before base-rate sample ``begin`` in every stage."""
        for i, parts in enumerate(self._parts):
            while parts and self._offsets[i] + parts[0].shape[1] <= begin * 2**i:
                size = parts.popleft().shape[1]
                self._offsets[i] += size
                self._held[i] -= size

    def window(self, channel: int | None, begin: int, end: int, stage: int) -> torch.Tensor:
        """Stage ``stage`` samples of base-rate span [begin, end) (all channels for None). The
        span is assembled once from the blocks it covers; every channel's window is a view."""
        cached = self._assembled[stage]
        if cached is None or cached[:2] != (begin, end):
            cached = (begin, end, self._assemble(stage, 2**stage * begin, 2**stage * end))
            self._assembled[stage] = cached
        return cached[2] if channel is None else cached[2][channel]

    def _assemble(self, stage: int, first: int, stop: int) -> torch.Tensor:
        pieces, position = [], self._offsets[stage]
        for part in self._parts[stage]:
            size = part.shape[1]
            if position + size > first and position < stop:
                pieces.append(part[:, max(0, first - position) : stop - position])
            position += size
            if position >= stop:
                break
        span = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        if first < self._offsets[stage] or not pieces or span.shape[1] != stop - first:
            raise RuntimeError("internal error: window outside the available signal")
        return span
