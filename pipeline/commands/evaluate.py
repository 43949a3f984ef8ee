"""``metasep evaluate REFS EST... OUT``: museval scores of whole catalogs, as the Prefect flow
``evaluate_catalog`` (``flows/evaluate.py``) on a local or remote Ray cluster."""

from __future__ import annotations

import argparse
from typing import Any

from model import STEMS
from pipeline.commands import UsageError, launch
from pipeline.commands.options import add_cluster_arguments, argument_type, at_least_one
from pipeline.settings import load_settings
from pipeline.stems import parse_stems


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score estimates against a reference catalog with museval (SiSEC 2018 settings)",
        description="Score every track of REFS (MUSDB18-HQ layout, local or object storage, or a "
        "local MUSDB18 folder of .stem.mp4) for each estimate source EST (a `metasep separate` "
        "catalog destination, or a folder of <track>/<target>.wav) with museval BSSEval v4, one "
        "Ray task per track and source. Writes OUT/frames.parquet, OUT/summary.parquet, "
        "OUT/tracks.parquet, museval's per-track JSON under OUT/museval/, OUT/boxplot.png and "
        "prints median SDR per source and target (median over frames, then over tracks). Pairs "
        "already scored from the same files are not scored again.",
    )
    parser.add_argument("references", metavar="REFS", help="reference catalog")
    parser.add_argument(
        "locations",
        nargs="+",
        metavar="EST... OUT",
        help="estimate sources (NAME=LOCATION or LOCATION, named after its last part), then the "
        "output folder",
    )
    parser.add_argument(
        "--mixture-baseline",
        action="store_true",
        help="also score the mixture as every estimate (the floor a separation must beat)",
    )
    parser.add_argument("--split", default="test", help="REFS/<split> (default: test)")
    parser.add_argument(
        "--targets",
        type=argument_type(parse_stems),
        default=STEMS,
        metavar="T,T",
        help=f"targets to score (default: {','.join(STEMS)})",
    )
    parser.add_argument("--tracks", type=int, metavar="N", help="only the first N tracks")
    parser.add_argument(
        "--workers", type=int, metavar="N", help="scoring tasks at once (default: one per CPU)"
    )
    add_cluster_arguments(parser)
    parser.add_argument("--run-id", help="name of the run (default: UTC time and a random suffix)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    *estimates, destination = args.locations
    if not estimates and not args.mixture_baseline:
        raise UsageError("give at least one estimate source EST before OUT (or --mixture-baseline)")
    at_least_one({"--workers": args.workers, "--tracks": args.tracks})
    # storage options (maybe credentials) reach the flow as settings, not as recorded parameters
    settings = load_settings(ray_address=args.ray_address, storage_options=args.storage_options)
    summary = launch.evaluate_catalog(
        settings,
        args.references,
        estimates,
        destination,
        workers=args.workers,
        ray_address=settings.ray_address,
        split=args.split,
        targets=args.targets,
        with_mixture=args.mixture_baseline,
        limit=args.tracks,
        run_id=args.run_id,
    )
    print_evaluation(summary)
    return exit_code(summary)


def print_evaluation(summary: dict[str, Any]) -> None:
    """The run summary, then the scores: per method and target, the SiSEC medians."""
    import pandas as pd

    from pipeline.evaluation.report import format_scores, format_summary

    print(format_summary(summary))
    print(f"summary: {summary['summary_uri']}")
    if summary["scores"]:
        print()
        print("museval BSSEval v4 in dB: median over 1 s frames, then over tracks (SDR mean: mean")
        print("of the track medians); NaN frames (silent references) left out, as museval does")
        print(format_scores(pd.DataFrame(summary["scores"])))


def exit_code(summary: dict[str, Any]) -> int:
    """0 when every pair has its scores, 1 when any failed or was not processed."""
    return 1 if summary["failing_now"] or summary["pairs"]["not_processed"] else 0
