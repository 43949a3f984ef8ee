"""``metasep demo``: the main job on embedded defaults (what ``make run`` runs).

It builds a small music library with ``metasep synth`` (mixtures only, as a user's library would
hold), then separates it with the catalog flow exactly as a nightly job would: Prefect's
ephemeral API, a Ray started in this process, the local file system for storage. Running it
again separates nothing: every track is already in the manifest.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch

from model import CheckpointError, MultiTasNet, save_checkpoint
from pipeline.catalog.summary import format_summary
from pipeline.commands import UsageError, launch
from pipeline.settings import settings_from_args
from pipeline.weights import resolve_weights


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="build a small synthetic library and separate it with the catalog flow",
        description="Render a small library of songs with FluidSynth into OUT/library, then run "
        "the catalog flow (Prefect + Ray Data, local defaults) into OUT/separated: stems, "
        "Parquet manifest and run summary. A second run skips every track.",
    )
    parser.add_argument("-o", "--out", type=Path, default=Path("out/demo"), help="output folder")
    parser.add_argument("--tracks", type=int, default=6, metavar="N", help="songs (default 6)")
    parser.add_argument(
        "--seconds", type=float, default=10.0, metavar="S", help="song length (default 10)"
    )
    parser.add_argument(
        "--checkpoint", help="model to use (default: METASEP_CHECKPOINT, else the shipped one)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.tracks <= 1000 or not 1.0 <= args.seconds <= 600.0:
        raise UsageError("--tracks must be 1-1000 and --seconds 1-600")
    library = build_library(args.out, args.tracks, args.seconds)
    settings = settings_from_args(args)
    checkpoint = demo_checkpoint(settings.checkpoint, args.out)
    options = settings.separation().model_copy(update={"checkpoint": checkpoint})
    summary = launch.separate_catalog(
        settings, str(library), str(args.out / "separated"), options=options
    )
    print()
    print(format_summary(summary))
    print(f"summary: {summary['summary_uri']}")
    print(f"listen: {summary['stems']}/<song>/{{drums,bass,other,vocals}}.flac")
    return 1 if summary["tracks"]["error"] else 0


def build_library(out: Path, tracks: int, seconds: float) -> Path:
    """``out/library/<song>.wav``: mixtures rendered by ``metasep synth`` (made once)."""
    from pipeline.synth import SynthError, find_synthesizer, write_dataset

    library = out / "library"
    if library.is_dir() and len(list(library.glob("*.wav"))) >= tracks:
        print(f"library: {library}/ (already built)")
        return library
    rendered = out / "synth"
    try:
        write_dataset(
            rendered,
            "test",
            tracks,
            seconds,
            seed=1,
            synth=find_synthesizer(),
            workers=len(os.sched_getaffinity(0)),
        )
    except SynthError as error:
        raise UsageError(str(error)) from None
    library.mkdir(parents=True, exist_ok=True)
    for folder in sorted((rendered / "test").iterdir()):
        shutil.copyfile(folder / "mixture.wav", library / f"{folder.name}.wav")
    print(f"library: {tracks} songs of {seconds:g} s in {library}/ (true stems in {rendered}/)")
    return library


def demo_checkpoint(name: str, out: Path) -> str:
    """The checkpoint to use; without shipped weights, a random model of the default size (said
    loudly: its stems prove the pipeline, they are not a separation)."""
    try:
        return str(resolve_weights(name))
    except CheckpointError as error:
        if name != "default":
            raise UsageError(str(error)) from None
    from pipeline.training.config import PRESETS

    path = out / "random-default-size.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        save_checkpoint(MultiTasNet(PRESETS["default"].model), path, {"note": "random weights"})
    print(
        "NOTE: no shipped weights (model/weights/default.safetensors): using a RANDOMLY "
        "initialised model of the default size. The stems show the pipeline, not a separation."
    )
    return str(path)
