"""Audio I/O and resampling: the one place the project decodes, encodes and resamples audio.

Arrays are float32 of shape (channels, samples) everywhere in the project.

Decoding goes through libsndfile (WAV, FLAC, OGG, MP3, AIFF...) and falls back to ffmpeg for what
libsndfile cannot read (M4A/AAC, the mixture stream of a ``.stem.mp4``); ffmpeg decodes the first
audio stream to a temporary float WAV that is then read like any other file, block by block, so
that long tracks need not be held in memory. Every failure is an :class:`AudioError` whose message
names the input and says why in one line.

Encoded outputs are written under a temporary name next to the destination and renamed when
complete, so an interrupted run never leaves a file that looks finished. Integer PCM (the FLAC
stems) and MP3 hold samples within full scale only: a writer measures the peak of what it was
given, and the writers of separated audio write a file again, scaled by :func:`headroom_gain`,
when the peak went over (float WAV keeps any level as it is).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import itertools
import math
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr
import torch

from pipeline.tags import peek, read_tags, write_tags

# The stem formats users pick: 24-bit FLAC, 32-bit float WAV, MP3 at 320 kbps (lossy, for
# listening; libsndfile reads it back gapless, sample-aligned with the source)
FORMATS = {"flac": ("FLAC", "PCM_24"), "wav": ("WAV", "FLOAT"), "mp3": ("MP3", "MPEG_LAYER_III")}
FORMAT_NAMES = ", ".join(FORMATS)  # for messages: "flac, wav, mp3"
# Encodings the project also writes but offers no user to pick: 16-bit PCM WAV, for the datasets
# of ``metasep synth``, whose int16 samples go to the file as they are (exact sums of stems).
_ENCODINGS = {**FORMATS, "wav16": ("WAV", "PCM_16")}
_SET_ADD_PEAK_CHUNK = 0x1050  # libsndfile's SFC_SET_ADD_PEAK_CHUNK, which soundfile does not name
# The most sample data a RIFF WAV file holds (its sizes are 32-bit), less room for its header:
# libsndfile writes past it without a word, and readers then lose the end (measured: a 4.36 GB
# float WAV read back 536,870,911 of its 545,259,520 frames). Longer WAV output is RF64.
_WAV_DATA_BYTES = 2**32 - 2**20
_SAMPLE_BYTES = {"FLOAT": 4, "PCM_24": 3, "PCM_16": 2}
_BLOCK = 1 << 18  # frames per block when reading whole files
_HEADER_BYTES = 1 << 16  # read for a FLAC source's Vorbis comments
_FULL_DISK_BYTES = 1 << 20  # free space below which a failed write is taken for a full disk
RESCALE_PEAK = 0.99  # where a rescaled file's peak lands (-0.09 dBFS), as Demucs' rescale puts it


class AudioError(ValueError):
    """Audio that cannot be read or used: the message names the input and says why."""


class AudioReader:
    """An open audio input: its rate, channel count and length, read block by block.

    Use :func:`open_audio` to get one, as a context manager. :meth:`blocks` can be called several
    times; each call reads from the start.
    """

    def __init__(
        self,
        file: sf.SoundFile,
        name: str,
        cleanup: contextlib.ExitStack,
        tags: dict[str, str] | None = None,
    ) -> None:
        self._file, self.name, self._cleanup = file, name, cleanup
        self.rate, self.channels = int(file.samplerate), int(file.channels)
        self.frames = int(file.frames)
        self.tags = tags or {}  # title, artist, album... (pipeline.tags)

    def blocks(
        self, size: int = _BLOCK, start: int = 0, stop: int | None = None
    ) -> Iterator[np.ndarray]:
        """Consecutive float32 (channels, frames) blocks of at most ``size`` frames, of the
        frames [start, stop) (the whole input by default)."""
        self._file.seek(start)
        remaining = float("inf") if stop is None else stop - start  # None: to the end of file
        while remaining > 0:
            try:
                count = int(min(size, remaining))
                block = self._file.read(count, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as error:
                raise AudioError(f"{self.name}: cannot decode audio ({error})") from None
            if not len(block):
                return
            if not np.isfinite(block).all():
                raise AudioError(f"{self.name}: contains NaN or infinite samples")
            remaining -= len(block)
            yield np.ascontiguousarray(block.T)

    def read(self) -> np.ndarray:
        """The whole input as float32 (channels, samples)."""
        parts = list(self.blocks())
        if not parts:
            raise AudioError(f"{self.name}: no audio samples (zero-length)")
        return np.concatenate(parts, axis=1)

    def close(self) -> None:
        self._file.close()
        self._cleanup.close()

    def __enter__(self) -> AudioReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_audio(source: str | Path | BinaryIO, stream: int = 0) -> AudioReader:
    """Open an audio file (path or binary file object) for block-wise reading; ``stream``
    picks an audio stream of a container holding several (a .stem.mp4: decoded by ffmpeg).

    Raises :class:`AudioError` for a missing, empty, unreadable or non-audio input, and for one
    without any samples.
    """
    name = _name(source)
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.exists():
            raise AudioError(f"{name}: no such file")
        if path.is_dir():
            raise AudioError(f"{name}: is a directory, not an audio file")
        if path.stat().st_size == 0:
            raise AudioError(f"{name}: empty file")
    cleanup = contextlib.ExitStack()
    try:
        header = _header(source)
        try:
            if stream:
                raise RuntimeError("libsndfile reads one stream")
            file = sf.SoundFile(source)
        except (sf.LibsndfileError, RuntimeError, TypeError):
            file = sf.SoundFile(_decode_with_ffmpeg(source, name, cleanup, stream))
        reader = AudioReader(file, name, cleanup, read_tags(file, header))
    except BaseException:
        cleanup.close()
        raise
    if reader.frames == 0:
        reader.close()
        raise AudioError(f"{name}: no audio samples (zero-length)")
    return reader


def _header(source: str | Path | BinaryIO) -> bytes:
    """The first bytes of a source (where FLAC keeps its tags), or b"" where it cannot say."""
    if isinstance(source, str | Path):
        with open(source, "rb") as file:
            return file.read(_HEADER_BYTES)
    return peek(source, _HEADER_BYTES) if source.seekable() else b""


def read_audio(source: str | Path | BinaryIO) -> tuple[np.ndarray, int]:
    """Decode a file into float32 (channels, samples) and its sample rate."""
    with open_audio(source) as reader:
        return reader.read(), reader.rate


def _decode_with_ffmpeg(
    source: str | Path | BinaryIO, name: str, cleanup: contextlib.ExitStack, stream: int = 0
) -> Path:
    """Decode audio stream ``stream`` with ffmpeg to a temporary float WAV; return its path."""
    if shutil.which("ffmpeg") is None:
        raise AudioError(f"{name}: not readable by libsndfile, and ffmpeg is not installed")
    folder = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="metasep-")))
    if isinstance(source, str | Path):
        path = Path(source)
    else:
        path = folder / "input"
        with contextlib.suppress(OSError, AttributeError):
            source.seek(0)
        with path.open("wb") as spool:
            shutil.copyfileobj(source, spool)
        if path.stat().st_size == 0:
            raise AudioError(f"{name}: empty file")
    decoded = folder / "decoded.wav"
    command = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", f"0:a:{stream}", "-vn"]
    command += ["-c:a", "pcm_f32le", "-rf64", "auto", "-f", "wav", str(decoded)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not decoded.exists():
        reason = _last_line(result.stderr) or f"ffmpeg exit code {result.returncode}"
        if "matches no streams" in reason:
            reason = "no audio stream"
        raise AudioError(f"{name}: not a readable audio file ({reason})")
    return decoded


class AudioWriter:
    """Encode (channels, samples) blocks to a file, atomically: the data goes to a temporary name
    in the destination's folder and is renamed over the destination only when complete."""

    def __init__(
        self,
        path: str | Path,
        rate: int,
        channels: int,
        format: str = "flac",
        frames: int | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """``frames``: how many will be written, when known; a WAV file that would pass 4 GB is
        then written as RF64 (without it, writing past 4 GB of WAV raises an AudioError).
        ``tags``: the file's title, artist... (see :mod:`pipeline.tags`)."""
        _, subtype = _format(format)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = _new_partial(self.path)
        self.clips = subtype != "FLOAT"  # integer PCM: samples beyond full scale are clipped
        self.peak = 0.0  # the largest |sample| given to write (measured where the format clips)
        self._file = _open_for_writing(self._partial, rate, channels, format, frames)
        write_tags(self._file, tags or {})
        self._room = _WAV_DATA_BYTES if self._file.format == "WAV" else math.inf  # bytes left
        self._frame_bytes = channels * _SAMPLE_BYTES.get(subtype, 0)

    def write(self, block: np.ndarray) -> None:
        """Append a (channels, frames) block: int16 as it is, anything else as float32 (clipped
        to [-1, 1] where the format is integer PCM, and its peak recorded in :attr:`peak`)."""
        block = np.asarray(block)
        self._room -= block.shape[-1] * self._frame_bytes
        if self._room < 0:
            raise AudioError(
                f"{self.path.name}: more than 4 GB of WAV data (give the frames: RF64)"
            )
        if self.clips and block.dtype != np.int16 and block.size:
            peak = float(max(block.max(), -block.min()))
            self.peak = max(self.peak, peak)
            if peak > 1.0:
                block = np.clip(block, -1.0, 1.0)
        with self._named_errors():
            self._file.write(_encodable(block, clip=False).T)

    def close(self) -> None:
        """Finish encoding (the data is complete under the temporary name; see commit)."""
        with self._named_errors():
            self._file.close()

    def commit(self) -> Path:
        """Close and rename the file into place."""
        self.close()
        os.replace(self._partial, self.path)
        return self.path

    def discard(self) -> None:
        with contextlib.suppress(sf.LibsndfileError, OSError):  # a full disk fails the close too
            self._file.close()
        self._partial.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _named_errors(self) -> Iterator[None]:
        """libsndfile reports a failed write as "System error", errno lost: a disk without room
        left is named as such (``ENOSPC``), so that a job can tell a full disk from bad audio."""
        try:
            yield
        except sf.LibsndfileError as error:
            stats = os.statvfs(self._partial.parent)
            if stats.f_bavail * stats.f_frsize < _FULL_DISK_BYTES:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path)) from error
            raise

    def __enter__(self) -> AudioWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def _new_partial(path: Path) -> Path:
    """A new empty file beside ``path`` under a unique temporary name, with the permissions of
    any new file (0666 less the umask), which the rename into place keeps: mkstemp's 0600 left
    stems that only the account that separated them could read."""
    while True:
        partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
        try:
            os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return partial


