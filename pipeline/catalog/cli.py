"""``metasep separate SRC DST`` for catalogs: the command-line face of the Prefect flow.

``pipeline/commands/separate.py`` hands over here when SRC is a folder, prefix, glob or manifest
of URIs. This is the one place where ``pipeline`` reaches up into ``flows``: the command is the
entry point that starts the flow, so the import happens only when a catalog is run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

from model import STEMS, CheckpointError
from pipeline.catalog.job import STEM_FORMATS
from pipeline.catalog.listing import CatalogError, is_catalog_source
from pipeline.settings import Settings, env_name, use_settings
from pipeline.weights import resolve_weights


def add_catalog_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that only a catalog run has."""
    group = parser.add_argument_group("catalogs (SRC a folder, prefix, glob or list of URIs)")
    group.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help=setting_help("workers", "model workers (default: one per GPU, or CPUs-1)"),
    )
    group.add_argument(
        "--gpus-per-worker", type=float, metavar="G", help=setting_help("gpus_per_worker")
    )
    group.add_argument(
        "--cpus-per-worker", type=float, metavar="C", help=setting_help("cpus_per_worker")
    )
    add_cluster_arguments(group)
    group.add_argument(
        "--fail-on-error", action="store_true", help="stop at the first track that fails"
    )
    group.add_argument("--run-id", help="name of the run (default: UTC time and a random suffix)")


def add_cluster_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--ray-address`` and ``--storage-options``, shared by every command that runs a flow."""
    parser.add_argument(
        "--ray-address",
        help=setting_help("ray_address", "existing Ray cluster (default: RAY_ADDRESS or local)"),
    )
    parser.add_argument(
        "--storage-options",
        type=json_object,
        metavar="JSON",
        help=setting_help(
            "storage_options", 'fsspec options, e.g. \'{"endpoint_url": "http://minio:9000"}\''
        ),
    )


def setting_help(name: str, text: str | None = None) -> str:
    """A flag's help that names the environment variable behind its default."""
    field = Settings.model_fields[name]
    return f"{text or field.description} (env {env_name(name)})"


def prepare_prefect() -> None:
    """Settings for a command that runs a flow; call it before the flow's module is imported
    (Prefect reads its settings then). Gives the ephemeral API more than its default 20 s to
    start on a busy machine, turns off its analytics, and keeps the per-request lines of its HTTP
    client out of the command's output."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    logging.getLogger("httpx").setLevel(logging.WARNING)


def wants_catalog(sources: list[str], storage_options: dict[str, Any] | None) -> bool:
    """Whether ``metasep separate`` was given a catalog SRC (then maybe DST), not audio files."""
    return 1 <= len(sources) <= 2 and is_catalog_source(sources[0], storage_options)


def run_separate_command(args: argparse.Namespace, settings: Settings) -> int:
    """``metasep separate SRC [DST]`` with a catalog SRC: DST is the second argument, else
    ``--out``. Options that shape single-file outputs do not apply and are refused."""
    from pipeline.cli import UsageError

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
    )


def run_catalog(
    source: str,
    destination: str,
    settings: Settings,
    separator_options: dict[str, Any] | None = None,
    fail_on_error: bool = False,
    run_id: str | None = None,
) -> int:
    """Run the flow with ``settings``; exit code 0 when every track is done, 1 when any failed
    or was left.

    The settings reach the flow through :func:`use_settings`, not as flow parameters: storage
    options may hold credentials, and Prefect records parameters. The other settings are also
    passed as parameters, so that the run's page in Prefect shows them.
    """
    from pipeline.catalog.summary import format_summary
    from pipeline.cli import UsageError

    if settings.stem_format not in STEM_FORMATS:
        raise UsageError(f"stem format must be one of {', '.join(STEM_FORMATS)}")
    try:  # before the flow starts: a typo, or named weights fetched here, on the driver
        resolve_weights(settings.checkpoint, settings)
    except CheckpointError as error:
        raise UsageError(str(error)) from None
    if settings.workers is not None and settings.workers < 1:
        raise UsageError(f"--workers must be 1 or more, not {settings.workers}")
    prepare_prefect()
    from flows.separate import separate_catalog

    try:
        with use_settings(settings):
            summary = separate_catalog(
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
            )
    except CatalogError as error:
        raise UsageError(str(error)) from None
    print(format_summary(summary))
    print(f"summary: {summary['summary_uri']}")
    tracks = summary["tracks"]
    return 1 if tracks["error"] or tracks["not_processed"] else 0


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value
