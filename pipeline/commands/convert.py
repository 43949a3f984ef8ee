"""``metasep convert``: a release ``best_model.pt`` to the own safetensors format."""

from __future__ import annotations

import argparse
from pathlib import Path

from model import CheckpointError, load_checkpoint_with_metadata, save_checkpoint
from pipeline.commands import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a release checkpoint (best_model.pt) to the own format",
        description="Read a checkpoint (release .pt or own .safetensors) safely and write it in "
        "the own format: safetensors weights with the configuration and metadata in its header.",
    )
    parser.add_argument("checkpoint", help="release best_model.pt (or an own-format file)")
    parser.add_argument("output", type=Path, help="output file (.safetensors is added if absent)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        model, metadata = load_checkpoint_with_metadata(args.checkpoint)
    except CheckpointError as error:
        raise UsageError(str(error)) from None
    metadata = {**metadata, "converted_from": Path(args.checkpoint).name}
    path = save_checkpoint(model, args.output, metadata)
    print(f"wrote {path} ({model.parameter_count():,} parameters, config {model.config.to_json()})")
    return 0
