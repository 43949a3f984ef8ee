"""Speed, memory and agreement of the separation engine against the release's inference path.

One run of :func:`run_bench` measures, on the same stereo audio and the same weights:

- the *reference*: the release's path, :meth:`model.MultiTasNet.inference` with
  ``n_chunks = ceil(seconds / 30)`` (8 s of context around each chunk), the left then the right
  channel, on the stage signals the engine prepares (their preparation is not timed);
- the *engine*: :meth:`pipeline.separator.Separator.separate_file` from an audio file to four
  encoded stem files, end to end (decoding, resampling, network, least-squares scaling,
  resampling back, encoding; loading the model is not timed);
- where that time goes: the same file again with the engine's :class:`PhaseClock`, which
  synchronises the device at every phase boundary and charges each phase its own seconds
  (decode, resample_in, network, resample_out with the least squares and the copies down,
  encode); then the engine in memory (:meth:`Separator.separate`) and the network alone over the
  engine's windows (stage signals already on the device);
- the *agreement*: SDR in dB of the engine's windowed last-stage output against the model's own
  single-pass output over the whole track (``inference`` with one chunk), per stem; the minimum
  over stems is reported. The reference's chunked output is scored the same way.

:func:`run_throughput` is the catalog's view: N different tracks through the model stage of a
catalog worker (:meth:`Separator.separate_files`, several tracks per call on a GPU), in one
process without Ray, for the aggregate real-time factor and, on CUDA, the GPU-busy fraction
(CUDA events around every forward pass). :func:`count_ops` counts the ops the engine dispatches
outside its forward passes per minute of audio, the host work that bounds it on a GPU.

Each timed path runs in a fresh process (``spawn``), so its peak resident memory is its own:
Python, torch, the weights and the work, and nothing left over from the other path or from making
the test audio. On CUDA the peak of ``torch.cuda.max_memory_allocated`` is reported as well.
Nothing here imports Ray or Prefect: the bench runs where only torch and the audio libraries are.

The audio (:func:`bench_audio`) is a deterministic music-like stereo signal made with numpy
(drum hits, a bass line, chords, a vibrato lead with phrasing), so that runs on different machines
separate the same samples without any data or system tools.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import platform
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import STEMS, CheckpointError, MultiTasNet, load_checkpoint, save_checkpoint
from model.frozen import frames_multiple
from pipeline.audio import write_audio
from pipeline.separator import (
    DEFAULT_BATCH,
    DEFAULT_CONTEXT,
    DEFAULT_SEGMENT,
    PhaseClock,
    Separator,
    default_tracks_per_call,
    keep_freed_memory,
)

BENCH_RATE = 44100  # sample rate of the benchmark audio (stereo)
RELEASE_CHUNK_SECONDS = 30  # the release's inference: one chunk per 30 s of audio
RELEASE_CONTEXT_SECONDS = 8  # the release's context on each side of a chunk


@dataclass(frozen=True)
class BenchOptions:
    """What to measure: the engine's options, the audio's length and which paths to run."""

    seconds: float = 60.0
    device: str = "cpu"
    precision: str = "float32"
    segment: float = DEFAULT_SEGMENT
    context: float = DEFAULT_CONTEXT
    batch_size: int | None = DEFAULT_BATCH  # None: picked from the device's memory (CUDA)
    engine_only: bool = False  # skip the reference and the agreement (memory scaling runs)
    threads: int | None = None  # torch CPU threads of both timed processes (None: torch's)
    kernels: str = "auto"  # the TCN blocks: fused (compiled), eager, or auto (fused on CUDA)
    profile: str | None = None  # a folder for profiles of the engine's runs (see _profile)


def bench_audio(seconds: float, rate: int = BENCH_RATE, seed: int = 0) -> np.ndarray:
    """Deterministic music-like stereo (2, samples) float32 at 120 bpm: kick, snare and hi-hat,
    a bass line on a four-chord loop, sustained chords, and a vibrato lead that sings three bars
    in four. Each part has its own stereo position; the peak is about -3 dBFS."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    beat = 0.5
    in_beat, beats = t % beat, (t // beat).astype(np.int64)
    bar = beats // 4
    roots = np.array([110.0, 87.31, 130.81, 98.0])[bar % 4]  # A, F, C, G
    kick = np.sin(2 * np.pi * (50 * in_beat + 4.7 * (1 - np.exp(-15 * in_beat))))
    kick *= np.exp(-in_beat * 18)
    noise = rng.standard_normal(t.size)
    snare = noise * np.exp(-in_beat * 25) * (beats % 2 == 1)
    in_eighth = t % (beat / 2)
    hat = np.diff(noise, prepend=0.0) * np.exp(-in_eighth * 90)
    bass_note = roots * np.where(beats % 4 == 3, 1.5, 1.0)  # root, fifth on the fourth beat
    bass = sum(np.sin(2 * np.pi * k * bass_note * in_beat) / k for k in (1, 2, 3))
    bass *= 1 - np.exp(-in_beat * 60)
    chord = sum(np.sin(2 * np.pi * roots * 2 * ratio * t) for ratio in (1.0, 1.26, 1.5))
    scale = np.array([1.0, 1.125, 1.25, 1.5, 1.667, 2.0])
    melody = roots * 4 * scale[rng.integers(0, len(scale), beats.max() + 1)][beats]
    vibrato = 1 + 0.01 * np.sin(2 * np.pi * 5.5 * t)
    phase = 2 * np.pi * np.cumsum(melody * vibrato) / rate
    lead = sum(np.sin(k * phase) * 0.6**k for k in range(1, 6)) * (bar % 4 != 3)
    lead *= np.minimum(1, in_beat * 40)
    parts = [(kick, 0.5, 0.0), (snare, 0.15, -0.2), (hat, 0.05, 0.5), (bass, 0.25, 0.0)]
    parts += [(chord, 0.08, -0.6), (lead, 0.2, 0.3)]
    left = sum(gain * np.sqrt((1 - pan) / 2) * part for part, gain, pan in parts)
    right = sum(gain * np.sqrt((1 + pan) / 2) * part for part, gain, pan in parts)
    audio = np.stack([left, right])
    return (audio * (0.7 / np.abs(audio).max())).astype(np.float32)


def bench_model(config: str, seed: int = 0) -> tuple[MultiTasNet, str]:
    """The model a ``--config`` names, and a description of its weights.

    ``default`` is the shipped model (its trained weights) when installed; ``paper`` and a run
    configuration JSON (as ``metasep train --config`` reads) get random weights from ``seed``;
    a checkpoint file (``.safetensors``, release ``.pt``) is loaded.
    """
    from pipeline.training.config import PRESETS, load_run_config

    path = Path(config)
    if config == "default" or (config not in PRESETS and path.suffix in {".safetensors", ".pt"}):
        try:
            return load_checkpoint(config), f"checkpoint {config}"
        except CheckpointError:
            if config != "default":
                raise
    run_config = load_run_config(config)
    torch.manual_seed(seed)
    return MultiTasNet(run_config.model).eval(), f"random weights (seed {seed}) of {config}"


def run_bench(model: MultiTasNet, options: BenchOptions) -> dict[str, Any]:
    """Measure the reference and the engine on ``options.seconds`` of :func:`bench_audio`;
    returns the figures (see the module docstring) as a flat dict."""
    audio = bench_audio(options.seconds)
    results = _describe(options)
    with tempfile.TemporaryDirectory(prefix="metasep-bench-") as folder:
        work = Path(folder)
        checkpoint = save_checkpoint(model, work / "model")
        source = work / "bench.wav"
        write_audio(source, audio, BENCH_RATE, format="wav")
        engine = _in_fresh_process(_engine_job, checkpoint, source, work / "stems", options)
        results.update(engine)
        results["engine_xrt"] = options.seconds / engine["engine_seconds"]
        if options.engine_only:
            return results
        results["memory_xrt"] = options.seconds / engine["memory_seconds"]
        results["network_xrt"] = options.seconds / engine["network_seconds"]
        separator = _separator(checkpoint, options)
        for stage, mix in enumerate(separator.stage_mixes(audio, BENCH_RATE)):
            np.save(work / f"stage{stage}.npy", mix)
        reference = _in_fresh_process(_reference_job, checkpoint, work, options)
        results.update({k: v for k, v in reference.items() if not k.startswith("_")})
        results["reference_xrt"] = options.seconds / reference["reference_seconds"]
        results["ratio"] = results["engine_xrt"] / results["reference_xrt"]
        single = np.load(work / "single.npy")
        windowed = separator.last_stage(audio, BENCH_RATE)
        agreement = stem_agreement(single, windowed)
        results["agreement_db"] = min(agreement.values())
        results.update({f"agreement_{stem}_db": value for stem, value in agreement.items()})
        results["reference_agreement_db"] = min(
            stem_agreement(single, np.load(work / "chunked.npy")).values()
        )
    return results


def _describe(options: BenchOptions) -> dict[str, Any]:
    """What every bench result names: the options, the machine and torch."""
    device = torch.device(options.device)
    return {
        "seconds": options.seconds,
        "device": options.device,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "precision": options.precision,
        "segment": options.segment,
        "context": options.context,
        "batch_size": options.batch_size,
        "kernels": options.kernels,
        "threads": options.threads or torch.get_num_threads(),
        "cpu": _cpu_name(),
        "torch": torch.__version__,
    }


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


def _separator(checkpoint: Path, options: BenchOptions) -> Separator:
    return Separator(
        checkpoint,
        device=options.device,
        precision=options.precision,
        segment=options.segment,
        context=options.context,
        batch_size=options.batch_size,
        kernels=options.kernels,
    )


def _engine_job(
    checkpoint: Path, source: Path, destination: Path, options: BenchOptions
) -> dict[str, Any]:
    """In a fresh process: separate ``source`` into files (time, memory), then the same with
    each phase timed, in memory, and the network alone."""
    keep_freed_memory()
    _set_threads(options)
    separator = _separator(checkpoint, options)
    loaded = _peak_rss_mb()
    # Untimed warm-up on one window of audio, as a catalog worker has run its first track:
    # one-time costs (kernel selection, first touch of allocator pages) are not per-track costs.
    window = options.segment + 2 * options.context
    warm_up = time.perf_counter()
    separator.separate(bench_audio(min(window, options.seconds)), BENCH_RATE)
    warm_up = time.perf_counter() - warm_up  # with fused kernels: their compilation
    _reset_device_peak(separator.device)
    started = time.perf_counter()
    separator.separate_file(source, destination)
    seconds = time.perf_counter() - started
    figures = {
        "engine_seconds": seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "model_rss_mb": loaded,
        "engine_batch_size": separator.batch_size,
        "warm_up_seconds": warm_up,
        "engine_kernels": "fused" if separator.network.fused else "eager",
        **_device_peak(separator.device, "engine"),
    }
    if options.engine_only:
        return figures
    separator.clock = PhaseClock(separator.device)
    separator.separate_file(source, destination)
    figures.update({f"phase_{name}_s": value for name, value in separator.clock.seconds.items()})
    separator.clock = None
    audio = bench_audio(options.seconds)
    figures["memory_seconds"] = _timed(
        separator.device, lambda: separator.separate(audio, BENCH_RATE)
    )
    figures["network_seconds"] = _network_seconds(separator, audio)
    if options.profile:
        _profile(separator, source, destination, audio, Path(options.profile))
    return figures


def _profile(
    separator: Separator, source: Path, destination: Path, audio: np.ndarray, folder: Path
) -> None:
    """Where the engine's time goes, in detail: for the file path and the in-memory path, a
    cProfile of the host (by own time, then cumulative) and a torch profile of the operators
    (by their own device time on CUDA, host time elsewhere), as text files in ``folder``."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    folder.mkdir(parents=True, exist_ok=True)
    on_cuda = separator.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    order = "self_cuda_time_total" if on_cuda else "self_cpu_time_total"
    jobs = {
        "file": lambda: separator.separate_file(source, destination),
        "memory": lambda: separator.separate(audio, BENCH_RATE),
    }
    for name, job in jobs.items():
        host = cProfile.Profile()
        host.runcall(lambda job=job: _timed(separator.device, job))
        text = io.StringIO()
        stats = pstats.Stats(host, stream=text)
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(40)
        (folder / f"host-{name}.txt").write_text(text.getvalue())
        with profile(activities=activities) as operators:
            _timed(separator.device, job)
        table = operators.key_averages().table(sort_by=order, row_limit=50)
        (folder / f"operators-{name}.txt").write_text(table)


def _network_seconds(separator: Separator, audio: np.ndarray) -> float:
    """Seconds of the network alone over the engine's windows of ``audio``: the stage signals
    are prepared and on the device beforehand, batches as the engine forms them."""
    mixes = [
        torch.from_numpy(m).to(separator.device) for m in separator.stage_mixes(audio, BENCH_RATE)
    ]
    plan = separator.windows(mixes[0].shape[-1])
    items = [(w, c) for w in plan for c in range(audio.shape[0])]
    size = separator.batch_size or len(items)
    batches = [
        [
            torch.stack(
                [m[c, 2**i * w.begin : 2**i * w.end] for w, c in items[k : k + size]]
            ).unsqueeze(1)
            for i, m in enumerate(mixes)
        ]
        for k in range(0, len(items), size)
    ]
    return _timed(separator.device, lambda: [separator.network.separate_last(b) for b in batches])


def _timed(device: torch.device, work: Any) -> float:
    _synchronize(device)
    started = time.perf_counter()
    work()
    _synchronize(device)
    return time.perf_counter() - started


def run_throughput(
    model: MultiTasNet,
    options: BenchOptions,
    tracks: int,
    per_call: int | None = None,
    calls: int = 1,
) -> dict[str, Any]:
    """``tracks`` different files of ``options.seconds`` through the catalog's model stage
    (:meth:`Separator.separate_files`, ``per_call`` tracks per call: by default as many as a
    catalog worker on this device takes; ``calls`` calls at a time from as many threads, as an
    actor taking several calls at once would run them), in this process and without Ray:
    aggregate real-time factor and, on CUDA, the fraction of the time the device spent in
    forward passes."""
    keep_freed_memory()
    _set_threads(options)
    results: dict[str, Any] = {**_describe(options), "tracks": tracks}
    with tempfile.TemporaryDirectory(prefix="metasep-bench-") as folder:
        work = Path(folder)
        sources = [work / f"track{k}.flac" for k in range(tracks)]

        def make_track(k: int) -> None:
            write_audio(sources[k], bench_audio(options.seconds, seed=k), BENCH_RATE)

        with ThreadPoolExecutor() as pool:  # the encoder releases the GIL
            list(pool.map(make_track, range(tracks)))
        separator = _separator(save_checkpoint(model, work / "model"), options)
        if per_call is None:
            per_call = default_tracks_per_call(separator.device)
        separator.separate(bench_audio(min(options.seconds, 4.0)), BENCH_RATE)  # warm-up
        separator.forward_events = [] if separator.device.type == "cuda" else None
        jobs = [(path, work / "stems" / path.stem) for path in sources]
        groups = [jobs[k : k + per_call] for k in range(0, tracks, per_call)]
        _reset_device_peak(separator.device)
        started, host_started = time.perf_counter(), _host_cpu_seconds()
        with ThreadPoolExecutor(calls) as callers:
            for outcome in callers.map(separator.separate_files, groups):
                failed = [r for r in outcome if isinstance(r, Exception)]
                if failed:
                    raise failed[0]
        _synchronize(separator.device)
        seconds = time.perf_counter() - started
        host_seconds = _host_cpu_seconds() - host_started
    results.update(
        throughput_seconds=seconds,
        # Whether the host is the limit: its cores' time (all threads) per second of the run
        host_cpu_seconds=host_seconds,
        host_cores_busy=host_seconds / seconds,
        host_cores=os.cpu_count(),
        throughput_xrt=tracks * options.seconds / seconds,
        tracks_per_call=per_call,
        calls_at_once=calls,
        batch_size_used=separator.batch_size,
        **_device_peak(separator.device, "throughput"),
    )
    if separator.forward_events:
        busy = sum(a.elapsed_time(b) for a, b in separator.forward_events) / 1000
        results["gpu_busy_fraction"] = busy / seconds
    return results


def count_ops(model: MultiTasNet, options: BenchOptions) -> dict[str, Any]:
    """The ops the engine dispatches outside the network per minute of audio, by phase.

    On a GPU each op is a trip through the dispatcher on the engine's thread and most are a
    kernel launch: with a network as fast as a GPU makes it, that host work bounds the engine's
    speed. The ops are the same on any device, so they are counted here on CPU tensors along the
    device path (the torch resampler), for :meth:`Separator.separate` of ``options.seconds`` of
    :func:`bench_audio`; ops inside forward passes are left out (on CUDA those are compiled
    kernels). Phases as the engine's :class:`PhaseClock` names them; ``other`` is between them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    separator = Separator(
        model,
        "cpu",
        "float32",
        options.segment,
        options.context,
        options.batch_size,
        resampler="torch",
        kernels="eager",
    )
    clock = separator.clock = PhaseClock(separator.device)
    counts: dict[str, int] = {}

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            phase = clock.current or "other"
            if phase != "network":
                counts[phase] = counts.get(phase, 0) + 1
            return func(*args, **(kwargs or {}))

    audio = bench_audio(options.seconds)
    with Counter():
        separator.separate(audio, BENCH_RATE)
    per_minute = {phase: count * 60 / options.seconds for phase, count in counts.items()}
    return {
        **_describe(options),
        "ops_per_minute": sum(per_minute.values()),
        **{f"ops_per_minute_{phase}": value for phase, value in sorted(per_minute.items())},
    }


