"""Where stems go: arrays, or a spool file encoded into output files, scaled to stay in range.

A track's network output comes out window by window, unscaled (the least-squares coefficients
are known only at its end). :class:`ArraySink` keeps it in one host array; :class:`SpoolSink`
writes it to a spool file in the worker's temporary space, and :class:`PendingFiles` mixes the
spool into the output files (one encoding task per file), each written under a temporary name and
renamed when all are done.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import torch

from model import STEMS
from pipeline.audio import (
    FORMAT_NAMES,
    FORMATS,
    AudioWriter,
    headroom_gain,
)
from pipeline.separator.balance import Balance, Solution
from pipeline.separator.sources import Source
from pipeline.separator.threads import Once
from pipeline.tags import stem_tags

log = logging.getLogger(__name__)

# Output of separate_file: name -> weights of (drums, bass, other, vocals).
Mixes = Mapping[str, Sequence[float]]
FOUR_STEMS: dict[str, tuple[float, ...]] = {
    name: tuple(float(i == k) for i in range(len(STEMS))) for k, name in enumerate(STEMS)
}
WRITE_BLOCK = 1 << 17  # frames per block when writing files
_COPY_DEPTH = 4  # device-to-host copies in flight before the oldest is waited for
_FLOAT32 = np.dtype(np.float32).itemsize


@dataclass(frozen=True)
class SeparatedFile:
    """What :meth:`Separator.separate_files` wrote for one source."""

    paths: dict[str, Path]  # output name -> file
    rate: int
    channels: int
    frames: int  # samples per channel of each output
    gains: dict[str, float]  # output name -> gain it was scaled by to stay within full scale
    balance: Balance  # the scaled stems against the mixture (levels, residual, likeness)
    tags: dict[str, str]  # the source's tags, which every output file carries too


class Sink(Protocol):
    def store(self, offset: int, block: torch.Tensor) -> None: ...

    def finish(self, solve: Callable[[], Solution]) -> object: ...


class ArraySink:
    """Unscaled stems into one host array (4, channels, frames), pinned on CUDA so that every
    window's copy is asynchronous; scaled once at the end."""

    def __init__(self, shape: tuple[int, int], device: torch.device) -> None:
        self.device = device
        self.stems = torch.empty((len(STEMS), *shape), pin_memory=device.type == "cuda")

    def store(self, offset: int, block: torch.Tensor) -> None:
        target = self.stems[:, :, offset : offset + block.shape[-1]]
        target.copy_(block.transpose(0, 1), non_blocking=True)

    def finish(self, solve: Callable[[], Solution]) -> dict[str, np.ndarray]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        coefficients = solve().coefficients
        stems = self.stems.numpy()
        for k, stem in enumerate(stems):
            stem *= coefficients[:, k : k + 1].astype(np.float32)
        return dict(zip(STEMS, stems, strict=True))


