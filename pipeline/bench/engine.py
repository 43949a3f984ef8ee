"""Speed, memory and agreement of the separation engine against the release's inference path.

One run of :func:`run_bench` measures, on the same stereo audio and the same weights:

- the *reference*: the release's path, :meth:`model.MultiTasNet.inference` with
  ``n_chunks = ceil(seconds / 30)`` (8 s of context around each chunk), the left then the right
  channel, on the stage signals the engine prepares (their preparation is not timed);
- the *engine*: :meth:`pipeline.separator.Separator.separate_file` from an audio file to four
  encoded stem files, end to end (decoding, resampling, network, least-squares scaling,
  resampling back, encoding; loading the model is not timed);
- where that time goes: the same file again timed by a :class:`~pipeline.bench.probes.Probe`,
  which synchronises the device at every phase boundary and charges each phase its own seconds
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

The audio (:func:`pipeline.bench.signals.bench_audio`) is a deterministic music-like stereo signal made with numpy
(drum hits, a bass line, chords, a vibrato lead with phrasing), so that runs on different machines
separate the same samples without any data or system tools.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import CheckpointError, MultiTasNet, load_checkpoint, save_checkpoint
from model.frozen import frames_multiple
from pipeline.audio import write_audio
from pipeline.bench.probes import Probe, last_stage, stage_mixes, stem_agreement
from pipeline.bench.process import (
    cpu_name,
    device_peak,
    host_cpu_seconds,
    in_fresh_process,
    peak_rss_mb,
    reset_device_peak,
    synchronize,
    timed,
)
from pipeline.bench.signals import BENCH_RATE, bench_audio
from pipeline.runtime import keep_freed_memory
from pipeline.separator import (
    ForwardTimer,
    Observer,
    SeparationOptions,
    Separator,
    resolve_precision,
)

RELEASE_CHUNK_SECONDS = 30  # the release's inference: one chunk per 30 s of audio
RELEASE_CONTEXT_SECONDS = 8  # the release's context on each side of a chunk


@dataclass(frozen=True)
class BenchOptions:
    """What to measure: the engine's options, the audio's length and which paths to run."""

    seconds: float = 60.0
    device: str = "cpu"
    separation: SeparationOptions = field(
        default_factory=lambda: SeparationOptions(precision="float32")
    )
    engine_only: bool = False  # skip the reference and the agreement (memory scaling runs)
    threads: int | None = None  # torch CPU threads of both timed processes (None: torch's)
    kernels: str = "auto"  # the TCN blocks: fused (compiled), eager, or auto (fused on CUDA)
    profile: str | None = None  # a folder for profiles of the engine's runs (see _profile)


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
        engine = in_fresh_process(_engine_job, checkpoint, source, work / "stems", options)
        results.update(engine)
        results["engine_xrt"] = options.seconds / engine["engine_seconds"]
        if options.engine_only:
            return results
        results["memory_xrt"] = options.seconds / engine["memory_seconds"]
        results["network_xrt"] = options.seconds / engine["network_seconds"]
        probe = Probe(options.device)
        separator = _separator(checkpoint, options, probe)
        for stage, mix in enumerate(stage_mixes(separator, audio, BENCH_RATE)):
            np.save(work / f"stage{stage}.npy", mix)
        reference = in_fresh_process(_reference_job, checkpoint, work, options)
        results.update({k: v for k, v in reference.items() if not k.startswith("_")})
        results["reference_xrt"] = options.seconds / reference["reference_seconds"]
        results["ratio"] = results["engine_xrt"] / results["reference_xrt"]
        single = np.load(work / "single.npy")
        windowed = last_stage(separator, probe, audio, BENCH_RATE)
        agreement = stem_agreement(single, windowed)
        results["agreement_db"] = min(agreement.values())
        results.update({f"agreement_{stem}_db": value for stem, value in agreement.items()})
        results["reference_agreement_db"] = min(
            stem_agreement(single, np.load(work / "chunked.npy")).values()
        )
    return results


def _describe(options: BenchOptions) -> dict[str, Any]:
    """What every bench result names: the options, the machine and torch."""
    device, separation = torch.device(options.device), options.separation
    return {
        "seconds": options.seconds,
        "device": options.device,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "precision": resolve_precision(separation.precision, device),
        "segment": separation.segment,
        "context": separation.context,
        "batch_size": separation.batch_size,
        "kernels": options.kernels,
        "threads": options.threads or torch.get_num_threads(),
        "cpu": cpu_name(),
        "torch": torch.__version__,
    }


def _separator(
    model: Path | MultiTasNet, options: BenchOptions, observer: Observer | None = None, **engine
) -> Separator:
    """The separator the options ask for (``engine``: its resampler or kernels, forced)."""
    separation = options.separation
    return Separator(
        model,
        options.device,
        separation.precision,
        separation.segment,
        separation.context,
        separation.batch_size,
        kernels=engine.pop("kernels", options.kernels),
        observer=observer,
        **engine,
    )


def _engine_job(
    checkpoint: Path, source: Path, destination: Path, options: BenchOptions
) -> dict[str, Any]:
    """In a fresh process: separate ``source`` into files (time, memory), then the same with
    each phase timed, in memory, and the network alone."""
    keep_freed_memory()
    _set_threads(options)
    probe = Probe(options.device)
    separator = _separator(checkpoint, options, probe)
    loaded = peak_rss_mb()
    # Untimed warm-up on one window of audio, as a catalog worker has run its first track:
    # one-time costs (kernel selection, first touch of allocator pages) are not per-track costs.
    window = options.separation.segment + 2 * options.separation.context
    warm_up = time.perf_counter()
    separator.separate(bench_audio(min(window, options.seconds)), BENCH_RATE)
    warm_up = time.perf_counter() - warm_up  # with fused kernels: their compilation
    reset_device_peak(separator.device)
    started = time.perf_counter()
    separator.separate_file(source, destination)
    seconds = time.perf_counter() - started
    figures = {
        "engine_seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "model_rss_mb": loaded,
        "engine_batch_size": separator.batch_size,
        "warm_up_seconds": warm_up,
        "engine_kernels": "fused" if separator.network.fused else "eager",
        **device_peak(separator.device, "engine"),
    }
    if options.engine_only:
        return figures
    with probe.timing() as phases:
        separator.separate_file(source, destination)
    figures.update({f"phase_{name}_s": value for name, value in phases.items()})
    audio = bench_audio(options.seconds)
    figures["memory_seconds"] = timed(
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
        host.runcall(lambda job=job: timed(separator.device, job))
        text = io.StringIO()
        stats = pstats.Stats(host, stream=text)
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(40)
        (folder / f"host-{name}.txt").write_text(text.getvalue())
        with profile(activities=activities) as operators:
            timed(separator.device, job)
        table = operators.key_averages().table(sort_by=order, row_limit=50)
        (folder / f"operators-{name}.txt").write_text(table)


def _network_seconds(separator: Separator, audio: np.ndarray) -> float:
    """Seconds of the network alone over the engine's windows of ``audio``: the stage signals
    are prepared and on the device beforehand, batches as the engine forms them."""
    mixes = [
        torch.from_numpy(m).to(separator.device) for m in stage_mixes(separator, audio, BENCH_RATE)
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
    return timed(separator.device, lambda: [separator.network.separate_last(b) for b in batches])


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
        timer = ForwardTimer(options.device)
        separator = _separator(save_checkpoint(model, work / "model"), options, timer)
        per_call = per_call or options.separation.tracks_on(separator.device)
        separator.separate(bench_audio(min(options.seconds, 4.0)), BENCH_RATE)  # warm-up
        timer.take()
        jobs = [(path, work / "stems" / path.stem) for path in sources]
        groups = [jobs[k : k + per_call] for k in range(0, tracks, per_call)]
        reset_device_peak(separator.device)
        started, host_started = time.perf_counter(), host_cpu_seconds()
        with ThreadPoolExecutor(calls) as callers:
            for outcome in callers.map(separator.separate_files, groups):
                failed = [r for r in outcome if isinstance(r, Exception)]
                if failed:
                    raise failed[0]
        synchronize(separator.device)
        seconds = time.perf_counter() - started
        host_seconds = host_cpu_seconds() - host_started
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
        **device_peak(separator.device, "throughput"),
    )
    busy = timer.take()
    if busy is not None:
        results["gpu_busy_fraction"] = busy / seconds
    return results


def count_ops(model: MultiTasNet, options: BenchOptions) -> dict[str, Any]:
    """The ops the engine dispatches outside the network per minute of audio, by phase.

    On a GPU each op is a trip through the dispatcher on the engine's thread and most are a
    kernel launch: with a network as fast as a GPU makes it, that host work bounds the engine's
    speed. The ops are the same on any device, so they are counted here on CPU tensors along the
    device path (the torch resampler), for :meth:`Separator.separate` of ``options.seconds`` of
    :func:`bench_audio`; ops inside forward passes are left out (on CUDA those are compiled
    kernels). Phases as the engine names them (see :class:`~pipeline.bench.probes.Probe`);
    ``other`` is between them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    on_cpu = BenchOptions(
        options.seconds, "cpu", options.separation.model_copy(update={"precision": "float32"})
    )
    probe = Probe(on_cpu.device)
    separator = _separator(model, on_cpu, probe, resampler="torch", kernels="eager")
    counts: dict[str, int] = {}

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            phase = probe.current or "other"
            if phase != "network":
                counts[phase] = counts.get(phase, 0) + 1
            return func(*args, **(kwargs or {}))

    audio = bench_audio(options.seconds)
    with probe.timing(), Counter():
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
    reset_device_peak(device)
    started = time.perf_counter()
    chunked = [model.inference(channel_inputs(c), n_chunks)[-1].cpu() for c in range(channels)]
    synchronize(device)
    seconds = time.perf_counter() - started
    figures = {
        "reference_seconds": seconds,
        "reference_chunks": n_chunks,
        "reference_peak_rss_mb": peak_rss_mb(),
        **device_peak(device, "reference"),
    }
    np.save(work / "chunked.npy", torch.cat(chunked)[:, :, 0].numpy())
    single = [model.inference(channel_inputs(c), 1)[-1].cpu() for c in range(channels)]
    np.save(work / "single.npy", torch.cat(single)[:, :, 0].numpy())
    return figures


def _set_threads(options: BenchOptions) -> None:
    if options.threads:
        torch.set_num_threads(options.threads)
