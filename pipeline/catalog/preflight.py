"""Checks before a catalog run starts anything: the destination takes a write, the source holds
audio, and a local destination has room for the next tracks.

Each failure is one line an operator can act on (:class:`CatalogError`), found before Ray, the
model or the listing of a whole library are started.
"""

from __future__ import annotations

import posixpath
import shutil
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from fsspec.implementations.local import LocalFileSystem

from pipeline.catalog.listing import has_audio
from pipeline.storage.errors import CatalogError, readable_error, storage_problem
from pipeline.storage.location import full_url, open_location, retry_storage, write_bytes

# Room a track's four stems take on the destination's disk, against the source file's size
# (24-bit FLAC stems of a 16-bit WAV source: about 3.6 times; of a lossy source: more). An
# estimate for a warning before the work, not a promise: a full disk mid-run still stops cleanly.
STEMS_PER_SOURCE_BYTE = 6
_MARGIN = 2**20  # manifest parts, the lease, the summary


def check_destination(destination: str, storage_options: dict[str, Any] | None) -> None:
    """Write and delete a probe object in ``destination``, or raise a one-line CatalogError
    (read-only, permission, full, unreachable, credentials)."""
    fs, root = open_location(destination, storage_options)
    probe = posixpath.join(root, f".metasep-probe-{uuid.uuid4().hex}")
    try:
        write_bytes(fs, probe, b"metasep: can this destination be written?\n", quiet=True)
        retry_storage(lambda: fs.rm_file(probe), f"removing {probe}", quiet=True)
    except Exception as error:
        raise CatalogError(_refusal(full_url(fs, root), "cannot write", error)) from None


def check_source(source: str, storage_options: dict[str, Any] | None) -> None:
    """Raise a one-line CatalogError unless ``source`` can be listed and holds audio."""
    try:
        found = has_audio(source, storage_options)
    except CatalogError:
        raise
    except Exception as error:
        raise CatalogError(_refusal(source, "cannot list", error)) from None
    if not found:
        raise CatalogError(f"{source}: no audio files")


def room_problem(destination: str, storage_options: dict[str, Any] | None, todo: pa.Table) -> str:
    """Why a local destination cannot take the stems of the first tracks of ``todo`` (its disk's
    free space against their estimated size), or '' when it can (or is not local)."""
    fs, root = open_location(destination, storage_options)
    if not isinstance(fs, LocalFileSystem) or not todo.num_rows:
        return ""
    free = shutil.disk_usage(root).free
    sizes = pc.sum(todo["source_size"]).as_py() or 0
    need = STEMS_PER_SOURCE_BYTE * sizes + _MARGIN
    if free >= need:
        return ""
    return (
        f"{root} has {free / 2**20:.0f} MB free; the {todo.num_rows} track(s) to separate need "
        f"about {need / 2**20:.0f} MB"
    )


def _refusal(location: str, doing: str, error: BaseException) -> str:
    problem = storage_problem(error)
    return (
        f"{location}: {doing} ({problem}: {readable_error(error)})"
        if problem
        else (f"{location}: {doing} ({readable_error(error)})")
    )
