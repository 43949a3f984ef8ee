"""The separator's public face: build once, then separate arrays, files and groups of files.

:class:`Separator` loads the weights, freezes the network for its device and precision, and
hands every call to its :class:`~pipeline.separator.schedule.Engine`. The paths it offers:

- :meth:`Separator.separate`: a (channels, samples) array in, four stem arrays out;
- :meth:`Separator.separate_many`: several arrays, their windows sharing forward passes;
- :meth:`Separator.separate_file`: a file (or an excerpt of one) in, output files out, streamed
  in memory that does not grow with the track's length;
- :meth:`Separator.separate_files`: several files at once, as a catalog worker runs them.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from model import MultiTasNet, load_checkpoint
from model.frozen import FrozenTasNet, frames_multiple
from pipeline.audio import AudioError, check_writable
from pipeline.separator.identity import identify
from pipeline.separator.observe import Observer
from pipeline.separator.options import (
    DEFAULT_BATCH,
    DEFAULT_CONTEXT,
    DEFAULT_SEGMENT,
    SeparationOptions,
    compute_dtype,
    resolve_precision,
)
from pipeline.separator.outputs import (
    Mixes,
    SeparatedFile,
    SpoolSink,
    output_folder,
    output_weights,
    start_encoding,
)
from pipeline.separator.schedule import Engine, WindowCallback
from pipeline.separator.sources import ArraySource, Source, checked_audio, open_excerpt
from pipeline.separator.threads import encode_threads, thread_pool
from pipeline.separator.windows import Window, window_frames

RESAMPLERS = ("auto", "soxr", "torch")
KERNELS = ("auto", "fused", "eager")


class Separator:
    """Meta-TasNet separation of whole tracks; build once, call many times.

    ``checkpoint`` is a path, a name of the weights registry (``"default"``, ``"release"``:
    fetched and cached on first use) or a model. ``device`` defaults to CUDA when available.
    ``precision`` is ``"float32"``, ``"bfloat16"`` or ``"float16"`` (the network's matrix
    products run in it; normalisation statistics stay in float32/64); ``"auto"`` is bfloat16
    on a GPU that supports it and on a CPU with bfloat16 matrix hardware (AMX or AVX-512 BF16),
    float32 elsewhere. ``segment`` and ``context`` are in seconds; ``batch_size`` counts windows
    of one channel each per forward pass (``None``: 2 on a CPU; on a GPU as many as half its free
    memory holds). ``resampler`` picks the resampling op: ``"auto"`` (soxr on a CPU, torch
    elsewhere), ``"soxr"`` or ``"torch"``. ``kernels`` picks how the TCN blocks run: ``"fused"``
    (compiled once per process by torch.compile: Triton kernels on a GPU), ``"eager"`` (the
    hand-written kernels, the fast ones on a CPU) or ``"auto"`` (fused on CUDA).

    ``observer`` is told of the engine's phases (see :mod:`pipeline.separator.observe`);
    ``spool_dir`` is where the file paths keep a track's unscaled stems until they are encoded
    (default: the system's temporary folder; never the destination).
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
        *,
        observer: Observer | None = None,
        spool_dir: str | Path | None = None,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("CUDA is not available on this machine; use --device cpu")
        self.options = SeparationOptions(
            precision=precision, segment=segment, context=context, batch_size=batch_size
        )
        self.precision = resolve_precision(precision, self.device)
        dtype = compute_dtype(self.precision, self.device)
        if resampler not in RESAMPLERS:
            raise ValueError(f"unknown resampler {resampler!r} (use {', '.join(RESAMPLERS)})")
        if kernels not in KERNELS:
            raise ValueError(f"unknown kernels {kernels!r} (use {', '.join(KERNELS)})")
        if not isinstance(checkpoint, MultiTasNet):
            from pipeline.weights import resolve_weights  # a name: shipped, cached or fetched

            checkpoint = load_checkpoint(resolve_weights(checkpoint))
        model = checkpoint
        self.config = model.config
        self.model_id, self.options_hash = identify(model, self.options)
        self.segment, self.context = window_frames(model, segment, context)
        # Whether the blocks are fused is the network's to say (``network.fused``): it falls
        # back to the hand-written blocks where compiling fails.
        fused = kernels == "fused" or (kernels == "auto" and self.device.type == "cuda")
        self.network = FrozenTasNet(model, dtype, fused).to(self.device).eval()
        if resampler == "auto":
            resampler = "soxr" if self.device.type == "cpu" else "torch"
        self.resampler = resampler
        self.stage_rates = self.config.stage_rates()
        self.spool_dir = spool_dir
        self._observer = observer or Observer()
        self.engine = Engine(
            self.network,
            self.config,
            self.device,
            (self.segment, self.context, frames_multiple(model)),
            self.precision,
            batch_size or (DEFAULT_BATCH if self.device.type == "cpu" else None),
            resampler,
            self._observer,
        )

    @classmethod
    def from_options(
        cls,
        options: SeparationOptions,
        device: str | torch.device | None = None,
        *,
        model: MultiTasNet | None = None,
        observer: Observer | None = None,
        spool_dir: str | Path | None = None,
    ) -> Separator:
        """A separator as ``options`` ask, on ``device``; ``model`` (when given) stands for the
        weights ``options.checkpoint`` names, already loaded (a catalog worker's)."""
        return cls(
            model if model is not None else options.checkpoint,
            device,
            options.precision,
            options.segment,
            options.context,
            options.batch_size,
            observer=observer,
            spool_dir=spool_dir,
        )

    @property
    def batch_size(self) -> int | None:
        """Windows per forward pass (None until a GPU's first forward has picked it)."""
        return self.engine.batch_size

    def windows(self, length: int) -> list[Window]:
        """The window plan for a base-rate length."""
        return self.engine.windows(length)

    # ----------------------------------------------------------------------------------------
    # Arrays

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
        source = ArraySource(checked_audio(audio, sample_rate), sample_rate)
        (result,) = self.engine.run([source], progress, callback, strict=True)
        return result

    def separate_many(
        self, tracks: Sequence[tuple[np.ndarray, int]], progress: bool = False
    ) -> list[dict[str, np.ndarray] | Exception]:
        """Stems of several (audio, sample_rate) tracks, whose windows share forward passes.

        Returns one entry per track, in order: its stems as :meth:`separate` gives them, or the
        exception that stopped that track (unusable audio, a failed forward pass); the other
        tracks go on."""
        sources: list[Source | Exception] = []
        for index, (audio, rate) in enumerate(tracks):
            try:
                sources.append(ArraySource(checked_audio(audio, rate), rate, f"track {index}"))
            except AudioError as error:
                sources.append(error)
        return self.engine.run(sources, progress, None, strict=False)

    # ----------------------------------------------------------------------------------------
    # Files

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
        stems wait in a spool file in ``spool_dir``; each output is written under a temporary
        name and renamed when done, scaled where it would clip (see
        :class:`~pipeline.separator.outputs.PendingFiles`). ``progress`` and ``callback`` are as
        in :meth:`separate`.
        """
        weights = output_weights(outputs, format)
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
        weights = output_weights(outputs, format)
        with contextlib.ExitStack() as stack:
            sources: list[Source | Exception] = []
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
    ) -> tuple[Source, tuple[int, int]]:
        windows = (self.segment, self.context, self.config.sampling_rate)
        return open_excerpt(stack, path, start, duration, windows)

    def _to_files(
        self,
        sources: Sequence[Source | Exception],
        folders: Sequence[Path],
        keeps: Sequence[tuple[int, int]],
        weights: dict[str, np.ndarray],
        format: str,
        progress: bool,
        callback: WindowCallback | None,
        strict: bool,
    ) -> list[SeparatedFile | Exception]:
        """Stems of each source spooled, then encoded into its folder (see separate_files).

        A track is encoded as soon as its last window is out of the network, in a thread pool
        (one task per output file; libsndfile releases the GIL), while the device goes on with
        the other tracks' windows. A source that fails before it is separated (a format that
        cannot hold it, a folder that cannot be made) is that source's error."""
        with contextlib.ExitStack() as stack:
            sources = list(sources)
            sinks: list[SpoolSink | None] = []
            for index, (source, folder, keep) in enumerate(
                zip(sources, folders, keeps, strict=True)
            ):
                try:
                    sink = self._spool(stack, source, folder, keep, format)
                except (AudioError, OSError) as error:
                    if strict:
                        raise
                    sources[index], sink = error, None
                sinks.append(sink)
            serial = self._observer.serial
            encoders = stack.enter_context(
                thread_pool(encode_threads(len(weights)), serial, "encode")
            )

            def encode(index: int, sink: SpoolSink):
                with self._observer.phase("encode"):
                    return start_encoding(
                        sources[index],
                        sink,
                        folders[index],
                        weights,
                        format,
                        self.model_id,
                        encoders,
                    )

            pending = self.engine.run(sources, progress, callback, strict, sinks, encode)
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
                balance = outcome.sink.ready().balance
                results.append(
                    SeparatedFile(
                        paths,
                        source.rate,
                        source.channels,
                        frames,
                        outcome.gains,
                        balance,
                        source.tags,
                    )
                )
        for result, folder in zip(results, folders, strict=True):
            if isinstance(result, Exception) and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        return results

    def _spool(
        self,
        stack: contextlib.ExitStack,
        source: Source | Exception,
        folder: Path,
        keep: tuple[int, int],
        format: str,
    ) -> SpoolSink | None:
        """The spool of one source's stems (None for a source that failed already), its output
        folder made; everything is released by ``stack``."""
        if isinstance(source, Exception):
            return None
        check_writable(source.name, format, source.rate, source.channels)
        stack.enter_context(output_folder(folder))
        spool = stack.enter_context(tempfile.TemporaryFile(dir=self.spool_dir))  # noqa: SIM115
        sink = SpoolSink(spool, source.channels, self.device, keep)
        stack.callback(sink.close)
        return sink