class SpoolSink:
    """Unscaled stems, frames [keep) of the source, to a spool file as interleaved float32
    (frames, channels, 4), written by a thread of its own (in order) so that the engine's thread
    never waits on the disk. On CUDA each block comes down into a pinned buffer and that thread
    also waits for the copy. At most ``_COPY_DEPTH`` blocks are in flight on CUDA, one on a CPU
    (bounded memory). Its owner stops the thread with :meth:`close`."""

    def __init__(
        self, spool: BinaryIO, channels: int, device: torch.device, keep: tuple[int, int]
    ) -> None:
        self.spool, self.channels, self.device, self.keep = spool, channels, device, keep
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="metasep-spool")
        self._in_flight: deque[Future] = deque()
        self._ready: Once | None = None

    def store(self, offset: int, block: torch.Tensor) -> None:
        first, stop = max(offset, self.keep[0]), min(offset + block.shape[-1], self.keep[1])
        if first >= stop:
            return
        frames = block[:, :, first - offset : stop - offset].permute(2, 0, 1)
        if self.device.type == "cuda":
            staging = torch.empty(frames.shape, pin_memory=True)
            staging.copy_(frames, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        else:
            staging, copied = frames.contiguous(), None
        # A CPU's blocks are written as fast as they come: one in flight keeps memory as low
        # as writing them in this thread did. A GPU keeps several copies going.
        depth = _COPY_DEPTH if self.device.type == "cuda" else 1
        while len(self._in_flight) >= depth:
            self._in_flight.popleft().result()
        self._in_flight.append(self._writer.submit(self._write, staging, copied))

    def _write(self, staging: torch.Tensor, copied: torch.cuda.Event | None) -> None:
        if copied is not None:
            copied.synchronize()
        self.spool.write(staging.numpy())

    def finish(self, solve: Callable[[], Solution]) -> SpoolSink:
        """Take the track's least-squares solver; nothing is waited for here (see ready)."""
        self._ready = Once(functools.partial(self._complete, solve))
        return self

    def ready(self) -> Solution:
        """The track's least squares (its coefficients, (channels, 4), and balance), once every
        block is in the spool (a write's or the solver's failure is raised here). Safe to call
        from several threads: the first call does the waiting, the others wait for it."""
        if self._ready is None:
            raise RuntimeError("internal error: spool read before its track was finished")
        return self._ready()

    def _complete(self, solve: Callable[[], Solution]) -> Solution:
        while self._in_flight:
            self._in_flight.popleft().result()
        self.spool.flush()  # the encoders read the file by position, past Python's buffer
        return solve()

    def close(self) -> None:
        """Stop the writer thread (after the writes in flight)."""
        self._writer.shutdown(wait=True)


class PendingFiles:
    """Output files being written from one track's spool, each under a temporary name.

    Where the format clips (FLAC), a track whose files went over full scale has them written
    again, scaled (:func:`pipeline.audio.headroom_gain`): the outputs that are parts of the
    mixture (weights of 0 and 1: stems, ``no_vocals``, karaoke) by one gain, so that they still
    add up to it (scaled alike) and keep their balance, any other mix (a remix) by its own."""

    def __init__(
        self,
        name: str,
        sink: SpoolSink,
        weights: dict[str, np.ndarray],
        write: Callable[[str, float], Future],
    ) -> None:
        self.name, self.sink, self._weights, self._write = name, sink, weights, write
        self._writes = {output: write(output, 1.0) for output in weights}
        self.paths: dict[str, Path] = {}
        self.gains = dict.fromkeys(weights, 1.0)  # output -> the gain it was written with

    def result(self) -> dict[str, Path]:
        """The paths, once every file is written and renamed into place; if any failed, none
        is left behind (a track's outputs appear all together or not at all)."""
        if self.paths:
            return self.paths
        writers = self._collect()
        gains = headroom_gains(self._weights, {name: w.peak for name, w in writers.items()})
        scaled = [name for name, gain in gains.items() if gain < 1.0]
        if scaled:
            for name in scaled:
                writers.pop(name).discard()
                self._writes[name] = self._write(name, gains[name])
            writers.update(self._collect(scaled, writers))
            self.gains = gains
            self._warn()
        committed: list[Path] = []
        try:
            for name, writer in writers.items():
                committed.append(writer.commit())
                self.paths[name] = writer.path
        except Exception:
            for writer in writers.values():
                writer.discard()
            for path in committed:
                path.unlink(missing_ok=True)
            self.paths = {}
            raise
        return self.paths

    def _collect(
        self, names: list[str] | None = None, done: dict[str, AudioWriter] | None = None
    ) -> dict[str, AudioWriter]:
        """The finished writers of ``names`` (all outputs by default); when any write failed,
        every writer (those of ``done`` too) is discarded and the first failure raised."""
        writers, failure = {}, None
        for name in names if names is not None else self._writes:
            try:
                writers[name] = self._writes[name].result()
            except Exception as error:
                failure = failure or error
        if failure is not None:
            for writer in (*writers.values(), *(done or {}).values()):
                writer.discard()
            raise failure
        return writers

    def _warn(self) -> None:
        scaled = {name: gain for name, gain in self.gains.items() if gain < 1.0}
        text = ", ".join(f"{name} {20 * math.log10(gain):+.2f} dB" for name, gain in scaled.items())
        log.warning("%s: outputs would clip; written scaled (%s)", self.name, text)


def start_encoding(
    source: Source,
    sink: SpoolSink,
    folder: Path,
    weights: dict[str, np.ndarray],
    format: str,
    model_id: str,
    pool: ThreadPoolExecutor,
) -> PendingFiles:
    """Start mixing a spooled track into its output files ``folder/<output>.<format>`` (scaled by
    the least-squares coefficients, tagged as the source is, with the output's name and the
    model), one ``pool`` task per file."""

    def write(output: str, gain: float) -> Future:
        path = folder / f"{output}.{format}"
        tags = stem_tags(source.tags, output, model_id)
        mix = weights[output] * gain
        return pool.submit(write_mix, sink, mix, path, format, source.rate, tags)

    return PendingFiles(source.name, sink, weights, write)


def headroom_gains(weights: dict[str, np.ndarray], peaks: dict[str, float]) -> dict[str, float]:
    """Per output, the gain that keeps it within full scale (1: as it is): one for all the parts
    of the mixture (0/1 weights), from their largest peak; each other mix its own."""
    parts = [name for name, weight in weights.items() if np.isin(weight, (0.0, 1.0)).all()]
    shared = headroom_gain(max((peaks[name] for name in parts), default=0.0))
    return {name: shared if name in parts else headroom_gain(peaks[name]) for name in weights}


def write_mix(
    sink: SpoolSink,
    weight: np.ndarray,
    path: Path,
    format: str,
    rate: int,
    tags: dict[str, str] | None = None,
) -> AudioWriter:
    """One output file, complete under its temporary name, from a track's spool of interleaved
    (frames, channels, 4) float32 stems: each channel the stems weighted by ``weight`` (4,)
    times the track's least-squares coefficients. Reads the spool by position (``os.pread``),
    so that several files of a track are written at once without sharing a file offset."""
    gains = (sink.ready().coefficients * weight[None]).astype(np.float32)  # (channels, 4)
    descriptor, channels = sink.spool.fileno(), sink.channels
    frame_bytes = channels * len(STEMS) * _FLOAT32
    writer = AudioWriter(path, rate, channels, format, sink.keep[1] - sink.keep[0], tags)
    try:
        offset = 0
        while chunk := os.pread(descriptor, WRITE_BLOCK * frame_bytes, offset):
            offset += len(chunk)
            block = np.frombuffer(chunk, dtype=np.float32).reshape(-1, channels, len(STEMS))
            mixed = block[..., 0] * gains[:, 0]
            for stem in range(1, len(STEMS)):
                if gains[:, stem].any():
                    mixed += block[..., stem] * gains[:, stem]
            writer.write(mixed.T)
        writer.close()
    except BaseException:
        writer.discard()
        raise
    return writer


def output_weights(outputs: Mixes | None, format: str) -> dict[str, np.ndarray]:
    """Output name -> its weights of (drums, bass, other, vocals), checked with the format."""
    if format not in FORMATS:
        raise ValueError(f"unknown audio format {format!r} (use {FORMAT_NAMES})")
    weights = {name: np.asarray(w, dtype=np.float64) for name, w in (outputs or FOUR_STEMS).items()}
    if any(w.shape != (len(STEMS),) for w in weights.values()):
        raise ValueError(f"each output needs {len(STEMS)} weights, one per stem")
    return weights


@contextlib.contextmanager
def output_folder(path: Path) -> Iterator[Path]:
    """Create ``path`` if needed; remove it again if it was created and the work failed."""
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if created and not any(path.iterdir()):
            path.rmdir()
        raise
