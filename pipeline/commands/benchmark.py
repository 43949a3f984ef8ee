"""``metasep benchmark``: separate a reference catalog with checkpoints and compare museval SDR,
as the Prefect flow ``benchmark`` (``flows/benchmark.py``): synth (or given) references ->
``separate_catalog`` per checkpoint -> ``evaluate_catalog`` with the mixture baseline."""

from __future__ import annotations

import argparse

from model import CheckpointError
from pipeline.catalog.summary import format_summary
from pipeline.commands import UsageError, launch
from pipeline.commands.evaluate import exit_code, print_evaluation
from pipeline.commands.options import add_cluster_arguments, at_least_one
from pipeline.settings import load_settings
from pipeline.weights import resolve_weights


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "benchmark",
        help="separate a test catalog with checkpoints and compare museval SDR (end to end)",
        description="Render --tracks synth test tracks (or take the catalog REFERENCES), separate "
        "their mixtures with each checkpoint through the catalog flow, score every checkpoint and "
        "the mixture baseline with museval BSSEval v4 (SiSEC 2018 settings) through the "
        "evaluation flow, and print median SDR per method and stem (median over frames, then "
        "over tracks). Everything lands under --out; a rerun reuses what is done.",
    )
    parser.add_argument(
        "references",
        nargs="?",
        metavar="REFERENCES",
        help="MUSDB18-HQ-layout catalog, local or object storage (default: render synth tracks)",
    )
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a method to score (repeatable; PATH may be named weights such as default or "
        "release); default: default=default",
    )
    parser.add_argument(
        "--tracks",
        type=int,
        metavar="N",
        help="tracks to render, or the first N of REFERENCES (default: 4 rendered, all given)",
    )
    parser.add_argument(
        "--seconds", type=float, default=30.0, metavar="S", help="rendered track length (30)"
    )
    parser.add_argument(
        "--seed", type=int, default=3, metavar="K", help="synth seed (3: the default model's test)"
    )
    parser.add_argument("--split", default="test", help="REFERENCES/<split> (default: test)")
    parser.add_argument("--out", default="out/benchmark", help="output folder or URL")
    parser.add_argument(
        "--workers", type=int, metavar="N", help="scoring tasks at once (default: one per CPU)"
    )
    parser.add_argument(
        "--separate-workers",
        type=int,
        metavar="N",
        help="model workers of the separation (default: one per GPU, or CPUs-1)",
    )
    add_cluster_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # storage options (maybe credentials) reach the flow as settings, not as recorded parameters
    settings = load_settings(ray_address=args.ray_address, storage_options=args.storage_options)
    checkpoints = _checkpoints(args.checkpoint)
    for name, path in checkpoints.items():
        try:
            resolve_weights(path, settings)  # named weights are fetched now, before any flow
        except CheckpointError as error:
            raise UsageError(f"--checkpoint {name}={path}: {error}") from None
    at_least_one({"--tracks": args.tracks, "--workers": args.workers})
    if args.references is None and not 1.0 <= args.seconds <= 600.0:
        raise UsageError(f"--seconds must be between 1 and 600, not {args.seconds:g}")
    result = launch.benchmark(
        settings,
        str(args.out),
        checkpoints,
        references=args.references,
        tracks=args.tracks if args.references or args.tracks else 4,
        seconds=args.seconds,
        seed=args.seed,
        split=args.split,
        workers=args.workers,
        separate_workers=args.separate_workers,
        ray_address=settings.ray_address,
    )
    print(f"references: {result['references']}")
    for name, separation in result["separations"].items():
        print(f"{name}: {format_summary(separation).splitlines()[0]}")
    print()
    print_evaluation(result["evaluation"])
    _print_comparison(result["evaluation"])
    separated = any(s["tracks"]["error"] for s in result["separations"].values())
    return 1 if separated else exit_code(result["evaluation"])


def _checkpoints(items: list[str]) -> dict[str, str]:
    checkpoints = {}
    for item in items or ["default=default"]:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--checkpoint expects NAME=PATH, got {item!r}")
        if name in checkpoints or name == "mixture":
            raise UsageError(f"--checkpoint name {name!r} is taken")
        checkpoints[name] = path
    return checkpoints


def _print_comparison(evaluation: dict) -> None:
    import pandas as pd

    from pipeline.evaluation.report import format_sdr_table

    if evaluation["scores"]:
        print()
        print(f"median SDR in dB over {evaluation['tracks']} tracks of {evaluation['references']}:")
        print(format_sdr_table(pd.DataFrame(evaluation["scores"])))
