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

Everything streams: the source is read block by block (twice: once for the normalisation
statistics, once for the windows), stage signals are kept only while a window needs them, and the
output is produced in time order. :meth:`Separator.separate_file` writes the stems straight to
files, so a long recording never has to fit in memory; :meth:`Separator.separate` returns arrays
(the input and four stems of its size are then in memory, nothing else of track size).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import itertools
import json
import math
import platform
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import torch
from tqdm import tqdm

from model import STEMS, MultiTasNet, load_checkpoint
from model.frozen import FrozenTasNet, frames_multiple
from pipeline.audio import (
    FORMATS,
    AudioError,
    AudioReader,
    AudioWriter,
    StreamResampler,
    open_audio,
)

ENGINE_VERSION = 2  # bump when a change alters the engine's output for the same options
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SILENCE = 1e-5  # floor of the normalising standard deviation (about -100 dBFS)
# Window defaults, from `metasep bench` (README): the mask network's GroupNorms take their
# statistics over the whole window, so agreement with the single pass grows with the window's
# length (paper model, 60 s: 38 dB with 30 s segments, bf16 included); 2 s of context cover the
# TCN's receptive field (~0.95 s each side) and cost 13% extra work.
DEFAULT_SEGMENT = 30.0  # seconds of output per window
DEFAULT_CONTEXT = 2.0  # seconds of context on each side of a segment
DEFAULT_BATCH = 2  # windows (window x channel) per forward: a stereo window's two channels
_READ_BLOCK = 1 << 17  # source frames per read
_WRITE_BLOCK = 1 << 17  # frames per block when writing files
_FLOAT32 = np.dtype(np.float32).itemsize

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

    @property
    def channels(self) -> int:
        return self.audio.shape[0]

    def blocks(self, size: int) -> Iterator[np.ndarray]:
        for start in range(0, self.audio.shape[1], size):
            yield self.audio[:, start : start + size]


@dataclass
class _Statistics:
    """What the first pass over a source finds: its length and each stage's normalisation."""

    frames: int  # source samples
    mean: np.ndarray  # (stages, channels)
    scale: np.ndarray  # (stages, channels): the standard deviation, floored at SILENCE
    length: int  # base-rate samples the network runs on (padded up to the window alignment)
    silent: np.ndarray  # (channels,): no signal beyond a constant (silence or DC) in the source


