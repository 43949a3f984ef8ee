"""``metasep benchmark``: separate a reference catalog with checkpoints and compare museval SDR."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "benchmark",
        help="score checkpoints against the mixture baseline on a reference catalog (museval)",
        description="Separate every track of REFERENCES/<split> with each checkpoint, score it "
        "with museval BSSEval v4 (SiSEC 2018 settings) and print median SDR per method and stem "
        "(median over frames, then over tracks), next to the mixture baseline.",
    )
    parser.add_argument("references", type=Path, help="MUSDB18-HQ-layout catalog")
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a method to score (repeatable); PATH may be 'default'",
    )
    parser.add_argument("--split", default="test")
    parser.add_argument("--tracks", type=int, help="score only the first N tracks")
    parser.add_argument("--workers", type=int, default=1, help="processes")
    parser.add_argument("--out", type=Path, help="folder for frames.parquet and summary.parquet")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.benchmark import benchmark, reference_tracks, sdr_table
    from pipeline.scoring import summarize

    checkpoints = {}
    for item in args.checkpoint:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--checkpoint expects NAME=PATH, got {item!r}")
        checkpoints[name] = path
    try:
        tracks = reference_tracks(args.references, args.split, args.tracks)
    except (ValueError, OSError) as error:
        raise UsageError(str(error)) from None
    frames = benchmark(tracks, checkpoints, args.workers)
    summary = summarize(frames)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        frames.to_parquet(args.out / "frames.parquet")
        summary.to_parquet(args.out / "summary.parquet")
    print(f"median SDR in dB over {len(tracks)} tracks of {args.references / args.split}:")
    print(sdr_table(summary))
    if args.out:
        print(f"per-frame scores and summary in {args.out}/")
    return 0
