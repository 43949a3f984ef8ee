"""``metasep bench``: speed, memory and agreement of the engine against the release's inference."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from pipeline.commands import UsageError
from pipeline.commands.options import add_separation_arguments
from pipeline.separator import KERNELS
from pipeline.settings import settings_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="real-time factor, peak memory and agreement of the engine vs the release's path",
        description="On the same deterministic music-like stereo audio and the same weights, "
        "time the release's inference (n_chunks = ceil(S/30), one channel after the other) and "
        "the engine (file in, four stem files out), each in a fresh process, and score the "
        "engine's windowed output against the model's single-pass output (SDR in dB, minimum "
        "over stems).",
    )
    parser.add_argument(
        "--config",
        default="paper",
        help="paper (random weights), named weights (default: the shipped model; release: the "
        "paper's trained weights, fetched once), a run config JSON (random weights) or a "
        "checkpoint file (default: paper)",
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="audio length (60)")
    add_separation_arguments(parser, ("device", "precision", "segment", "context", "batch_size"))
    parser.add_argument(
        "--engine-only",
        action="store_true",
        help="time the engine and its peak memory only (e.g. to compare track lengths)",
    )
    parser.add_argument(
        "--threads", type=int, help="CPU threads of both timed processes (default: torch's)"
    )
    parser.add_argument(
        "--tracks",
        type=int,
        metavar="N",
        help="throughput mode: N different tracks of --seconds through the catalog's model stage "
        "in this process (no Ray): aggregate real time and, on CUDA, the GPU-busy fraction",
    )
    parser.add_argument(
        "--tracks-per-call",
        type=int,
        metavar="N",
        help="with --tracks: tracks per separate_files call (default: a catalog worker's, 8 on "
        "a GPU and 1 on a CPU)",
    )
    parser.add_argument(
        "--calls",
        type=int,
        default=1,
        metavar="N",
        help="with --tracks: calls at a time, from N threads sharing the model (default 1)",
    )
    parser.add_argument(
        "--count-ops",
        action="store_true",
        help="count the ops the engine dispatches outside the network per minute of audio, by "
        "phase (on a GPU each is host work on the engine's thread), on CPU tensors along the "
        "device path; nothing is timed",
    )
    parser.add_argument(
        "--kernels",
        choices=KERNELS,
        default="auto",
        help="the TCN blocks: fused (torch.compile), eager (hand-written) or auto (fused on CUDA)",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="also write profiles of the engine's file and in-memory runs into DIR: the host "
        "(cProfile) and the operators (torch.profiler, device time on CUDA)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from pipeline.bench.engine import (
        BenchOptions,
        bench_model,
        count_ops,
        run_bench,
        run_throughput,
    )
    from pipeline.separator import Separator

    if not (math.isfinite(args.seconds) and args.seconds > 0):
        raise UsageError("--seconds must be a positive number")
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be at least 1")
    if args.tracks is not None and args.tracks < 1:
        raise UsageError("--tracks must be at least 1")
    if args.tracks_per_call is not None and (args.tracks_per_call < 1 or not args.tracks):
        raise UsageError("--tracks-per-call must be at least 1 and goes with --tracks")
    if args.calls < 1 or (args.calls > 1 and not args.tracks):
        raise UsageError("--calls must be at least 1 and goes with --tracks")
    if args.profile and (args.tracks or args.engine_only):
        raise UsageError("--profile profiles the full bench: not with --tracks or --engine-only")
    if args.count_ops and (args.tracks or args.engine_only or args.profile):
        raise UsageError("--count-ops counts alone: not with --tracks, --engine-only or --profile")
    settings = settings_from_args(args)
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    options = BenchOptions(
        seconds=args.seconds,
        device=device,
        separation=settings.separation(),
        engine_only=args.engine_only,
        threads=args.threads,
        kernels=args.kernels,
        profile=str(Path(args.profile).resolve()) if args.profile else None,
    )
    try:
        model, weights = bench_model(_named_weights(args.config), args.seed)
        # Refuse options the engine cannot run before any process is started (on the CPU: the
        # parent process keeps no copy of the network on the GPU).
        on_cpu = torch.device(device).type == "cpu"
        if not on_cpu and not torch.cuda.is_available():
            raise ValueError("CUDA is not available on this machine; use --device cpu")
        separation = options.separation
        Separator(
            model,
            "cpu",
            separation.precision if on_cpu else "float32",
            separation.segment,
            separation.context,
            separation.batch_size,
            kernels=args.kernels,
        )
    except ValueError as error:
        raise UsageError(str(error).splitlines()[0]) from None
    if args.count_ops:
        figures = count_ops(model, options)
    elif args.tracks:
        figures = run_throughput(model, options, args.tracks, args.tracks_per_call, args.calls)
    else:
        figures = run_bench(model, options)
    results = {"config": args.config, "weights": weights, **figures}
    if args.json:
        print(json.dumps(results, sort_keys=True))
    else:
        print(report(results))
    return 0


def _named_weights(config: str) -> str:
    """``--config`` with downloadable named weights (``release``) replaced by their cached
    file; ``default`` stays a name (the bench falls back to random weights without it)."""
    from pipeline.weights import REGISTRY, resolve_weights

    if config in REGISTRY and not REGISTRY[config].shipped:
        return str(resolve_weights(config))
    return config


def report(results: dict) -> str:
    """The figures as a few lines of text."""
    where = results["gpu"] or results["cpu"]
    lines = [
        f"{results['seconds']:g} s of stereo 44.1 kHz, {results['config']} model "
        f"({results['weights']}), {results['device']} ({where}, "
        f"{results['threads']} threads), {results['precision']}; engine windows "
        f"{results['segment']:g} s + {results['context']:g} s context, batch "
        f"{results['batch_size'] or 'auto'}",
    ]
    if "ops_per_minute" in results:
        phases = {k[15:]: v for k, v in results.items() if k.startswith("ops_per_minute_")}
        lines.append(
            f"ops:       {results['ops_per_minute']:.0f} per minute of audio outside the network "
            "(" + ", ".join(f"{name} {value:.0f}" for name, value in phases.items()) + "), "
            "counted on CPU tensors along the device path"
        )
        return "\n".join(lines)
    if "throughput_xrt" in results:
        busy = results.get("gpu_busy_fraction")
        lines.append(
            f"throughput: {results['throughput_xrt']:7.2f}x real time for {results['tracks']} "
            f"tracks together ({results['throughput_seconds']:.1f} s, "
            f"{results['tracks_per_call']} per call, {results['calls_at_once']} call(s) at once, "
            f"batch {results['batch_size_used']}), host cores busy "
            f"{results['host_cores_busy']:.1f} of {results['host_cores']}"
            + (f", GPU busy {busy:.0%}" if busy is not None else "")
        )
        return "\n".join(lines)
    lines.append(
        f"engine:    {results['engine_xrt']:7.2f}x real time "
        f"({results['engine_seconds']:.1f} s, file to stem files), peak RSS "
        f"{results['peak_rss_mb']:.0f} MB (after loading the model: "
        f"{results['model_rss_mb']:.0f} MB)"
    )
    if "engine_cuda_peak_mb" in results:
        lines.append(f"           peak CUDA memory {results['engine_cuda_peak_mb']:.0f} MB")
    phases = {k[6:-2]: v for k, v in results.items() if k.startswith("phase_")}
    if phases:
        total = sum(phases.values())
        lines.append(
            "phases:    "
            + ", ".join(f"{name} {value:.2f} s" for name, value in phases.items())
            + f" (a separate run, synchronised at each phase: {total:.1f} s)"
        )
    if "memory_xrt" in results:
        lines.append(
            f"in memory: {results['memory_xrt']:7.2f}x real time (Separator.separate); network "
            f"alone {results['network_xrt']:.2f}x"
        )
    if "reference_xrt" in results:
        lines += [
            f"reference: {results['reference_xrt']:7.2f}x real time "
            f"({results['reference_seconds']:.1f} s, inference with "
            f"{results['reference_chunks']} chunk(s) per channel), peak RSS "
            f"{results['reference_peak_rss_mb']:.0f} MB",
            f"ratio:     {results['ratio']:7.2f}x faster than the reference",
            f"agreement with the single-pass output: {results['agreement_db']:.1f} dB "
            f"(min over stems; the reference's chunking: "
            f"{results['reference_agreement_db']:.1f} dB)",
        ]
    return "\n".join(lines)