def write_audio(
    destination: str | Path | BinaryIO, audio: np.ndarray, rate: int, format: str = "flac"
) -> None:
    """Encode (channels, samples) audio as FLAC (24-bit) or WAV (32-bit float, or 16-bit "wav16").

    Float samples are encoded as float32; integer PCM clips them to [-1, 1], float WAV keeps
    them. int16 samples are written as they are, so a "wav16" file holds exactly those integers.
    The bytes depend on the samples alone. A path is written atomically (temporary name, then
    rename).
    """
    audio = np.asarray(audio)
    if audio.ndim != 2:
        raise ValueError(f"expected (channels, samples) audio, got shape {audio.shape}")
    channels, frames = audio.shape
    if isinstance(destination, str | Path):
        with AudioWriter(destination, rate, channels, format, frames) as writer:
            writer.write(audio)
        return
    _, subtype = _format(format)
    with _open_for_writing(destination, rate, channels, format, frames) as file:
        file.write(_encodable(audio, subtype != "FLOAT").T)


def headroom_gain(peak: float) -> float:
    """The gain a file whose samples peak at ``peak`` is written with, in a format that clips:
    1 when it fits within full scale, else the gain that puts its peak at ``RESCALE_PEAK`` (the
    whole file scaled, never clipped)."""
    return 1.0 if peak <= 1.0 else RESCALE_PEAK / peak


