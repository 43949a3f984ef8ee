"""The separation engine: any audio in, four stems out, fast and in bounded memory.

What :meth:`Separator.separate` does with a (channels, samples) array at any rate:

1. resample each channel to the model's stage rates (8, 16 and 32 kHz for the paper's model) and
   normalise each stage's signal as the release does, by its standard deviation (the mean is
   removed first and the deviation floored, so silence and DC give zeros, never NaN or inf);
2. cut the track into fixed-length windows, each a *segment* with *context* on both sides (slid
   inwards at the track's ends so that every window has the same length), and run several windows
   and all channels as one batch through the frozen network (:class:`model.frozen.FrozenTasNet`);
   peak memory depends on the window and batch sizes, not on the track's length;
3. keep each window's segment of the last stage's output, resample it back to the source rate;
4. scale the four stems of each channel by least squares so that they sum to the mixture as
   closely as possible, as the release's evaluation does.

One engine for every device. Everything between decoded PCM and finished stems is torch tensors
on the separator's device: decoded blocks go up once, resampling, normalisation, windows, the
network, least squares and the stems stay there, and stems come down once (on CUDA through pinned
buffers, asynchronously, with no per-window synchronisation). The device decides two ops: the
resampler, soxr on the CPU (faster there) and a windowed-sinc resampler in torch elsewhere
(:class:`pipeline.audio.TorchResampler`), and the TCN blocks' kernels, hand-written on the CPU and
compiled by torch.compile on CUDA (:func:`model.frozen.fused_block_step`). ``resampler=`` and
``kernels=`` force either, so the device path is tested on CPU tensors too.

Everything streams: the source is read block by block (twice: once for the normalisation
statistics, once for the windows), stage signals are kept only while a window needs them, and the
output is produced in time order. :meth:`Separator.separate_file` writes the stems straight to
files (decoding reads ahead in a thread; each output file is encoded in a thread pool as soon as
its track is out of the network), so a long recording never has to fit in memory;
:meth:`Separator.separate` returns arrays
(the input and four stems of its size are then in memory, nothing else of track size);
:meth:`Separator.separate_many` runs several tracks through shared forward passes (a catalog
worker's batch of tracks fills the device even when each track is short).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import platform
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, Protocol

import numpy as np
import torch
from tqdm import tqdm

from model import STEMS, MultiTasNet, load_checkpoint
from model.frozen import FrozenTasNet, frames_multiple
from pipeline.audio import (
    FORMAT_NAMES,
    FORMATS,
    AudioError,
    AudioReader,
    AudioWriter,
    StreamResampler,
    check_writable,
    headroom_gain,
    open_audio,
)

log = logging.getLogger(__name__)

# Bump when a change alters the engine's output for the same options. 3: the device-resident
# engine (on a CPU its output equals version 2's; on a GPU it resamples with torch, not soxr).
ENGINE_VERSION = 3
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISION_CHOICES = ("auto", *PRECISIONS)  # auto: bfloat16 on a GPU that has it, else float32
RESAMPLERS = ("auto", "soxr", "torch")
KERNELS = ("auto", "fused", "eager")
SILENCE = 1e-5  # floor of the normalising standard deviation (about -100 dBFS)
# Window defaults, from `metasep bench` (README): the mask network's GroupNorms take their
# statistics over the whole window, so agreement with the single pass grows with the window's
# length (paper model, 60 s: 38 dB with 30 s segments, bf16 included); 2 s of context cover the
# TCN's receptive field (~0.95 s each side) and cost 13% extra work.
DEFAULT_SEGMENT = 30.0  # seconds of output per window
DEFAULT_CONTEXT = 2.0  # seconds of context on each side of a segment
DEFAULT_BATCH = 2  # windows (window x channel) per forward on a CPU: a stereo window
MAX_AUTO_BATCH = 32  # the most windows per forward when the batch is picked from device memory
GPU_TRACKS_PER_CALL = 8  # tracks a GPU separates together: their windows fill its forward passes
# Source frames per read: 3 s at 44.1 kHz for soxr (a CPU), 12 s for the torch resampler (the
# device path), where each block costs every stage's resampler a dozen ops, each a kernel launch
# on a GPU: with 3 s blocks they were most of the engine's ops outside the network. On a CPU the
# larger blocks were no faster (README).
_READ_BLOCK = {"soxr": 1 << 17, "torch": 1 << 19}
_WRITE_BLOCK = 1 << 17  # frames per block when writing files
_COPY_DEPTH = 4  # device-to-host copies in flight before the oldest is waited for
_FLOAT32 = np.dtype(np.float32).itemsize
# The environment of a process that separates in threads it did not start (a Ray actor's task
# threads): with one malloc arena from its start, every thread allocates where keep_freed_memory
# keeps freed memory. mallopt can only limit the arenas made after it is called.
ONE_ARENA_ENV = {"MALLOC_ARENA_MAX": "1"}

# Output of separate_file: name -> weights of (drums, bass, other, vocals).
Mixes = Mapping[str, Sequence[float]]
WindowCallback = Callable[[int, int], None]  # (finished, total) (window, channel) items
FOUR_STEMS: dict[str, tuple[float, ...]] = {
    name: tuple(float(i == k) for i in range(len(STEMS))) for k, name in enumerate(STEMS)
}


class Window(NamedTuple):
    """Base-rate sample spans: the output segment [start, stop) is computed from [begin, end)."""

    start: int
    stop: int
    begin: int
    end: int


class _Source(Protocol):
    name: str
    rate: int
    channels: int

    def blocks(self, size: int) -> Iterator[np.ndarray]: ...


@dataclass
class _ArraySource:
    audio: np.ndarray
    rate: int
    name: str = "audio"
    _uploaded: torch.Tensor | None = field(default=None, repr=False)

    @property
    def channels(self) -> int:
        return self.audio.shape[0]

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
class _SpanSource:
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

    def blocks(self, size: int) -> Iterator[np.ndarray]:
        return self.reader.blocks(size, start=self.first, stop=self.last)


@dataclass
class _Statistics:
    """What the first pass over a source finds: its length and each stage's normalisation."""

    frames: int  # source samples
    mean: torch.Tensor  # (stages, channels, 1) float32 on the device
    scale: torch.Tensor  # (stages, channels, 1): the standard deviation, floored at SILENCE
    length: int  # base-rate samples the network runs on (padded up to the window alignment)
    silent: np.ndarray  # (channels,): no signal beyond a constant (silence or DC) in the source


