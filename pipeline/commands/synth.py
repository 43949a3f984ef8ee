"""``metasep synth``: render a synthetic four-stem dataset in the MUSDB18-HQ layout."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from pipeline.commands import UsageError
from pipeline.synth import SPLITS, SynthError, find_synthesizer, write_dataset
from pipeline.synth.render import DEFAULT_SOUNDFONTS

MAX_TRACKS = 100_000
SECONDS_RANGE = (1.0, 600.0)  # a 10-minute track already needs ~2.5 GB while it is levelled


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="render synthetic four-stem music (MUSDB18-HQ layout) with FluidSynth",
        description="Compose varied General-MIDI songs (form, drums, bass, accompaniment, a sung "
        "lead; every stem sounds in most of every track), render every stem on its own with "
        "FluidSynth and write OUT/<split>/<track>/{mixture,drums,bass,other,vocals}.wav (44.1 kHz "
        "stereo, the mixture the exact sum of the stems), the stems' MIDI files in <track>/midi/, "
        "OUT/index.parquet (one row per track) and OUT/notes.parquet (one row per note). The "
        "same seed and SoundFonts give the same files.",
    )
    parser.add_argument("out", type=Path, metavar="OUT", help="dataset folder (created if needed)")
    parser.add_argument(
        "--tracks", type=int, required=True, metavar="N", help="number of tracks to render"
    )
    parser.add_argument(
        "--seconds", type=float, required=True, metavar="S", help="length of every track"
    )
    parser.add_argument(
        "--seed", type=int, required=True, metavar="K", help="seed of the run (0 or more)"
    )
    parser.add_argument("--split", choices=SPLITS, default="train", help="default: train")
    parser.add_argument(
        "--soundfont",
        type=Path,
        nargs="+",
        action="extend",
        metavar="PATH",
        help="General MIDI .sf2 files, one picked per track by its seed (default: those of the "
        f"Debian packages {' and '.join(DEFAULT_SOUNDFONTS)} that are installed)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)),
        metavar="W",
        help="tracks rendered in parallel (default: the number of cores)",
    )
    parser.add_argument(
        "--float", dest="float32", action="store_true", help="32-bit float WAV (default 16-bit)"
    )
    parser.add_argument(
        "--effects", action="store_true", help="turn on the synthesizer's reverb and chorus"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    _check_arguments(args)
    try:
        synth = find_synthesizer(args.soundfont, args.effects)
    except SynthError as error:
        raise UsageError(str(error)) from None
    _prepare_folder(args.out)
    try:
        summary = write_dataset(
            args.out,
            args.split,
            args.tracks,
            args.seconds,
            args.seed,
            synth,
            workers=args.workers,
            float32=args.float32,
        )
    except (SynthError, OSError) as error:
        print(f"metasep synth: error: {error}", file=sys.stderr)
        return 1
    rate = summary.tracks / summary.seconds * 60
    encoding = "32-bit float" if args.float32 else "16-bit PCM"
    print(
        f"wrote {summary.tracks} tracks of {args.seconds:g} s ({encoding}, 44.1 kHz stereo) to "
        f"{summary.split_dir}/ in {summary.seconds:.1f} s ({rate:.1f} tracks/min); "
        f"index {summary.index_path} has {summary.index_rows} rows, "
        f"{summary.notes_path} {summary.notes_rows} notes"
    )
    return 0


def _check_arguments(args: argparse.Namespace) -> None:
    """One clear error for the first argument out of range."""
    if not 1 <= args.tracks <= MAX_TRACKS:
        raise UsageError(f"--tracks must be between 1 and {MAX_TRACKS}, not {args.tracks}")
    low, high = SECONDS_RANGE
    if not (math.isfinite(args.seconds) and low <= args.seconds <= high):
        raise UsageError(f"--seconds must be between {low:g} and {high:g}, not {args.seconds:g}")
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must be between 0 and 2**63 - 1, not {args.seed}")
    if args.workers < 1:
        raise UsageError(f"--workers must be 1 or more, not {args.workers}")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"{args.out} exists and is not a folder")


def _prepare_folder(out: Path) -> None:
    """Create the dataset folder, or say why it cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create {out}: {error.strerror}") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"{out} is not writable")
