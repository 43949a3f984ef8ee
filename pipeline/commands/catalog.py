"""``metasep separate SRC DST`` for catalogs: the command-line face of the Prefect flow.

``pipeline/commands/separate.py`` hands over here when SRC is a folder, prefix, glob or manifest
of URIs. The flow itself is started through :mod:`pipeline.commands.launch`, the one module of
``pipeline`` that imports ``flows``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from model import STEMS, CheckpointError
from pipeline.catalog.listing import is_catalog_source
from pipeline.catalog.preflight import check_destination, check_source
from pipeline.catalog.summary import format_summary
from pipeline.commands import UsageError, launch
from pipeline.settings import Settings
from pipeline.storage.errors import CatalogError
from pipeline.storage.lease import STALE_AFTER_SECONDS, LeaseHeld, current_holder
from pipeline.weights import resolve_weights

BUSY = 3  # the exit code of a run that found its destination in use


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
    return run_catalog(
        source,
        destination,
        settings,
        fail_on_error=args.fail_on_error,
        run_id=args.run_id,
        wait=args.wait,
    )


def run_catalog(
    source: str,
    destination: str,
    settings: Settings,
    fail_on_error: bool = False,
    run_id: str | None = None,
    wait: bool = False,
) -> int:
    """Run the flow with ``settings``. Exit code 0 when every track is done, 1 when any failed
    or was left (a stop, the time limit), 3 when another run holds DST. The separation options
    and the cluster's settings are also passed as parameters (credentials aside, see
    :mod:`pipeline.commands.launch`), so that the run's page in Prefect shows them."""
    storage_options = settings.options()
    try:  # before the flow starts: one line for what an operator must fix
        resolve_weights(settings.checkpoint, settings)
        check_destination(destination, storage_options)
        check_source(source, storage_options)
        holder = current_holder(destination, storage_options)
    except (CheckpointError, CatalogError) as error:
        raise UsageError(str(error)) from None
    alive = holder is not None and not holder.is_dead_here()
    if alive and holder.silent_s <= STALE_AFTER_SECONDS and not wait:
        return _busy(f"{destination} is in use: {holder.describe()}")
    try:
        summary = launch.separate_catalog(
            settings,
            source,
            destination,
            options=settings.separation(),
            **launch.cluster_parameters(settings),
            fail_on_error=fail_on_error,
            run_id=run_id,
            stall_timeout=settings.stall_timeout,
            timeout=settings.timeout,
            wait=wait,
        )
    except LeaseHeld as error:  # taken between the check and the flow's own try
        return _busy(str(error))
    print(format_summary(summary))
    print(f"summary: {summary['summary_uri']}")
    tracks = summary["tracks"]
    return 1 if tracks["error"] or tracks["not_processed"] else 0


def _busy(message: str) -> int:
    print(f"metasep separate: {message} (wait for it with --wait)", file=sys.stderr)
    return BUSY