@dataclass
class PhaseClock:
    """Seconds spent in each phase of the engine, for ``metasep bench``.

    Each phase's time is its own (a phase entered inside another pauses the outer one), and the
    device is synchronised whenever a phase ends, so that asynchronous GPU work is charged to the
    phase that queued it. That synchronisation serialises host and device: a separation timed
    with a clock is slower than one without, and only its proportions are meaningful."""

    device: torch.device
    seconds: dict[str, float] = field(default_factory=dict)
    _stack: list[str] = field(default_factory=list)
    _mark: float = 0.0

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._switch()
        self._stack.append(name)
        try:
            yield
        finally:
            _synchronize(self.device)
            self._switch()
            self._stack.pop()

    @property
    def current(self) -> str | None:
        """The phase being timed now (the innermost), or None between phases."""
        return self._stack[-1] if self._stack else None

    def _switch(self) -> None:
        now = time.perf_counter()
        if self._stack:
            top = self._stack[-1]
            self.seconds[top] = self.seconds.get(top, 0.0) + now - self._mark
        self._mark = now


_NO_PHASE = contextlib.nullcontext()


def identify(
    model: MultiTasNet,
    precision: str = "float32",
    segment: float = DEFAULT_SEGMENT,
    context: float = DEFAULT_CONTEXT,
) -> tuple[str, str]:
    """``(model_id, options_hash)`` of a separator over ``model`` with these options, computed
    without building one: what a catalog run plans with and every worker checks. The options hash
    covers what changes the output (engine version, precision, window sizes), not the device or
    the batch size."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (use {', '.join(PRECISIONS)})")
    segment_frames, context_frames = _window_frames(model, segment, context)
    options = {
        "engine": ENGINE_VERSION,
        "precision": precision,
        "segment": segment_frames,
        "context": context_frames,
        "silence": SILENCE,
    }
    return model_fingerprint(model), _digest(json.dumps(options, sort_keys=True).encode())


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``"auto"`` made concrete for a device: bfloat16 on CUDA (where the GPU has it; a driver
    without a GPU plans GPU workers as bfloat16), float32 elsewhere. Other names are returned."""
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type != "cuda":
        return "float32"
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return "float32"
    return "bfloat16"


def default_tracks_per_call(device: str | torch.device) -> int:
    """Tracks to separate together (:meth:`Separator.separate_files`) on ``device``: several on
    a GPU, whose forward passes their windows fill and whose idle time their decoding and
    encoding would otherwise be; one on a CPU, where a stereo window fills a forward pass and the
    cores are the network's."""
    return GPU_TRACKS_PER_CALL if torch.device(device).type != "cpu" else 1


def _window_frames(model: MultiTasNet, segment: float, context: float) -> tuple[int, int]:
    """Segment and context in base-rate samples, rounded to the network's frame alignment."""
    if segment <= 0 or context < 0:
        raise ValueError("segment must be > 0 and context >= 0")
    align, base = frames_multiple(model), model.config.sampling_rate
    return max(align, _round_to(segment * base, align)), _round_to(context * base, align)


@dataclass(frozen=True)
class SeparatedFile:
    """What :meth:`Separator.separate_files` wrote for one source."""

    paths: dict[str, Path]  # output name -> file
    rate: int
    channels: int
    frames: int  # samples per channel of each output
    gains: dict[str, float]  # output name -> gain it was scaled by to stay within full scale


