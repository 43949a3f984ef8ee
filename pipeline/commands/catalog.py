"""``metasep separate SRC DST`` for catalogs: the command-line face of the Prefect flow.

``pipeline/commands/separate.py`` hands over here when SRC is a folder, prefix, glob or manifest
of URIs. The flow itself is started through :mod:`pipeline.commands.launch`, the one module of
``pipeline`` that imports ``flows``.
"""

from __future__ import annotations

import argparse
from typing import Any

from model import STEMS, CheckpointError
from pipeline.audio import FORMAT_NAMES, FORMATS
from pipeline.catalog.listing import is_catalog_source
from pipeline.catalog.summary import format_summary
from pipeline.commands import UsageError, launch
from pipeline.commands.options import at_least_one
from pipeline.settings import Settings
from pipeline.weights import resolve_weights


def wants_catalog(sources: list[str], storage_options: dict[str, Any] | None) -> bool:
    """Whether ``metasep separate`` was given a catalog SRC (then maybe DST), not audio files."""
    return 1 <= len(sources) <= 2 and is_catalog_source(sources[0], storage_options)


def run_separate_command(args: argparse.Namespace, settings: Settings) -> int:
    """``metasep separate SRC [DST]`` with a catalog SRC: DST is the second argument, else
    ``--out``. Options that shape single-file outputs do not apply and are refused."""
    for option, unset in (("two_stems", None), ("karaoke", False), ("remix", None)):
        if getattr(args, option, unset) != unset:
            raise UsageError(
                f"--{option.replace('_', '-')} is for files; a catalog run writes the four stems"
            )
    if tuple(getattr(args, "stems", STEMS)) != STEMS:
        raise UsageError("--stems is for files; a catalog run writes the four stems")
    if getattr(args, "device", None):
        raise UsageError("--device is for files; catalog workers take --gpus-per-worker")
    if getattr(args, "start", 0.0) or getattr(args, "duration", None) is not None:
        raise UsageError(
            "--start and --duration are for files; a catalog run separates whole tracks"
        )
    source = str(args.files[0])
    destination = str(args.files[1]) if len(args.files) == 2 else str(args.out)
    separator_options = {
        name: getattr(args, name)
        for name in ("segment", "context", "batch_size")
        if getattr(args, name, None) is not None
    }
    return run_catalog(
        source,
        destination,
        settings,
        separator_options=separator_options,
        fail_on_error=args.fail_on_error,
        run_id=args.run_id,
        tracks_per_call=args.tracks_per_call,
    )


def run_catalog(
    source: str,
    destination: str,
    settings: Settings,
    separator_options: dict[str, Any] | None = None,
    fail_on_error: bool = False,
    run_id: str | None = None,
    tracks_per_call: int | None = None,
) -> int:
    """Run the flow with ``settings``; exit code 0 when every track is done, 1 when any failed
    or was left. The settings are also passed as parameters (credentials aside, see
    :mod:`pipeline.commands.launch`), so that the run's page in Prefect shows them."""
    if settings.stem_format not in FORMATS:
        raise UsageError(f"stem format must be one of {FORMAT_NAMES}")
    try:  # before the flow starts: a typo, or named weights fetched here, on the driver
        resolve_weights(settings.checkpoint, settings)
    except CheckpointError as error:
        raise UsageError(str(error)) from None
    at_least_one({"--workers": settings.workers})
    summary = launch.separate_catalog(
        settings,
        source,
        destination,
        checkpoint=settings.checkpoint,
        workers=settings.workers,
        gpus_per_worker=settings.gpus_per_worker,
        cpus_per_worker=settings.cpus_per_worker,
        ray_address=settings.ray_address,
        precision=settings.precision,
        separator_options=separator_options,
        stem_format=settings.stem_format,
        fail_on_error=fail_on_error,
        run_id=run_id,
        tracks_per_call=tracks_per_call,
    )
    print(format_summary(summary))
    print(f"summary: {summary['summary_uri']}")
    tracks = summary["tracks"]
    return 1 if tracks["error"] or tracks["not_processed"] else 0