class Separator:
    """Meta-TasNet separation of whole tracks; build once, call many times.

    ``checkpoint`` is a path, the name of shipped weights (``"default"``) or a model. ``device``
    defaults to CUDA when available. ``precision`` is ``"float32"``, ``"bfloat16"`` or
    ``"float16"`` (the network's matrix products run in it; normalisation statistics stay in
    float32/64). ``segment`` and ``context`` are in seconds; ``batch_size`` counts windows of
    one channel each.
    """

    def __init__(
        self,
        checkpoint: str | Path | MultiTasNet = "default",
        device: str | torch.device | None = None,
        precision: str = "float32",
        segment: float = DEFAULT_SEGMENT,
        context: float = DEFAULT_CONTEXT,
        batch_size: int = DEFAULT_BATCH,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("CUDA is not available on this machine; use --device cpu")
        dtype = _dtype(precision, self.device)
        if segment <= 0 or context < 0 or batch_size < 1:
            raise ValueError("segment must be > 0, context >= 0 and batch_size >= 1")
        model = checkpoint if isinstance(checkpoint, MultiTasNet) else load_checkpoint(checkpoint)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.config = model.config
        self.model_id = model_fingerprint(model)
        self.network = FrozenTasNet(model, dtype).to(self.device).eval()
        self.precision, self.batch_size = precision, batch_size
        self.stage_rates = self.config.stage_rates()
        self.align = frames_multiple(model)
        base = self.config.sampling_rate
        self.segment = max(self.align, _round_to(segment * base, self.align))
        self.context = _round_to(context * base, self.align)
        options = {
            "engine": ENGINE_VERSION,
            "precision": precision,
            "segment": self.segment,
            "context": self.context,
            "silence": SILENCE,
        }
        self.options_hash = _digest(json.dumps(options, sort_keys=True).encode())

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
        audio = _checked(audio, sample_rate)
        channels, frames = audio.shape
        stems = [np.zeros((channels, frames), dtype=np.float32) for _ in STEMS]

        def store(offset: int, block: np.ndarray) -> None:
            for stem, part in zip(stems, block.transpose(1, 0, 2), strict=True):
                stem[:, offset : offset + part.shape[-1]] = part

        source = _ArraySource(audio, sample_rate)
        coefficients = self._separate(source, store, progress, callback)
        for k, stem in enumerate(stems):
            stem *= coefficients[:, k : k + 1].astype(np.float32)
        return dict(zip(STEMS, stems, strict=True))

    def separate_file(
        self,
        path: str | Path,
        destination: str | Path,
        outputs: Mixes | None = None,
        format: str = "flac",
        progress: bool = False,
        callback: WindowCallback | None = None,
    ) -> dict[str, Path]:
        """Separate an audio file into ``destination/<name>.<format>`` files; returns their paths.

        ``outputs`` maps each file name to the weights of (drums, bass, other, vocals) it mixes,
        by default the four stems. The unscaled stems go to an anonymous temporary file in
        ``destination``; each output is written under a temporary name and renamed when done.
        ``progress`` and ``callback`` are as in :meth:`separate`.
        """
        if format not in FORMATS:
            raise ValueError(f"unknown audio format {format!r} (use {' or '.join(FORMATS)})")
        outputs = dict(outputs or FOUR_STEMS)
        weights = np.array([list(w) for w in outputs.values()], dtype=np.float64).T  # (4, outputs)
        if weights.shape[0] != len(STEMS):
            raise ValueError(f"each output needs {len(STEMS)} weights, one per stem")
        destination = Path(destination)
        with open_audio(path) as reader, _folder(destination) as folder:
            paths = self._separate_reader(
                reader, folder, outputs, weights, format, progress, callback
            )
        return paths

    def _separate_reader(
        self,
        reader: AudioReader,
        destination: Path,
        outputs: Mixes,
        weights: np.ndarray,
        format: str,
        progress: bool,
        callback: WindowCallback | None,
    ) -> dict[str, Path]:
        """:meth:`separate_file` on an open reader, into an existing folder."""
        with tempfile.TemporaryFile(dir=destination) as spool:
            channels = reader.channels

            def store(offset: int, block: np.ndarray) -> None:
                spool.write(np.ascontiguousarray(block.transpose(2, 0, 1)).tobytes())

            coefficients = self._separate(reader, store, progress, callback)
            spool.seek(0)
            mixing = _block_diagonal(coefficients[:, :, None] * weights[None])
            paths = {name: destination / f"{name}.{format}" for name in outputs}
            with contextlib.ExitStack() as stack:
                writers = [
                    stack.enter_context(AudioWriter(p, reader.rate, channels, format))
                    for p in paths.values()
                ]
                # The encoders run in threads (libsndfile releases the GIL): FLAC encoding of
                # four stems was a sixth of a small model's time on one core.
                encoders = stack.enter_context(ThreadPoolExecutor(len(writers)))
                while chunk := spool.read(_WRITE_BLOCK * channels * len(STEMS) * _FLOAT32):
                    block = np.frombuffer(chunk, dtype=np.float32).reshape(-1, channels * 4)
                    mixed = (block @ mixing).reshape(len(block), channels, len(outputs))
                    parts = [np.ascontiguousarray(out).T for out in mixed.transpose(2, 0, 1)]
                    list(encoders.map(AudioWriter.write, writers, parts))
        return paths

    # ----------------------------------------------------------------------------------------
    # Measurement helpers (the benchmark compares these with the model's own paths)

    def stage_mixes(self, audio: np.ndarray, sample_rate: int) -> list[np.ndarray]:
        """The normalised per-stage signals (channels, length * 2**i) the network is given."""
        source = _ArraySource(_checked(audio, sample_rate), sample_rate)
        statistics = self._statistics(source)
        feed = _StageFeed(source, self.stage_rates, statistics)
        feed.ensure(statistics.length)
        return [feed.window(None, 0, statistics.length, stage) for stage in range(len(feed))]

    def last_stage(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """The windowed network output at the last stage's rate, (channels, 4, length * 2**s),
        before resampling and scaling."""
        source = _ArraySource(_checked(audio, sample_rate), sample_rate)
        statistics = self._statistics(source)
        return np.concatenate(list(self._windowed(source, statistics, progress=False)), axis=-1)

    def windows(self, length: int) -> list[Window]:
        """The window plan for a base-rate length."""
        return plan_windows(length, self.segment, self.context, self.align)

    # ----------------------------------------------------------------------------------------
    # The engine

    def _separate(
        self,
        source: _Source,
        store: Callable[[int, np.ndarray], None],
        progress: bool,
        callback: WindowCallback | None = None,
    ) -> np.ndarray:
        """Stream the stems of ``source`` at its rate to ``store(offset, (channels, 4, n))``;
        return the least-squares coefficients (channels, 4) that make them sum to the mix."""
        statistics = self._statistics(source)
        channels, frames = source.channels, statistics.frames
        back = StreamResampler(self.config.top_rate, source.rate, channels * len(STEMS))
        feed_mix = _MixtureBuffer()
        gram = np.zeros((channels, len(STEMS), len(STEMS)))
        target = np.zeros((channels, len(STEMS)))
        written = 0

        def emit(block: np.ndarray) -> None:
            nonlocal written, gram, target
            block = block[:, : frames - written].reshape(channels, len(STEMS), -1)
            if not block.shape[-1]:
                return
            mix = feed_mix.take(written, written + block.shape[-1]).astype(np.float64)
            stems = block.astype(np.float64)
            gram += stems @ stems.transpose(0, 2, 1)  # BLAS; einsum took longer than the network
            target += (stems @ mix[:, :, None])[..., 0]
            store(written, block)
            written += block.shape[-1]

        for top in self._windowed(source, statistics, progress, feed_mix, callback):
            emit(back.push(top.reshape(channels * len(STEMS), -1)))
        emit(back.push(np.zeros((channels * len(STEMS), 0), np.float32), last=True))
        if written < frames:  # the resampler came up a few samples short
            emit(np.zeros((channels * len(STEMS), frames - written), np.float32))
        coefficients = least_squares(gram, target)
        # A channel without any signal beyond a constant (silence, DC) has nothing to separate:
        # fitting the network's output to the offset would invent stems.
        coefficients[statistics.silent] = 0
        return coefficients

    def _statistics(self, source: _Source) -> _Statistics:
        """First pass: the source's length and each stage signal's mean and deviation."""
        channels = source.channels
        resamplers = [StreamResampler(source.rate, rate, channels) for rate in self.stage_rates]
        sums = np.zeros((len(resamplers), channels, 3))  # count, sum, sum of squares
        frames = 0
        empty = np.zeros((channels, 0), np.float32)
        low, high = np.full(channels, np.inf), np.full(channels, -np.inf)
        for block in itertools.chain(source.blocks(_READ_BLOCK), [None]):
            if block is not None and block.shape[1]:
                frames += block.shape[1]
                low, high = np.minimum(low, block.min(1)), np.maximum(high, block.max(1))
            for i, resampler in enumerate(resamplers):
                part = resampler.push(empty if block is None else block, last=block is None)
                part = part.astype(np.float64)
                sums[i] += np.stack(
                    [np.full(channels, part.shape[1]), part.sum(1), (part**2).sum(1)], 1
                )
        if frames == 0:
            raise AudioError(f"{source.name}: no audio samples (zero-length)")
        count = np.maximum(sums[..., 0], 1)
        mean = sums[..., 1] / count
        variance = np.maximum(sums[..., 2] / count - mean**2, 0)
        scale = np.maximum(np.sqrt(variance), SILENCE)
        base = self.config.sampling_rate
        length = _round_up(math.ceil(frames * base / source.rate), self.align)
        silent = high - low <= SILENCE  # constant within -100 dBFS
        return _Statistics(
            frames, mean.astype(np.float32), scale.astype(np.float32), length, silent
        )

    def _windowed(
        self,
        source: _Source,
        statistics: _Statistics,
        progress: bool,
        mixture: _MixtureBuffer | None = None,
        callback: WindowCallback | None = None,
    ) -> Iterator[np.ndarray]:
        """Second pass: the last stage's output (channels, 4, n) segment by segment, in order."""
        channels = source.channels
        plan = self.windows(statistics.length)
        feed = _StageFeed(source, self.stage_rates, statistics, mixture)
        items = [(w, c) for w in range(len(plan)) for c in range(channels)]
        pending: dict[int, list[np.ndarray | None]] = {}
        ready = 0
        top = 2 ** (len(self.stage_rates) - 1)
        with tqdm(
            total=len(items), disable=not progress, unit="window", leave=False, desc=source.name
        ) as bar:
            done = 0
            if callback is not None:
                callback(done, len(items))
            for batch in _chunks(items, self.batch_size):
                windows = [plan[w] for w, _ in batch]
                feed.ensure(max(window.end for window in windows))
                feed.release(min(window.begin for window in windows))
                inputs = [
                    np.stack([feed.window(c, plan[w].begin, plan[w].end, stage) for w, c in batch])
                    for stage in range(len(self.stage_rates))
                ]
                outputs = self._forward(inputs)
                for (w, c), window, stems in zip(batch, windows, outputs, strict=True):
                    segment = slice(
                        top * (window.start - window.begin), top * (window.stop - window.begin)
                    )
                    pending.setdefault(w, [None] * channels)[c] = stems[:, segment]
                bar.update(len(batch))
                done += len(batch)
                if callback is not None:
                    callback(done, len(items))
                while ready in pending and all(part is not None for part in pending[ready]):
                    yield np.stack(pending.pop(ready))
                    ready += 1

    def _forward(self, inputs: list[np.ndarray]) -> np.ndarray:
        """The network's last-stage stems (batch, 4, n) of per-stage mono inputs (batch, n_i)."""
        tensors = [torch.from_numpy(x).unsqueeze(1) for x in inputs]
        if self.device.type == "cuda":
            tensors = [t.pin_memory().to(self.device, non_blocking=True) for t in tensors]
        else:
            tensors = [t.to(self.device) for t in tensors]
        stems = self.network.separate_last(tensors)[:, :, 0].float().cpu().numpy()
        if not np.isfinite(stems).all():
            raise FloatingPointError(
                f"the network produced non-finite values at {self.precision} precision"
                + ("; use float32" if self.precision != "float32" else "")
            )
        return stems


class _MixtureBuffer:
    """Source-rate blocks kept from when they are read until the output has reached them."""

    def __init__(self) -> None:
        self._blocks: list[np.ndarray] = []
        self._offset = 0  # source sample index of the first kept sample

    def append(self, block: np.ndarray) -> None:
        self._blocks.append(block)

    def take(self, start: int, stop: int) -> np.ndarray:
        """Samples [start, stop); everything before ``stop`` is dropped afterwards."""
        if not self._blocks:
            raise RuntimeError("internal error: mixture requested before it was read")
        data = np.concatenate(self._blocks, axis=1) if len(self._blocks) > 1 else self._blocks[0]
        if start < self._offset or stop - self._offset > data.shape[1]:
            raise RuntimeError("internal error: mixture requested outside the kept span")
        part = data[:, start - self._offset : stop - self._offset]
        self._blocks = [data[:, stop - self._offset :]]
        self._offset = stop
        return part


class _StageFeed:
    """The normalised per-stage signals of a source, produced as windows need them and dropped
    when no window needs them any more."""

    def __init__(
        self,
        source: _Source,
        rates: Sequence[int],
        statistics: _Statistics,
        mixture: _MixtureBuffer | None = None,
    ) -> None:
        self._blocks = source.blocks(_READ_BLOCK)
        self._channels = source.channels
        self._resamplers = [StreamResampler(source.rate, rate, source.channels) for rate in rates]
        self._statistics, self._mixture = statistics, mixture
        self._buffers = [np.zeros((source.channels, 0), np.float32) for _ in rates]
        self._offsets = [0] * len(rates)  # stage sample index of each buffer's first sample
        self._exhausted = False

    def __len__(self) -> int:
        return len(self._buffers)

    def ensure(self, end: int) -> None:
        """Make base-rate samples up to ``end`` available in every stage."""
        while not self._exhausted and any(
            offset + buffer.shape[1] < end * 2**i
            for i, (offset, buffer) in enumerate(zip(self._offsets, self._buffers, strict=True))
        ):
            block = next(self._blocks, None)
            if block is not None and self._mixture is not None:
                self._mixture.append(block)
            self._exhausted = block is None
            for i, resampler in enumerate(self._resamplers):
                if block is None:
                    part = resampler.push(np.zeros((self._channels, 0), np.float32), last=True)
                else:
                    part = resampler.push(block)
                part = (part - self._statistics.mean[i, :, None]) / self._statistics.scale[
                    i, :, None
                ]
                self._buffers[i] = np.concatenate([self._buffers[i], part.astype(np.float32)], 1)
        if self._exhausted:  # zero padding up to the planned length, nothing beyond it
            for i, buffer in enumerate(self._buffers):
                size = self._statistics.length * 2**i - self._offsets[i]
                if buffer.shape[1] != size:
                    padded = np.zeros((self._channels, size), np.float32)
                    padded[:, : min(size, buffer.shape[1])] = buffer[:, :size]
                    self._buffers[i] = padded

    def release(self, begin: int) -> None:
        """Drop base-rate samples before ``begin`` in every stage."""
        for i, buffer in enumerate(self._buffers):
            drop = begin * 2**i - self._offsets[i]
            if drop > 0:
                self._buffers[i] = buffer[:, drop:].copy()
                self._offsets[i] += drop

    def window(self, channel: int | None, begin: int, end: int, stage: int) -> np.ndarray:
        """Stage ``stage`` samples of base-rate span [begin, end) (all channels for None)."""
        m, offset = 2**stage, self._offsets[stage]
        rows = slice(None) if channel is None else channel
        part = self._buffers[stage][rows, m * begin - offset : m * end - offset]
        if part.shape[-1] != m * (end - begin):
            raise RuntimeError("internal error: window outside the available signal")
        return part


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
    float32, +1% in bfloat16). Returns whether the settings were applied."""
    if platform.system() != "Linux":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no tunable allocator)
        return False
    trim_threshold, mmap_max = -1, -4  # M_TRIM_THRESHOLD, M_MMAP_MAX from <malloc.h>
    return bool(mallopt(trim_threshold, 2**31 - 1)) and bool(mallopt(mmap_max, 0))


def _block_diagonal(mixing: np.ndarray) -> np.ndarray:
    """(channels, 4, outputs) weights as one float32 (channels*4, channels*outputs) matrix, so
    that interleaved (frames, channels*4) stems times it are (frames, channels*outputs) mixes."""
    channels, stems, outputs = mixing.shape
    matrix = np.zeros((channels, stems, channels, outputs), dtype=np.float32)
    for channel in range(channels):
        matrix[channel, :, channel] = mixing[channel]
    return matrix.reshape(channels * stems, channels * outputs)


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


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _round_to(value: float, multiple: int) -> int:
    return round(value / multiple) * multiple


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()