class Separator:
    """Meta-TasNet separation of whole tracks; build once, call many times.

    ``checkpoint`` is a path, a name of the weights registry (``"default"``, ``"release"``:
    fetched and cached on first use) or a model. ``device``
    defaults to CUDA when available. ``precision`` is ``"float32"``, ``"bfloat16"`` or
    ``"float16"`` (the network's matrix products run in it; normalisation statistics stay in
    float32/64); ``"auto"`` is bfloat16 on a GPU that supports it and float32 elsewhere (on a
    CPU float32 is the one that runs well everywhere). ``segment`` and ``context`` are in
    seconds; ``batch_size`` counts windows of
    one channel each per forward pass (``None``: 2 on a CPU; on a GPU as many as half its free
    memory holds, at most ``MAX_AUTO_BATCH``). ``resampler`` picks the resampling op: ``"auto"``
    (soxr on a CPU, torch elsewhere), ``"soxr"`` or ``"torch"``. ``kernels`` picks how the TCN
    blocks run: ``"fused"`` (compiled once per process by torch.compile: Triton kernels on a GPU),
    ``"eager"`` (the hand-written kernels, the fast ones on a CPU) or ``"auto"`` (fused on CUDA).
    """

    def __init__(
        self,
        checkpoint: str | Path | MultiTasNet = "default",
        device: str | torch.device | None = None,
        precision: str = "auto",
        segment: float = DEFAULT_SEGMENT,
        context: float = DEFAULT_CONTEXT,
        batch_size: int | None = DEFAULT_BATCH,
        resampler: str = "auto",
        kernels: str = "auto",
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("CUDA is not available on this machine; use --device cpu")
        precision = resolve_precision(precision, self.device)
        dtype = _dtype(precision, self.device)
        if batch_size is not None and batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if resampler not in RESAMPLERS:
            raise ValueError(f"unknown resampler {resampler!r} (use {', '.join(RESAMPLERS)})")
        if kernels not in KERNELS:
            raise ValueError(f"unknown kernels {kernels!r} (use {', '.join(KERNELS)})")
        if not isinstance(checkpoint, MultiTasNet):
            from pipeline.weights import resolve_weights  # a name: shipped, cached or fetched

            checkpoint = load_checkpoint(resolve_weights(checkpoint))
        model = checkpoint
        self.config = model.config
        self.model_id, self.options_hash = identify(model, precision, segment, context)
        self.segment, self.context = _window_frames(model, segment, context)
        # Whether the blocks are fused is the network's to say (``network.fused``): it falls
        # back to the hand-written blocks where compiling fails.
        fused = kernels == "fused" or (kernels == "auto" and self.device.type == "cuda")
        self.network = FrozenTasNet(model, dtype, fused).to(self.device).eval()
        self.precision = precision
        self.batch_size = batch_size or (DEFAULT_BATCH if self.device.type == "cpu" else None)
        self.resampler = resampler
        if resampler == "auto":
            self.resampler = "soxr" if self.device.type == "cpu" else "torch"
        self.stage_rates = self.config.stage_rates()
        self.align = frames_multiple(model)
        self.clock: PhaseClock | None = None  # set by the benchmark to time each phase
        self.forward_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] | None = None
        # Calls from several threads share the device: their forward passes take turns (each
        # call's host work, decoding, first passes and encoding, goes on meanwhile).
        self._network_lock = threading.Lock()

    # ----------------------------------------------------------------------------------------
    # Public entry points

    def separate(
        self,
        audio: np.ndarray,
        sample_rate: int,
        progress: bool = False,
        callback: WindowCallback | None = None,
    ) -> dict[str, np.ndarray]:
        """Stems of float32 (channels, samples) audio: {stem: (channels, samples)} at its rate.

        ``progress`` shows a bar; ``callback(done, total)`` is told the count of finished
        (window, channel) items before the first forward pass and after each one. An exception
        raised by the callback stops the separation (how a server cancels a job)."""
        (result,) = self._run(
            [_ArraySource(_checked(audio, sample_rate), sample_rate)],
            progress,
            callback,
            strict=True,
        )
        return result

    def separate_many(
        self, tracks: Sequence[tuple[np.ndarray, int]], progress: bool = False
    ) -> list[dict[str, np.ndarray] | Exception]:
        """Stems of several (audio, sample_rate) tracks, whose windows share forward passes.

        Returns one entry per track, in order: its stems as :meth:`separate` gives them, or the
        exception that stopped that track (unusable audio, a failed forward pass); the other
        tracks go on."""
        sources: list[_Source | Exception] = []
        for index, (audio, rate) in enumerate(tracks):
            try:
                sources.append(_ArraySource(_checked(audio, rate), rate, f"track {index}"))
            except AudioError as error:
                sources.append(error)
        return self._run(sources, progress, None, strict=False)

    def separate_file(
        self,
        path: str | Path | BinaryIO,
        destination: str | Path,
        outputs: Mixes | None = None,
        format: str = "flac",
        progress: bool = False,
        callback: WindowCallback | None = None,
        start: float = 0.0,
        duration: float | None = None,
    ) -> dict[str, Path]:
        """Separate an audio file into ``destination/<name>.<format>`` files; returns their paths.

        ``outputs`` maps each file name to the weights of (drums, bass, other, vocals) it mixes,
        by default the four stems. ``start`` and ``duration`` (seconds) choose an excerpt: the
        files cover exactly it, and the network still reads context around it (at least the
        window context on each side, and a whole window when the file has one). The unscaled
        stems go to an anonymous temporary file in ``destination``; each output is written under
        a temporary name and renamed when done, scaled where it would clip (see
        :class:`_PendingFiles`). ``progress`` and ``callback`` are as in :meth:`separate`.
        """
        weights = _output_weights(outputs, format)
        with contextlib.ExitStack() as stack:
            source, keep = self._open_excerpt(stack, path, start, duration)
            (result,) = self._to_files(
                [source], [Path(destination)], [keep], weights, format, progress, callback, True
            )
        return result.paths

    def separate_files(
        self,
        jobs: Sequence[tuple[str | Path | BinaryIO, str | Path]],
        outputs: Mixes | None = None,
        format: str = "flac",
        progress: bool = False,
        start: float = 0.0,
        duration: float | None = None,
    ) -> list[SeparatedFile | Exception]:
        """Separate several (source, destination folder) pairs as :meth:`separate_file` does,
        their windows sharing forward passes, all streamed (memory does not grow with any
        track's length); ``start`` and ``duration`` choose the same excerpt of each. One entry
        per pair, in order: what was written, or the exception that stopped that track (the
        others go on; its folder is removed if it made it)."""
        weights = _output_weights(outputs, format)
        with contextlib.ExitStack() as stack:
            sources: list[_Source | Exception] = []
            keeps: list[tuple[int, int]] = []
            for source, _ in jobs:
                try:
                    span, keep = self._open_excerpt(stack, source, start, duration)
                except (AudioError, OSError) as error:
                    span, keep = error, (0, 0)
                sources.append(span)
                keeps.append(keep)
            folders = [Path(destination) for _, destination in jobs]
            return self._to_files(sources, folders, keeps, weights, format, progress, None, False)

    def _open_excerpt(
        self,
        stack: contextlib.ExitStack,
        path: str | Path | BinaryIO,
        start: float,
        duration: float | None,
    ) -> tuple[_SpanSource, tuple[int, int]]:
        """The frames the network reads for an excerpt of ``path`` (opened on ``stack``), and
        the span of them that the files keep, counted from the first. The network reads at least
        the context on each side and at least one whole window (as in a whole-file separation,
        whose windows' GroupNorms take statistics over that long), as far as the file reaches."""
        reader = stack.enter_context(open_audio(path))
        first, stop = _excerpt(reader.frames, reader.rate, start, duration, reader.name)
        ratio = reader.rate / self.config.sampling_rate
        window = math.ceil((self.segment + 2 * self.context) * ratio)
        margin = max(math.ceil(self.context * ratio), -(-(window - (stop - first)) // 2))
        begin, end = max(0, first - margin), min(reader.frames, stop + margin)
        return _SpanSource(reader, begin, end), (first - begin, stop - begin)

    def _to_files(
        self,
        sources: Sequence[_Source | Exception],
        folders: Sequence[Path],
        keeps: Sequence[tuple[int, int]],
        weights: dict[str, np.ndarray],
        format: str,
        progress: bool,
        callback: WindowCallback | None,
        strict: bool,
    ) -> list[SeparatedFile | Exception]:
        """Stems of each source spooled in its folder, then encoded there (see separate_files).

        A track is encoded as soon as its last window is out of the network, in a thread pool
        (one task per output file; libsndfile releases the GIL), while the device goes on with
        the other tracks' windows."""
        sources = [_writable(source, format, strict) for source in sources]
        with contextlib.ExitStack() as stack:
            sinks: list[_Sink | None] = []
            for source, folder, keep in zip(sources, folders, keeps, strict=True):
                if isinstance(source, Exception):
                    sinks.append(None)
                    continue
                stack.enter_context(_folder(folder))
                spool = stack.enter_context(tempfile.TemporaryFile(dir=folder))
                sinks.append(_SpoolSink(spool, source.channels, self.device, keep))
            encoders = stack.enter_context(ThreadPoolExecutor(_encode_threads(len(weights))))

            def encode(index: int, sink: _SpoolSink) -> _PendingFiles:
                source, folder = sources[index], folders[index]
                return self._encode(
                    source.name, sink, folder, weights, format, source.rate, encoders
                )

            pending = self._run(sources, progress, callback, strict, sinks, encode)
            results: list[SeparatedFile | Exception] = []
            for source, outcome in zip(sources, pending, strict=True):
                try:
                    if isinstance(outcome, Exception):
                        raise outcome
                    paths = outcome.result()
                except Exception as error:
                    if strict:
                        raise
                    results.append(error)
                    continue
                frames = outcome.sink.keep[1] - outcome.sink.keep[0]
                results.append(
                    SeparatedFile(paths, source.rate, source.channels, frames, outcome.gains)
                )
        for result, folder in zip(results, folders, strict=True):
            if isinstance(result, Exception) and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        return results

    # ----------------------------------------------------------------------------------------
    # Measurement helpers (the benchmark compares these with the model's own paths)

    def stage_mixes(self, audio: np.ndarray, sample_rate: int) -> list[np.ndarray]:
        """The normalised per-stage signals (channels, length * 2**i) the network is given."""
        source = _ArraySource(_checked(audio, sample_rate), sample_rate)
        statistics = self._statistics(source)
        feed = _StageFeed(self, source, statistics)
        feed.ensure(statistics.length)
        return [
            feed.window(None, 0, statistics.length, stage).cpu().numpy()
            for stage in range(len(self.stage_rates))
        ]

    def last_stage(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """The windowed network output at the last stage's rate, (channels, 4, length * 2**s),
        before resampling and scaling."""
        source = _ArraySource(_checked(audio, sample_rate), sample_rate)
        track = _Track(self, source, _DiscardSink())
        segments: list[torch.Tensor] = []
        track.on_window = segments.append
        self._schedule([track], progress=False, callback=None)
        return torch.cat(segments, dim=-1).cpu().numpy()

    def windows(self, length: int) -> list[Window]:
        """The window plan for a base-rate length."""
        return plan_windows(length, self.segment, self.context, self.align)

    # ----------------------------------------------------------------------------------------
    # The engine

    def _phase(self, name: str) -> contextlib.AbstractContextManager:
        return self.clock.phase(name) if self.clock is not None else _NO_PHASE

    def _run(
        self,
        sources: Sequence[_Source | Exception],
        progress: bool,
        callback: WindowCallback | None,
        strict: bool,
        sinks: Sequence[_Sink] | None = None,
        then: Callable[[int, Any], Any] | None = None,
    ) -> list:
        """Separate ``sources`` through shared forward passes; each result is its sink's output
        (stems for arrays) or, unless ``strict``, the exception that stopped that source. A
        track is finished as soon as its last window is out, and ``then(index, output)`` (when
        given) is called with its sink's output right away: its result takes the output's place.
        """

        def start(index: int) -> _Track | Exception:
            source = sources[index]
            if isinstance(source, Exception):
                return source
            sink = sinks[index] if sinks is not None else _ArraySink(source, self.device)
            try:
                return _Track(self, source, sink)
            except Exception as error:
                if strict:
                    raise
                return error

        tracks: list[_Track | Exception | None] = [None] * len(sources)
        results: list = [None] * len(sources)

        def finish(index: int, track: _Track) -> None:
            try:
                output = track.finish()
                results[index] = then(index, output) if then is not None else output
            except Exception as error:
                if strict:
                    raise
                results[index] = error

        def started(pool: ThreadPoolExecutor | _Inline) -> Iterator[_Track]:
            """The tracks in order, each as soon as its first pass is done; the later tracks'
            first passes go on in the pool while the device works on the earlier ones."""
            futures = [pool.submit(start, index) for index in range(len(sources))]
            for index, future in enumerate(futures):
                track = tracks[index] = future.result()
                if isinstance(track, Exception):
                    results[index] = track
                    continue
                track.on_done = functools.partial(finish, index, track)
                yield track

        # First passes (decoding and the statistics) run in threads: decoding and the resamplers
        # release the GIL. On a GPU several at once; a CPU's cores are the network's, so there
        # one thread reads ahead of it. With a phase clock (not thread-safe) all happens here.
        threads = min(len(sources), os.cpu_count() or 1) if self.device.type != "cpu" else 1
        if self.clock is not None:
            self._schedule(started(_Inline()), progress, callback, strict, len(sources))
        else:
            with ThreadPoolExecutor(max(1, threads)) as pool:
                self._schedule(started(pool), progress, callback, strict, len(sources))
        for index, track in enumerate(tracks):
            if isinstance(track, _Track) and results[index] is None:
                results[index] = track.error or RuntimeError(
                    f"internal error: {track.source.name} was not finished"
                )
        return results

    def _schedule(
        self,
        tracks: Iterable[_Track],
        progress: bool,
        callback: WindowCallback | None,
        strict: bool = True,
        count: int = 1,
    ) -> None:
        """Run every (window, channel) item of ``tracks`` (``count`` of them, taken as they
        come) through the network, ``batch_size`` at a time; items of consecutive tracks share a
        batch when their windows are as long. ``callback`` is told the items of the tracks
        started so far (a single track's total is known before the first forward)."""
        total = done = 0
        batch: list[_Item] = []
        name = f"{count} tracks" if count > 1 else None
        with tqdm(total=0, disable=not progress, unit="window", leave=False, desc=name) as bar:

            def flush() -> None:
                nonlocal done
                self._forward(batch, strict)
                bar.update(len(batch))
                done += len(batch)
                batch.clear()
                if callback is not None:
                    callback(done, total)

            for track in tracks:
                total += track.item_count
                bar.total = total
                if count == 1:
                    bar.set_description_str(track.source.name)
                if callback is not None and done == 0:
                    callback(done, total)
                for item in track.items(strict):
                    full = len(batch) == (self.batch_size or MAX_AUTO_BATCH)
                    if batch and (full or item.size != batch[0].size):
                        flush()
                    batch.append(item)
            if batch:
                flush()

    def _forward(self, batch: list[_Item], strict: bool) -> None:
        """One forward pass over ``batch``; each item's output goes back to its track."""
        live = [item for item in batch if item.track.error is None]
        if not live:
            return
        try:
            with self._phase("network"), self._network_lock:
                if self.batch_size is None:
                    self.batch_size = self._auto_batch(live[0])
                inputs = [
                    torch.stack([item.inputs[stage] for item in live]).unsqueeze(1)
                    for stage in range(len(self.stage_rates))
                ]
                events = self._record_start()
                stems = self.network.separate_last(inputs)[:, :, 0]
                self._record_end(events)
        except Exception as error:
            if strict:
                raise
            for track in {id(item.track): item.track for item in live}.values():
                track.error = error
            return
        for item, output in zip(live, stems, strict=True):
            item.track.deliver(item, output)

    def _auto_batch(self, item: _Item) -> int:
        """Windows per forward that fit in half the device's free memory, from one window's
        measured peak (CUDA); 2 elsewhere."""
        if self.device.type != "cuda":
            return DEFAULT_BATCH
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        # Two copies of the window: a batch of one would make the compiled kernels specialise on
        # that size and compile again for the real batches.
        inputs = [torch.stack([x, x]).unsqueeze(1) for x in item.inputs]
        self.network.separate_last(inputs)
        per_window = max(1, (torch.cuda.max_memory_allocated(self.device) - before) // 2)
        # Memory grows with the window's length: a short first track (a single short window)
        # must not size the batches of the full windows that follow.
        per_window *= max(1.0, (self.segment + 2 * self.context) / item.size)
        free, _ = torch.cuda.mem_get_info(self.device)
        return max(1, min(MAX_AUTO_BATCH, int(0.5 * free // per_window)))

    def _record_start(self) -> torch.cuda.Event | None:
        if self.forward_events is None or self.device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _record_end(self, started: torch.cuda.Event | None) -> None:
        if started is not None:
            ended = torch.cuda.Event(enable_timing=True)
            ended.record()
            self.forward_events.append((started, ended))

    def _statistics(self, source: _Source) -> _Statistics:
        """First pass: the source's length and each stage signal's mean and deviation."""
        channels = source.channels
        resamplers = [self._resampler(source.rate, rate, channels) for rate in self.stage_rates]
        # Per stage: samples (counted on the host), and the float64 sums of the samples and of
        # their squares (device tensors, replaced rather than updated in place: every op is a
        # kernel launch on a GPU, and an indexed in-place update costs several).
        counts = [0] * len(resamplers)
        zeros = torch.zeros(channels, dtype=torch.float64, device=self.device)
        totals, squares = [zeros] * len(resamplers), [zeros] * len(resamplers)
        low = torch.full((channels,), math.inf, device=self.device)
        high = torch.full((channels,), -math.inf, device=self.device)
        frames = 0
        empty = torch.zeros(channels, 0, device=self.device)
        for block in itertools.chain(self._upload(source), [None]):
            with self._phase("resample_in"):
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
            raise AudioError(f"{source.name}: no audio samples (zero-length)")
        count = torch.tensor(counts, dtype=torch.float64, device=self.device)[:, None]
        count = count.clamp(min=1)
        mean = torch.stack(totals) / count
        variance = (torch.stack(squares) / count - mean**2).clamp(min=0)
        scale = variance.sqrt().clamp(min=SILENCE)
        base = self.config.sampling_rate
        length = _round_up(math.ceil(frames * base / source.rate), self.align)
        silent = ((high - low) <= SILENCE).cpu().numpy()  # constant within -100 dBFS
        return _Statistics(
            frames, mean.float()[..., None], scale.float()[..., None], length, silent
        )

    def _upload(self, source: _Source) -> Iterator[torch.Tensor]:
        """The source's blocks as float32 tensors on the device (pinned, asynchronous copies).
        An array goes up to a GPU once, whole, and both passes read it there."""
        if isinstance(source, _ArraySource) and self.device.type == "cuda":
            yield from source.on(self.device).split(_READ_BLOCK[self.resampler], dim=1)
            return
        blocks = source.blocks(_READ_BLOCK[self.resampler])
        if self.clock is None:  # with a phase clock, decoding is timed where it happens
            blocks = _read_ahead(blocks)
        while True:
            with self._phase("decode"):
                block = next(blocks, None)
                if block is None:
                    return
                tensor = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
                if self.device.type == "cuda":
                    tensor = tensor.pin_memory().to(self.device, non_blocking=True)
            yield tensor

    def _resampler(
        self, from_rate: int, to_rate: int, channels: int
    ) -> Callable[[torch.Tensor, bool], torch.Tensor]:
        """``resample(block, last)`` of consecutive (channels, n) device blocks as one signal:
        soxr through zero-copy numpy views on a CPU, or the torch resampler on the device."""
        if self.resampler == "torch":
            from pipeline.audio import TorchResampler

            return TorchResampler(from_rate, to_rate, channels, self.device).push
        stream = StreamResampler(from_rate, to_rate, channels)

        def resample(block: torch.Tensor, last: bool = False) -> torch.Tensor:
            on_host = block.cpu().numpy()
            return torch.from_numpy(stream.push(on_host, last)).to(self.device)

        return resample

    def _encode(
        self,
        name: str,
        sink: _SpoolSink,
        destination: Path,
        weights: dict[str, np.ndarray],
        format: str,
        rate: int,
        pool: ThreadPoolExecutor,
    ) -> _PendingFiles:
        """Start mixing the spooled stems into the output files (scaled by the least-squares
        coefficients), one pool task per file. With a phase clock (the bench) the files are
        also waited for here, so that the encode phase is timed on its own."""

        def write(output: str, gain: float) -> Future:
            path = destination / f"{output}.{format}"
            return pool.submit(_write_mix, sink, weights[output] * gain, path, format, rate)

        if self.clock is None:
            return _PendingFiles(name, sink, weights, write)
        with self._phase("encode"):
            pending = _PendingFiles(name, sink, weights, write)
            pending.result()
        return pending


class _PendingFiles:
    """Output files being written from one track's spool, each under a temporary name.

    Where the format clips (FLAC), a track whose files went over full scale has them written
    again, scaled (:func:`pipeline.audio.headroom_gain`): the outputs that are parts of the
    mixture (weights of 0 and 1: stems, ``no_vocals``, karaoke) by one gain, so that they still
    add up to it (scaled alike) and keep their balance, any other mix (a remix) by its own."""

    def __init__(
        self,
        name: str,
        sink: _SpoolSink,
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
        gains = _headroom_gains(self._weights, {name: w.peak for name, w in writers.items()})
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


def _headroom_gains(weights: dict[str, np.ndarray], peaks: dict[str, float]) -> dict[str, float]:
    """Per output, the gain that keeps it within full scale (1: as it is): one for all the parts
    of the mixture (0/1 weights), from their largest peak; each other mix its own."""
    parts = [name for name, weight in weights.items() if np.isin(weight, (0.0, 1.0)).all()]
    shared = headroom_gain(max((peaks[name] for name in parts), default=0.0))
    return {name: shared if name in parts else headroom_gain(peaks[name]) for name in weights}


def _write_mix(
    sink: _SpoolSink, weight: np.ndarray, path: Path, format: str, rate: int
) -> AudioWriter:
    """One output file, complete under its temporary name, from a track's spool of interleaved
    (frames, channels, 4) float32 stems: each channel the stems weighted by ``weight`` (4,)
    times the track's least-squares coefficients. Reads the spool by position (``os.pread``),
    so that several files of a track are written at once without sharing a file offset."""
    gains = (sink.ready() * weight[None]).astype(np.float32)  # (channels, 4)
    descriptor, channels = sink.spool.fileno(), sink.channels
    frame_bytes = channels * len(STEMS) * _FLOAT32
    writer = AudioWriter(path, rate, channels, format, sink.keep[1] - sink.keep[0])
    try:
        offset = 0
        while chunk := os.pread(descriptor, _WRITE_BLOCK * frame_bytes, offset):
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


class _Once:
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


class _Download:
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


class _Inline:
    """An executor that runs each task at once, in the calling thread (for the phase clock)."""

    def submit(self, function: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(function(*args))
        except Exception as error:
            future.set_exception(error)
        return future


def _read_ahead(blocks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """``blocks``, each read in a background thread while the caller works on the one before
    (decoding overlaps the device's work). One read is in flight at a time, and it is waited
    for when the iteration stops early, so the source is never read after it is closed."""
    with ThreadPoolExecutor(1) as reader:  # leaving it waits for a read in flight
        pending = reader.submit(next, blocks, None)
        while (block := pending.result()) is not None:
            pending = reader.submit(next, blocks, None)
            yield block


def _encode_threads(outputs: int) -> int:
    """Threads of the encoding pool: every core, and at least one per output file."""
    return max(outputs, os.cpu_count() or 1)


class _Item:
    """One (window, channel) of a track: its per-stage network inputs, views of the feed."""

    __slots__ = ("channel", "inputs", "track", "window")

    def __init__(self, track: _Track, window: int, channel: int, inputs: list[torch.Tensor]):
        self.track, self.window, self.channel, self.inputs = track, window, channel, inputs

    @property
    def size(self) -> int:
        return self.inputs[0].shape[-1]


class _Sink(Protocol):
    def store(self, offset: int, block: torch.Tensor) -> None: ...

    def finish(self, solve: Callable[[], np.ndarray]) -> object: ...


class _Track:
    """One source in the engine: the window items it feeds and what becomes of their outputs.

    Building one reads the source once for its statistics. :meth:`items` reads it again as the
    windows need it; :meth:`deliver` takes each item's network output; when all channels of the
    next window in time order are in, the window's segment is resampled back to the source rate,
    added to the least-squares sums and stored; :meth:`finish` flushes the resampler and returns
    what the sink makes of the scaled stems."""

    def __init__(self, engine: Separator, source: _Source, sink: _Sink) -> None:
        self.engine, self.source, self.sink = engine, source, sink
        self.statistics = engine._statistics(source)
        self.plan = engine.windows(self.statistics.length)
        self.channels = source.channels
        self.item_count = len(self.plan) * self.channels
        self.error: Exception | None = None
        self.on_window: Callable[[torch.Tensor], None] | None = None
        self.on_done: Callable[[], None] | None = None  # called once the last window is out
        self._mixture = _MixtureBuffer()
        self._feed = _StageFeed(engine, source, self.statistics, self._mixture)
        stems = self.channels * len(STEMS)
        self._back = engine._resampler(engine.config.top_rate, source.rate, stems)
        self._top = 2 ** (len(engine.stage_rates) - 1)
        self._pending: dict[int, list[torch.Tensor | None]] = {}
        self._ready = 0  # the next window in time order
        shape = (self.channels, len(STEMS))
        self._gram = torch.zeros(*shape, len(STEMS), dtype=torch.float64, device=engine.device)
        self._target = torch.zeros(*shape, dtype=torch.float64, device=engine.device)
        self._written = 0

    def items(self, strict: bool = True) -> Iterator[_Item]:
        """The track's items in time order; reading fails the track (or raises if ``strict``)."""
        stages = range(len(self.engine.stage_rates))
        try:
            for index, window in enumerate(self.plan):
                with self.engine._phase("resample_in"):
                    self._feed.ensure(window.end)
                    self._feed.release(window.begin)
                for channel in range(self.channels):
                    inputs = [
                        self._feed.window(channel, window.begin, window.end, stage)
                        for stage in stages
                    ]
                    yield _Item(self, index, channel, inputs)
        except Exception as error:
            if strict:
                raise
            self.error = error

    def deliver(self, item: _Item, stems: torch.Tensor) -> None:
        """Take one item's last-stage output (4, n)."""
        window = self.plan[item.window]
        keep = slice(
            self._top * (window.start - window.begin), self._top * (window.stop - window.begin)
        )
        self._pending.setdefault(item.window, [None] * self.channels)[item.channel] = stems[:, keep]
        while self._ready in self._pending and all(
            part is not None for part in self._pending[self._ready]
        ):
            self._window_done(torch.stack(self._pending.pop(self._ready)))
            self._ready += 1
        if self._ready == len(self.plan) and self.on_done is not None:
            done, self.on_done = self.on_done, None
            done()

    def finish(self) -> object:
        """Flush, and hand the sink a solver of the least squares: the sums come down
        asynchronously, so that the engine's thread does not wait for the device here; the sink
        solves when it needs the coefficients (a file sink: in its encoding threads)."""
        frames = self.statistics.frames
        with self.engine._phase("resample_out"):
            empty = torch.zeros(self.channels * len(STEMS), 0, device=self.engine.device)
            self._emit(self._back(empty, True))
            if self._written < frames:  # the resampler came up a few samples short
                self._emit(empty.new_zeros(empty.shape[0], frames - self._written))
            # (channels, 4, 5): the Gram matrix, then the target as a fifth column
            sums = _Download(torch.cat([self._gram, self._target.unsqueeze(-1)], dim=-1))
        return self.sink.finish(_Once(functools.partial(self._solve, sums)))

    def _solve(self, sums: _Download) -> np.ndarray:
        """The least-squares coefficients (channels, 4) from the downloaded sums."""
        downloaded = sums.numpy()
        gram, target = downloaded[..., : len(STEMS)], downloaded[..., len(STEMS)]
        if not np.isfinite(downloaded).all():
            precision = self.engine.precision
            raise FloatingPointError(
                f"{self.source.name}: the network produced non-finite values at {precision} "
                f"precision" + ("; use float32" if precision != "float32" else "")
            )
        coefficients = least_squares(gram, target)
        # A channel without any signal beyond a constant (silence, DC) has nothing to separate:
        # fitting the network's output to the offset would invent stems.
        coefficients[self.statistics.silent] = 0
        return coefficients

    def _window_done(self, top: torch.Tensor) -> None:
        """A window's segment of all channels (channels, 4, n) at the last stage's rate."""
        if self.on_window is not None:
            self.on_window(top)
            return
        with self.engine._phase("resample_out"):
            self._emit(self._back(top.reshape(self.channels * len(STEMS), -1), False))

    def _emit(self, block: torch.Tensor) -> None:
        """Source-rate stems (channels * 4, n): least-squares sums, then the sink."""
        block = block[:, : self.statistics.frames - self._written]
        block = block.reshape(self.channels, len(STEMS), -1)
        count = block.shape[-1]
        if not count:
            return
        mix = self._mixture.take(self._written, self._written + count).double()
        stems = block.double()
        self._gram += stems @ stems.transpose(1, 2)
        self._target += (stems @ mix.unsqueeze(-1))[..., 0]
        self.sink.store(self._written, block)
        self._written += count


class _ArraySink:
    """Unscaled stems into one host array (4, channels, frames), pinned on CUDA so that every
    window's copy is asynchronous; scaled once at the end."""

    def __init__(self, source: _ArraySource, device: torch.device) -> None:
        self.device = device
        shape = (len(STEMS), *source.audio.shape)
        self.stems = torch.empty(shape, pin_memory=device.type == "cuda")

    def store(self, offset: int, block: torch.Tensor) -> None:
        target = self.stems[:, :, offset : offset + block.shape[-1]]
        target.copy_(block.transpose(0, 1), non_blocking=True)

    def finish(self, solve: Callable[[], np.ndarray]) -> dict[str, np.ndarray]:
        _synchronize(self.device)
        coefficients = solve()
        stems = self.stems.numpy()
        for k, stem in enumerate(stems):
            stem *= coefficients[:, k : k + 1].astype(np.float32)
        return dict(zip(STEMS, stems, strict=True))


class _SpoolSink:
    """Unscaled stems, frames [keep) of the source, to a spool file as interleaved float32
    (frames, channels, 4), written by a thread of its own (in order) so that the engine's thread
    never waits on the disk. On CUDA each block comes down into a pinned buffer and that thread
    also waits for the copy. At most ``_COPY_DEPTH`` blocks are in flight on CUDA, one on a CPU
    (bounded memory)."""

    def __init__(
        self, spool: BinaryIO, channels: int, device: torch.device, keep: tuple[int, int]
    ) -> None:
        self.spool, self.channels, self.device, self.keep = spool, channels, device, keep
        self._writer = ThreadPoolExecutor(1)
        self._in_flight: deque[Future] = deque()
        self._ready: _Once | None = None

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

    def finish(self, solve: Callable[[], np.ndarray]) -> _SpoolSink:
        """Take the track's least-squares solver; nothing is waited for here (see ready)."""
        self._ready = _Once(functools.partial(self._complete, solve))
        return self

    def ready(self) -> np.ndarray:
        """The least-squares coefficients (channels, 4), once every block is in the spool (a
        write's or the solver's failure is raised here). Safe to call from several threads:
        the first call does the waiting, the others wait for it."""
        if self._ready is None:
            raise RuntimeError("internal error: spool read before its track was finished")
        return self._ready()

    def _complete(self, solve: Callable[[], np.ndarray]) -> np.ndarray:
        try:
            while self._in_flight:
                self._in_flight.popleft().result()
            self.spool.flush()  # the encoders read the file by position, past Python's buffer
        finally:
            self._writer.shutdown()
        return solve()


class _DiscardSink:
    def store(self, offset: int, block: torch.Tensor) -> None:
        pass

    def finish(self, solve: Callable[[], np.ndarray]) -> None:
        return None


class _MixtureBuffer:
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


class _StageFeed:
    """The normalised per-stage signals of a source on the device, produced as windows need them
    and dropped when no window needs them any more."""

    def __init__(
        self,
        engine: Separator,
        source: _Source,
        statistics: _Statistics,
        mixture: _MixtureBuffer | None = None,
    ) -> None:
        self._blocks = engine._upload(source)
        self._channels = source.channels
        self._resamplers = [
            engine._resampler(source.rate, rate, source.channels) for rate in engine.stage_rates
        ]
        self._statistics, self._mixture = statistics, mixture
        # Each stage's (channels, 1) views, taken once rather than indexed for every block
        self._means, self._scales = statistics.mean.unbind(), statistics.scale.unbind()
        self._empty = torch.zeros(source.channels, 0, device=engine.device)
        stages = len(engine.stage_rates)
        # Each stage's signal as the blocks it was produced in (appending never copies what is
        # kept), from stage sample `_offsets[i]` on; `_held[i]` samples in all.
        self._parts: list[deque[torch.Tensor]] = [deque() for _ in range(stages)]
        self._offsets, self._held = [0] * stages, [0] * stages
        self._assembled: list[tuple[int, int, torch.Tensor] | None] = [None] * stages
        self._exhausted = False

    def ensure(self, end: int) -> None:
        """Make base-rate samples up to ``end`` available in every stage."""
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
                size = self._statistics.length * 2**i - self._offsets[i]
                while self._held[i] > size:
                    excess = self._held[i] - size
                    if parts[-1].shape[1] <= excess:
                        self._held[i] -= parts.pop().shape[1]
                    else:
                        parts[-1] = parts[-1][:, : parts[-1].shape[1] - excess]
                        self._held[i] = size
                if self._held[i] < size:
                    self._append(i, self._empty.new_zeros(self._channels, size - self._held[i]))

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


def plan_windows(length: int, segment: int, context: int, align: int = 1) -> list[Window]:
    """Windows covering [0, length) in near-equal segments of at most ``segment`` samples.

    Every window spans ``segment + 2 * context`` samples around its segment, shifted inwards at
    the ends so that all windows have the same length; a track no longer than one window is a
    single window (a single pass). ``length``, ``segment`` and ``context`` are multiples of
    ``align``, and so are all window bounds.
    """
    size = segment + 2 * context
    if length <= size:
        return [Window(0, length, 0, length)]
    count = math.ceil(length / segment)
    step = _round_up(math.ceil(length / count), align)
    plan = []
    for start in range(0, length, step):
        stop = min(start + step, length)
        begin = min(max(0, start - context), length - size)
        plan.append(Window(start, stop, begin, begin + size))
    return plan


@functools.cache
def keep_freed_memory() -> bool:
    """Make this process's allocator keep freed memory for reuse (glibc only; once per process).

    Every window's forward allocates and frees the same large activations. glibc serves blocks of
    more than 32 MB with ``mmap`` and unmaps them when freed (and trims the heap's free top), so
    each window touched fresh pages that the kernel had to zero: a tenth of the CPU time of the
    shipped model, more for bfloat16. Here large blocks come from the heap and freed memory stays
    there for the next window: the process keeps its peak resident size until it ends, and the
    peak itself is higher (measured: +7% for the shipped model, +20% for the paper model in
    float32, +1% in bfloat16). Threads made after this call allocate from the same arena, so
    it holds in them too (threads made before keep their own arenas: see ``ONE_ARENA_ENV``).
    Returns whether the settings were applied."""
    if platform.system() != "Linux":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no tunable allocator)
        return False
    trim_threshold, mmap_max, arena_max = -1, -4, -8  # M_TRIM_THRESHOLD etc. of <malloc.h>
    # One arena for the threads to come: a thread's own arena lives in 64 MB heaps that glibc
    # unmaps as soon as they are empty, whatever the trim threshold, so a separation called from
    # a thread (a server's worker) touched fresh pages again.
    return all(
        mallopt(option, value)
        for option, value in ((trim_threshold, 2**31 - 1), (mmap_max, 0), (arena_max, 1))
    )


def least_squares(gram: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per channel, the stem weights x minimising |mix - sum_k x_k stem_k|², from the normal
    equations (gram = A Aᵀ, target = A mix); minimum-norm where stems are degenerate."""
    return np.stack(
        [np.linalg.lstsq(g, t, rcond=None)[0] for g, t in zip(gram, target, strict=True)]
    )


def model_fingerprint(model: MultiTasNet) -> str:
    """A short stable hash of a model's configuration and weights."""
    digest = hashlib.blake2b(model.config.to_json().encode(), digest_size=8)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _checked(audio: np.ndarray, sample_rate: int) -> np.ndarray:
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


def _dtype(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype of a precision name, refused where the device cannot run it well."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (use {', '.join(PRECISIONS)})")
    dtype = PRECISIONS[precision]
    if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bfloat16; use float16 or float32")
    if device.type == "cpu" and dtype is not torch.float32:
        check = getattr(
            torch.ops.mkldnn,
            f"_is_mkldnn_{'bf16' if dtype is torch.bfloat16 else 'fp16'}_supported",
            None,
        )
        if check is not None and not check():
            raise ValueError(f"this CPU has no fast {precision} matrix products; use float32")
    return dtype


@contextlib.contextmanager
def _folder(path: Path) -> Iterator[Path]:
    """Create ``path`` if needed; remove it again if it was created and the work failed."""
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if created and not any(path.iterdir()):
            path.rmdir()
        raise


def _round_to(value: float, multiple: int) -> int:
    return round(value / multiple) * multiple


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _writable(source: _Source | Exception, format: str, strict: bool) -> _Source | Exception:
    """``source``, or the AudioError that ``format`` cannot hold its rate and channels (raised
    when ``strict``): found before the source is separated, not when its files are written."""
    if isinstance(source, Exception):
        return source
    try:
        check_writable(source.name, format, source.rate, source.channels)
    except AudioError as error:
        if strict:
            raise
        return error
    return source


def _output_weights(outputs: Mixes | None, format: str) -> dict[str, np.ndarray]:
    """Output name -> its weights of (drums, bass, other, vocals), checked with the format."""
    if format not in FORMATS:
        raise ValueError(f"unknown audio format {format!r} (use {FORMAT_NAMES})")
    weights = {name: np.asarray(w, dtype=np.float64) for name, w in (outputs or FOUR_STEMS).items()}
    if any(w.shape != (len(STEMS),) for w in weights.values()):
        raise ValueError(f"each output needs {len(STEMS)} weights, one per stem")
    return weights


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _excerpt(
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
