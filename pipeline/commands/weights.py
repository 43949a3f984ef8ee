"""``metasep weights``: the named weights, listed, fetched ahead of use, or imported from a file
got another way (an air-gapped machine, a blocked download)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from model import STEMS
from pipeline.commands import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "weights",
        help="list, fetch or import named weights (--checkpoint NAME)",
        description="Named weights are what --checkpoint and METASEP_CHECKPOINT take besides a "
        "file: 'default' is shipped, the others are downloaded once (from their published URL, "
        "or from METASEP_WEIGHTS_MIRROR), checked, and kept converted in "
        "METASEP_CACHE_DIR/weights/.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="each name, whether it is here, size, scores")
    listing.set_defaults(handler=run_list)
    fetch = actions.add_parser(
        "fetch", help="download (or import with --from) and convert, without separating"
    )
    fetch.add_argument("name", metavar="NAME", help="a name of `metasep weights list`")
    fetch.add_argument(
        "--from",
        dest="source",
        type=Path,
        metavar="FILE",
        help="import this file (e.g. a best_model.pt downloaded elsewhere) instead of downloading",
    )
    fetch.set_defaults(handler=run_fetch)


def run_list(args: argparse.Namespace) -> int:
    from pipeline.weights import cached_file, weights_table

    rows = weights_table()
    print(f"{'name':<10} {'state':<13} {'size':>9} {'parameters':>11}  published SDR (dB)")
    for row in rows:
        print(
            f"{row['name']:<10} {row['state']:<13} {_size(row):>9} "
            f"{row['parameters'] / 1e6:>10.2f}M  {_scores(row['scores'])}"
        )
    print()
    for row in rows:
        print(f"{row['name']}: {row['description']}.")
        print(f"  scores: {row['source']}")
        print(f"  from: {row['url'] or 'shipped in model/weights/'}")
        print(f"  licence: {row['licence']}")
    print(f"\ncache: {cached_file('release').parent}/ (METASEP_CACHE_DIR)")
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from pipeline.weights import WeightsError, fetch_weights

    try:
        path = fetch_weights(args.name, source=args.source)
    except WeightsError as error:
        raise UsageError(str(error)) from None
    print(f"{args.name}: {path} (use it with --checkpoint {args.name})")
    return 0


def _size(row: dict[str, Any]) -> str:
    """The file's size; before it is here and without a known size, about 4 bytes a parameter
    (float32), marked with ~."""
    if row["bytes"] is None:
        return f"~{row['parameters'] * 4 / 1e6:.0f} MB"
    return f"{row['bytes'] / 1e6:.1f} MB"


def _scores(scores: dict[str, float]) -> str:
    return " / ".join(f"{stem} {scores[stem]:.2f}" for stem in STEMS if stem in scores)