def check_writable(name: str, format: str, rate: int, channels: int) -> None:
    """Raise an :class:`AudioError` naming ``name`` if ``format`` cannot hold audio of ``rate``
    and ``channels`` (MP3: one or two channels at 8 to 48 kHz; FLAC: at most eight channels), so
    that a track fails before it is separated rather than when its files are written. libsndfile
    refuses such a file when it opens it, so one is opened in memory."""
    try:
        _open_for_writing(io.BytesIO(), rate, channels, format).close()
    except sf.LibsndfileError:
        raise AudioError(
            f"{name}: {format} files cannot hold {channels} channel(s) at {rate} Hz "
            "(wav holds any); choose another format"
        ) from None


def _open_for_writing(
    target: str | Path | BinaryIO, rate: int, channels: int, format: str, frames: int | None = None
) -> sf.SoundFile:
    """A file open for writing in ``format``, whose bytes will depend on the samples alone.

    libsndfile adds a PEAK chunk to float WAV files with the time of writing in it, so two
    writes of the same audio would differ; it is switched off (readers do not need it). A WAV
    file of ``frames`` that would pass 4 GB is RF64 instead, where libsndfile writes that chunk
    into float files whatever it is told. MP3 is written at a constant 320 kbps, its highest
    bitrate (Demucs' default too).
    """
    container, subtype = _format(format)
    if container == "WAV" and (frames or 0) * channels * _SAMPLE_BYTES[subtype] > _WAV_DATA_BYTES:
        container = "RF64"
    mp3 = {"compression_level": 0.0, "bitrate_mode": "CONSTANT"} if container == "MP3" else {}
    file = sf.SoundFile(
        target, "w", samplerate=rate, channels=channels, format=container, subtype=subtype, **mp3
    )
    if container == "WAV" and subtype == "FLOAT":
        sf._snd.sf_command(file._file, _SET_ADD_PEAK_CHUNK, sf._ffi.NULL, sf._snd.SF_FALSE)
    return file