def _reference_job(checkpoint: Path, work: Path, options: BenchOptions) -> dict[str, Any]:
    """In a fresh process: the release's chunked inference of each channel in turn (timed), then
    the single-pass output (not timed); both last stages are saved for the agreement. The
    allocator is left as the release's users have it (no ``keep_freed_memory``): the reference
    is the authors' code as it runs for them."""
    _set_threads(options)
    device = torch.device(options.device)
    model = load_checkpoint(checkpoint).to(device)
    mixes = [np.load(path) for path in sorted(work.glob("stage*.npy"))]
    channels = mixes[0].shape[0]
    n_chunks = max(1, math.ceil(options.seconds / RELEASE_CHUNK_SECONDS))

    def channel_inputs(channel: int) -> list[torch.Tensor]:
        return [torch.from_numpy(mix[channel][None, None]).to(device) for mix in mixes]

    # Untimed warm-up on one chunk's worth of audio (chunk and context), as for the engine.
    chunk = options.seconds / n_chunks + 2 * RELEASE_CONTEXT_SECONDS
    warm_up = min(mixes[0].shape[-1], round(chunk * model.config.sampling_rate))
    warm_up -= warm_up % frames_multiple(model)
    model.inference([x[..., : 2**i * warm_up] for i, x in enumerate(channel_inputs(0))], 1)
    _reset_device_peak(device)
    started = time.perf_counter()
    chunked = [model.inference(channel_inputs(c), n_chunks)[-1].cpu() for c in range(channels)]
    _synchronize(device)
    seconds = time.perf_counter() - started
    figures = {
        "reference_seconds": seconds,
        "reference_chunks": n_chunks,
        "reference_peak_rss_mb": _peak_rss_mb(),
        **_device_peak(device, "reference"),
    }
    np.save(work / "chunked.npy", torch.cat(chunked)[:, :, 0].numpy())
    single = [model.inference(channel_inputs(c), 1)[-1].cpu() for c in range(channels)]
    np.save(work / "single.npy", torch.cat(single)[:, :, 0].numpy())
    return figures


def _set_threads(options: BenchOptions) -> None:
    if options.threads:
        torch.set_num_threads(options.threads)


def _in_fresh_process(function: Any, *args: Any) -> dict[str, Any]:
    """``function(*args)`` in a new interpreter (spawn: nothing inherited but the arguments)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


def _host_cpu_seconds() -> float:
    """User and system CPU time of this process so far, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    """This process's peak resident set size in MiB.

    On Linux, ``VmHWM`` of ``/proc/self/status``: the high-water mark of this process's own
    memory. ``ru_maxrss`` is not used there because it survives ``fork`` + ``exec``, so a
    spawned child would report the parent's peak (the bench's parent holds the test audio).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if platform.system() == "Darwin" else 2**10)


def _reset_device_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_peak(device: torch.device, prefix: str) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {f"{prefix}_cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or f"{os.cpu_count()} CPUs"
