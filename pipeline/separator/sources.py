"""What the engine reads: arrays, whole files and excerpts, as blocks of (channels, n) float32."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import torch

from pipeline.audio import AudioError, AudioReader, open_audio
from pipeline.separator.observe import Observer


class Source(Protocol):
    name: str
    rate: int
    channels: int
    tags: dict[str, str]  # title, artist, album... (pipeline.tags)

    def blocks(self, size: int) -> Iterator[np.ndarray]: ...


@dataclass
class ArraySource:
    """A (channels, samples) float32 array in memory."""

    audio: np.ndarray
    rate: int
    name: str = "audio"
    _uploaded: torch.Tensor | None = field(default=None, repr=False)

    @property
    def channels(self) -> int:
        return self.audio.shape[0]

    @property
    def tags(self) -> dict[str, str]:
        return {}

    def blocks(self, size: int) -> Iterator[np.ndarray]:
        for start in range(0, self.audio.shape[1], size):
            yield self.audio[:, start : start + size]

    def on(self, device: torch.device) -> torch.Tensor:
        """The whole array on ``device``, copied there once (pinned, asynchronously)."""
        if self._uploaded is None or self._uploaded.device != device:
            pinned = torch.from_numpy(self.audio).pin_memory()
            self._uploaded = pinned.to(device, non_blocking=True)
        return self._uploaded


@dataclass
class SpanSource:
    """Frames [first, last) of a file: the excerpt and the context the network reads around it."""

    reader: AudioReader
    first: int
    last: int

    @property
    def name(self) -> str:
        return self.reader.name

    @property
    def rate(self) -> int:
        return self.reader.rate

    @property
    def channels(self) -> int:
        return self.reader.channels

    @property
    def tags(self) -> dict[str, str]:
        return self.reader.tags

    def blocks(self, size: int) -> Iterator[np.ndarray]:
        return self.reader.blocks(size, start=self.first, stop=self.last)


def checked_audio(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """The input as contiguous float32 (channels, samples), or an AudioError saying why not."""
    audio = np.asarray(audio)
    if audio.ndim != 2:
        raise AudioError(f"expected (channels, samples) audio, got an array of shape {audio.shape}")
    if audio.shape[0] == 0 or audio.shape[1] == 0:
        raise AudioError("no audio samples (zero-length)")
    if not isinstance(sample_rate, int | np.integer) or sample_rate <= 0:
        raise AudioError(f"invalid sample rate {sample_rate!r}")
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    if not np.isfinite(audio).all():
        raise AudioError("audio contains NaN or infinite samples")
    return audio


def open_excerpt(
    stack: contextlib.ExitStack,
    path: str | Path | BinaryIO,
    start: float,
    duration: float | None,
    windows: tuple[int, int, int],
) -> tuple[SpanSource, tuple[int, int]]:
    """The frames the network reads for an excerpt of ``path`` (opened on ``stack``), and the
    span of them that the outputs keep, counted from the first. ``windows`` is (segment,
    context, rate): the window sizes in samples at that (base) rate. The network reads at least
    the context on each side and at least one whole window (as in a whole-file separation, whose
    windows' GroupNorms take statistics over that long), as far as the file reaches."""
    segment, context, base_rate = windows
    reader = stack.enter_context(open_audio(path))
    first, stop = excerpt_frames(reader.frames, reader.rate, start, duration, reader.name)
    ratio = reader.rate / base_rate
    window = math.ceil((segment + 2 * context) * ratio)
    margin = max(math.ceil(context * ratio), -(-(window - (stop - first)) // 2))
    begin, end = max(0, first - margin), min(reader.frames, stop + margin)
    return SpanSource(reader, begin, end), (first - begin, stop - begin)


def excerpt_frames(
    frames: int, rate: int, start: float, duration: float | None, name: str
) -> tuple[int, int]:
    """The source frames [first, stop) of an excerpt given in seconds, or an AudioError."""
    if not (math.isfinite(start) and start >= 0):
        raise AudioError(f"{name}: the excerpt's start must be a number of seconds >= 0")
    if duration is not None and not (math.isfinite(duration) and duration > 0):
        raise AudioError(f"{name}: the excerpt's duration must be a number of seconds > 0")
    first = round(start * rate)
    if first >= frames:
        raise AudioError(
            f"{name}: the excerpt starts at {start:g} s, past the end ({frames / rate:.2f} s)"
        )
    stop = frames if duration is None else min(frames, first + max(1, round(duration * rate)))
    return first, stop


def device_blocks(
    blocks: Iterator[np.ndarray], device: torch.device, observer: Observer
) -> Iterator[torch.Tensor]:
    """Host blocks as float32 tensors on ``device`` (pinned, asynchronous copies on CUDA)."""
    while True:
        with observer.phase("decode"):
            block = next(blocks, None)
            if block is None:
                return
            tensor = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
            if device.type == "cuda":
                tensor = tensor.pin_memory().to(device, non_blocking=True)
        yield tensor