def _encodable(audio: np.ndarray, clip: bool) -> np.ndarray:
    """int16 samples unchanged; anything else as float32, clipped to [-1, 1] when ``clip``."""
    audio = np.asarray(audio)
    if audio.dtype == np.int16:
        return audio
    audio = audio.astype(np.float32, copy=False)
    return np.clip(audio, -1.0, 1.0) if clip else audio


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample (channels, samples) audio with soxr's high-quality filter."""
    if from_rate == to_rate:
        return audio
    return np.ascontiguousarray(soxr.resample(audio.T, from_rate, to_rate, quality="HQ").T)


class StreamResampler:
    """Resample consecutive (channels, samples) blocks as one signal (soxr's stream mode gives
    the same samples as resampling the whole signal at once).

    Given a ``pool`` (owned by the caller), the channels are split into up to two groups, each
    its own soxr stream, resampled in the pool's threads (soxr releases the GIL; channels are
    independent, so the samples are the same): resampling four stereo stems back to the source
    rate ran on one core while the other waited."""

    def __init__(
        self, from_rate: int, to_rate: int, channels: int, pool: Executor | None = None
    ) -> None:
        self.channels, self._pool = channels, pool
        self._groups: list[tuple[int, int]] = []
        self._streams: list[soxr.ResampleStream] = []
        if from_rate != to_rate:
            count = min(channels, _RESAMPLE_GROUPS if pool is not None else 1)
            bounds = [channels * k // count for k in range(count + 1)]
            self._groups = list(itertools.pairwise(bounds))
            self._streams = [
                soxr.ResampleStream(from_rate, to_rate, b - a, dtype="float32", quality="HQ")
                for a, b in self._groups
            ]

    def push(self, block: np.ndarray, last: bool = False) -> np.ndarray:
        """Resampled output for the next block (possibly empty); ``last`` flushes the filter."""
        if not self._streams:
            return block

        def run(stream: soxr.ResampleStream, group: tuple[int, int]) -> np.ndarray:
            part = np.ascontiguousarray(block[group[0] : group[1]].T)
            return stream.resample_chunk(part, last=last).reshape(-1, group[1] - group[0]).T

        if len(self._streams) == 1:
            parts = [run(self._streams[0], self._groups[0])]
        else:
            parts = list(self._pool.map(run, self._streams, self._groups))
        return np.ascontiguousarray(np.concatenate(parts) if len(parts) > 1 else parts[0])

    def stream(self, blocks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """The resampled signal of all of ``blocks``, flushed at their end, without empty
        blocks."""
        for block in itertools.chain(blocks, [None]):
            last = block is None
            if last:
                block = np.zeros((self.channels, 0), np.float32)
            block = self.push(block, last)
            if block.shape[1]:
                yield block


_RESAMPLE_GROUPS = 2  # channel groups resampled in parallel when a pool is given


# ------------------------------------------------------------------------------------------------
# Resampling with torch ops (any device)

# The filter of TorchResampler, in units of the lower of the two rates. soxr's HQ response, measured
# from the kernel it applies (impulses at every input phase) for 44.1 kHz -> 8/16/32 kHz and
# 32 kHz -> 44.1 kHz, is linear-phase, within 0.01 dB up to 0.914 of the lower Nyquist, -6 dB at
# 0.957, and about -130 dB or lower from the Nyquist on. A Kaiser-windowed sinc's three numbers were
# fitted to that response (least squares over 0..1.1 Nyquist, the worst of the four rate pairs
# minimised, stopband held under -130 dB): the responses then differ by -65 dB rms over the band
# (-68 dB for 32 -> 44.1 kHz), and the outputs agree to 85-90 dB SDR on the bench's music, 90-119
# dB on rendered music, 63-67 dB on white noise. What is left is soxr's multi-stage structure: a
# passband droop of up to 0.01 dB (above 0.5 Nyquist) that a single sinc does not have, and a
# transition that differs slightly with the ratio (48 kHz's pairs: 76-91 dB on the bench's music).
_CUTOFF = 0.956843  # -6 dB point, as a fraction of the lower Nyquist
_HALF_LENGTH = 102.36  # half the Kaiser window, in samples at the lower rate (205 taps an output)
_BETA = 13.6  # Kaiser window shape: stopband under -131 dB from the Nyquist on
_MAX_TAPS = 1 << 24  # 64 MB of float32; the usual rates (8 to 192 kHz) need at most 4 MB


class TorchResampler:
    """Streaming resampler on torch tensors (any device, float32).

    The same contract as :class:`StreamResampler` (soxr HQ), with torch ops so that resampling
    runs where the tensors are, asynchronously on CUDA: consecutive blocks give the samples of the
    whole signal resampled at once, output sample ``j`` sits at input time ``j * from/to`` (linear
    phase, no delay), and the total length after ``last=True`` is soxr's, ``round(n * to / from)``
    with halves rounded up. Leading dimensions of a block are channels: a ``(4, 2, n)`` block of
    four stereo stems goes to a resampler of 8 channels. The whole signal at once is
    ``TorchResampler(a, b, c).push(x, last=True)``; after ``last`` the resampler starts afresh.

    Rational polyphase filtering: with ``L/M`` the reduced ratio, every ``M`` inputs make a frame
    of ``L`` outputs, and output ``r`` of a frame is one row of taps (the windowed sinc sampled at
    that output's fractional input position) over the frame's window of inputs. All rows at once
    are one ``conv1d`` with ``L`` output channels and stride ``M``, over as many frames as the
    inputs allow. The state between pushes is the unused tail of the input (at most a window plus
    a frame) and two counts; ``push`` computes sizes from shapes only, never from values. On CUDA
    the convolution's operands are split so that cuDNN's default TF32 loses nothing.
    """

    def __init__(
        self, from_rate: int, to_rate: int, channels: int, device: torch.device | str = "cpu"
    ) -> None:
        self.channels = channels
        self.device = torch.device(device)
        self._identity = from_rate == to_rate
        common = math.gcd(from_rate, to_rate)
        self._step, self._phases = from_rate // common, to_rate // common  # M inputs, L outputs
        taps, self._pad = _polyphase_taps(from_rate, to_rate)
        self._width = taps.shape[1]
        self._split = _convolves_in_tf32(self.device)
        self._taps = self._weights(torch.from_numpy(taps).to(self.device, torch.float32))
        self._reset()

    def _weights(self, taps: torch.Tensor) -> torch.Tensor:
        """conv1d weights of the (L, width) taps: (L, 1, width), or, to be exact under TF32,
        (L, 3, width) for the input channels (high, high, low) of :meth:`_filter`."""
        if not self._split:
            return taps[:, None, :]
        high = _tf32_high(taps)
        return torch.stack([high, taps - high, high], 1)

    def _reset(self) -> None:
        """Start a new signal: the history holds the zeros before its first sample."""
        self._history = torch.zeros(
            self.channels, self._pad, device=self.device, dtype=torch.float32
        )
        self._inputs = self._outputs = 0

    def push(self, block: torch.Tensor, last: bool = False) -> torch.Tensor:
        """(channels, n) float32 block on the device -> (channels, m) resampled output; `last` flushes."""
        if self._identity:
            return block
        lead, length = block.shape[:-1], block.shape[-1]
        self._inputs += length
        block = block.reshape(self.channels, length).to(torch.float32)  # no copy if float32
        signal = torch.cat([self._history, block], 1)
        frames = self._ready_frames(signal.shape[1], last)
        needed = (frames - 1) * self._step + self._width if frames else 0
        if needed > signal.shape[1]:  # flushing: zeros after the end
            signal = torch.nn.functional.pad(signal, (0, needed - signal.shape[1]))
        out = self._filter(signal[:, :needed], frames)
        if last:
            out = out[:, : self._total() - self._outputs]
        self._outputs += out.shape[1]
        self._history = signal[:, frames * self._step :].clone()  # frees the block's memory
        if last:
            self._reset()
        return out.reshape(*lead, out.shape[1])

    def _total(self) -> int:
        """Output length of the whole signal: soxr's rule, round(n * L / M) with halves up."""
        return (2 * self._inputs * self._phases + self._step) // (2 * self._step)

    def _ready_frames(self, available: int, last: bool) -> int:
        """Frames to compute now: those whose inputs are all here, or when flushing, those that
        reach the total output length."""
        if last:
            return max(0, -(-(self._total() - self._outputs) // self._phases))
        if available < self._width:
            return 0
        return (available - self._width) // self._step + 1

    def _filter(self, signal: torch.Tensor, frames: int) -> torch.Tensor:
        """All phases of ``frames`` frames at once: one strided convolution, outputs interleaved."""
        if not frames:
            return signal.new_zeros(self.channels, 0)
        if self._split:  # the products TF32 drops: high * low and low * high
            high = _tf32_high(signal)
            inputs = torch.stack([high, high, signal - high], 1)
        else:
            inputs = signal[:, None, :]
        out = torch.nn.functional.conv1d(inputs, self._taps, stride=self._step)
        return out.transpose(1, 2).reshape(self.channels, frames * self._phases)


def _convolves_in_tf32(device: torch.device) -> bool:
    """Whether float32 convolutions may run in TF32 there: cuDNN's default on CUDA. With its
    10-bit mantissa (emulated on the CPU) the output is 75 dB from soxr's on music instead of 90,
    and a tone above the Nyquist comes through at -73 to -80 dB instead of -134 or lower."""
    return device.type == "cuda"


def _tf32_high(x: torch.Tensor) -> torch.Tensor:
    """``x`` with the 13 low mantissa bits cleared: exact in TF32, and ``x - high`` is exact in
    float32, so high * high + high * low + low * high in TF32 products with float32 sums is
    float32's product to 2**-21 (the 3xTF32 split of cuBLAS)."""
    return (x.view(torch.int32) & -(1 << 13)).view(torch.float32)


@functools.cache
def _polyphase_taps(from_rate: int, to_rate: int) -> tuple[np.ndarray, int]:
    """Taps (L, width) of each output phase over a frame's window of inputs, in float64, and how
    many zeros come before the signal so that the first output sees its whole left half.

    Output ``r`` of a frame sits ``r * M / L`` inputs after the frame's first input, which is the
    window's ``pad``-th sample; its taps are the kernel ``h(r * M / L + pad - u)`` at the window's
    samples ``u``, with ``h`` a sinc cut off at ``_CUTOFF`` of the lower Nyquist under a Kaiser
    window of ``_HALF_LENGTH`` samples of the lower rate on each side (unit gain at DC).
    """
    common = math.gcd(from_rate, to_rate)
    step, phases = from_rate // common, to_rate // common
    lower = min(from_rate, to_rate)
    cutoff = _CUTOFF * lower / from_rate  # twice the cutoff, in cycles per input sample
    half = _HALF_LENGTH * from_rate / lower  # in input samples
    pad = math.ceil(half)
    width = math.ceil((phases - 1) * step / phases + half) + pad + 1
    if phases * width > _MAX_TAPS:
        raise ValueError(
            f"cannot resample {from_rate} Hz to {to_rate} Hz with a polyphase table: the reduced "
            f"ratio {phases}/{step} needs {phases * width} taps (at most {_MAX_TAPS})"
        )
    t = np.arange(phases)[:, None] * step / phases + pad - np.arange(width)[None, :]
    inside = np.clip(1 - (t / half) ** 2, 0, None)
    window = np.i0(_BETA * np.sqrt(inside)) / np.i0(_BETA) * (inside > 0)
    return cutoff * np.sinc(cutoff * t) * window, pad


def _format(format: str) -> tuple[str, str]:
    try:
        return _ENCODINGS[format]
    except KeyError:
        raise ValueError(f"unknown audio format {format!r} (use {FORMAT_NAMES})") from None


def _name(source: str | Path | BinaryIO) -> str:
    """How messages name an input: a path as given (a file object by its name, if any)."""
    if isinstance(source, str | Path):
        return str(source)
    return str(getattr(source, "name", "<audio stream>"))


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
