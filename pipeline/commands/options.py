"""Command-line options that several commands share: cluster and catalog options, and the help
text that names a setting's environment variable."""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable
from typing import Any, TypeVar

from pipeline.commands import UsageError
from pipeline.settings import FLAGS, Settings, env_name

T = TypeVar("T")


def argument_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse ``type`` from a parser that raises ``ValueError`` (those of
    :mod:`pipeline.stems`): argparse prints only "invalid value" for a ``ValueError``, and the
    parser's own message for an ``ArgumentTypeError``."""

    @functools.wraps(parse)
    def checked(text: str) -> T:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return checked


def setting_help(name: str, text: str | None = None) -> str:
    """A flag's help that names the environment variable behind its default."""
    field = Settings.model_fields[name]
    return f"{text or field.description} (env {env_name(name)})"


# The flags of the separation settings (pipeline.settings), in help order: flag -> type, metavar
_SEPARATION_FLAGS = {
    "checkpoint": (str, "NAME|FILE"),
    "device": (str, "DEVICE"),
    "precision": (str, "NAME"),
    "stem_format": (str, "FORMAT"),
    "segment": (float, "S"),
    "context": (float, "S"),
    "batch_size": (int, "N"),
    "tracks_per_call": (int, "N"),
}


def add_separation_arguments(
    parser: argparse.ArgumentParser, names: tuple[str, ...] = tuple(_SEPARATION_FLAGS)
) -> None:
    """Flags for the separation settings ``names`` (all by default). Each defaults to its
    ``METASEP_*`` variable, then to the setting's default, and is checked with the settings
    (one line per bad value, before anything starts), not by argparse."""
    for name in names:
        kind, metavar = _SEPARATION_FLAGS[name]
        flag = FLAGS.get(name, "--" + name.replace("_", "-"))
        parser.add_argument(flag, dest=name, type=kind, metavar=metavar, help=setting_help(name))


def at_least_one(values: dict[str, int | None]) -> None:
    """Refuse, as a usage error, any given count (flag -> value) below 1."""
    for flag, value in values.items():
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be 1 or more, not {value}")


def add_storage_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, text: str
) -> None:
    """``--storage-options JSON``: fsspec options over ``METASEP_STORAGE_OPTIONS``."""
    parser.add_argument(
        "--storage-options",
        type=json_object,
        metavar="JSON",
        help=setting_help("storage_options", text),
    )


def json_object(text: str) -> dict[str, Any]:
    """An argparse type: a JSON object (storage options, say)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def add_cluster_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--ray-address`` and ``--storage-options``, shared by every command that runs a flow."""
    parser.add_argument(
        "--ray-address",
        help=setting_help("ray_address", "existing Ray cluster (default: RAY_ADDRESS or local)"),
    )
    add_storage_options(parser, 'fsspec options, e.g. \'{"endpoint_url": "http://minio:9000"}\'')


def add_catalog_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that only a catalog run of ``metasep separate`` has."""
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
    group.add_argument(
        "--stall-timeout", type=float, metavar="S", help=setting_help("stall_timeout")
    )
    group.add_argument("--timeout", type=float, metavar="S", help=setting_help("timeout"))
    group.add_argument(
        "--wait",
        action="store_true",
        help="wait while another run holds DST (default: say who holds it and exit with code 3)",
    )
