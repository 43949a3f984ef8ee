"""Listing a catalog: which audio files a SOURCE holds, with the size and version of each.

SOURCE is a folder or prefix (listed recursively), a glob (``s3://bucket/music/**/*.flac``) or a
manifest of URIs (a ``.txt`` file with one URI per line, or a ``.csv``/``.parquet`` file with a
``uri`` column). A track's ``track_id`` is its path relative to SOURCE (for a manifest: relative
to the manifest's folder, else the URI without its protocol); it names the track in manifests and
decides where its stems go.
"""

from __future__ import annotations

import io
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.storage.errors import CatalogError
from pipeline.storage.files import AUDIO_EXTENSIONS, is_audio_name, source_version
from pipeline.storage.location import full_url, open_location, read_bytes, retry_storage
from pipeline.storage.paths import assign_output_keys

MANIFEST_EXTENSIONS = frozenset({".txt", ".csv", ".parquet"})
_GLOB_CHARACTERS = "*?["


@dataclass(frozen=True)
class CatalogTrack:
    """One audio file of the catalog."""

    track_id: str  # path relative to SOURCE, '/'-separated, as the store spells it
    source_uri: str  # full URL (or local path) to read it from
    source_size: int  # bytes
    source_version: str  # ETag, generation or modification time: changes when the file does
    output_key: str  # sanitised, unique relative folder of its stems under DST/stems/


def is_catalog_source(source: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``source`` is a catalog (folder, prefix, glob, manifest) rather than one file.

    What exists wins over what the name looks like: ``song [live].wav`` is a file, not a glob.
    """
    fs, path = open_location(source, storage_options)
    kind = _kind(fs, path, str(source))
    if kind == "missing" and is_audio_name(path):
        return False  # a missing audio file: the file path says "no such file" at once
    return kind != "file" or posixpath.splitext(path)[1].lower() in MANIFEST_EXTENSIONS


def _kind(fs, path: str, source: str) -> str:
    """``"folder"``, ``"file"``, ``"glob"`` or ``"missing"``."""
    if retry_storage(lambda: fs.isdir(path), f"checking {source}"):
        return "folder"
    if retry_storage(lambda: fs.isfile(path), f"checking {source}"):
        return "file"
    return "glob" if any(c in source for c in _GLOB_CHARACTERS) else "missing"


def list_catalog(
    source: str, storage_options: dict[str, Any] | None = None, exclude: str | None = None
) -> list[CatalogTrack]:
    """Every audio file of ``source``, sorted by ``track_id``; files under ``exclude`` (the
    destination, when it lies inside the source) are left out, or a run would list its own
    stems as new tracks."""
    source = str(source)
    fs, path = open_location(source, storage_options)
    excluded = _excluded_prefix(fs, exclude, storage_options)
    fs.invalidate_cache()  # fsspec keeps listings per filesystem instance; a catalog changes
    kind = _kind(fs, path, source)
    if kind == "folder":
        entries = retry_storage(lambda: fs.find(path, detail=True), f"listing {source}")
        found = [(_relative(name, path), info) for name, info in entries.items()]
    elif kind == "glob":
        base = path[: min(path.find(c) for c in _GLOB_CHARACTERS if c in path)]
        base = base.rsplit("/", 1)[0] if "/" in base else ""
        entries = retry_storage(lambda: fs.glob(path, detail=True), f"listing {source}")
        found = [(_relative(name, base), info) for name, info in entries.items()]
    elif kind == "file" and posixpath.splitext(path)[1].lower() in MANIFEST_EXTENSIONS:
        found = _manifest_entries(fs, path, source, storage_options)
    else:
        raise CatalogError(f"{source}: no such folder, prefix, glob or manifest of URIs")
    infos = {
        track_id: info
        for track_id, info in found
        if info.get("type", "file") == "file"
        and is_audio_name(track_id)
        and not (excluded and info["name"].startswith(excluded))
    }
    if not infos:
        raise CatalogError(
            f"{source}: no audio files (looked for {', '.join(sorted(AUDIO_EXTENSIONS))})"
        )
    keys = assign_output_keys(list(infos))
    return [
        CatalogTrack(
            track_id=track_id,
            source_uri=info.get("uri") or full_url(fs, info["name"]),
            source_size=int(info.get("size") or 0),
            source_version=source_version(info),
            output_key=keys[track_id],
        )
        for track_id, info in sorted(infos.items())
    ]


def _excluded_prefix(fs, exclude: str | None, storage_options: dict[str, Any] | None) -> str:
    """``exclude`` as a path prefix on ``fs``, or '' when it lies on another file system."""
    if not exclude:
        return ""
    other_fs, other_path = open_location(exclude, storage_options)
    if type(other_fs) is not type(fs):
        return ""
    if isinstance(fs, LocalFileSystem):
        other_path = os.path.realpath(other_path)
    return other_path.rstrip("/") + "/"


def _relative(name: str, base: str) -> str:
    """``name`` below ``base`` as the store spells it: plain slicing, no normalisation, so that
    a key such as ``a/../b`` keeps its ``..`` (sanitised later, never resolved)."""
    prefix = base.rstrip("/") + "/" if base else ""
    return name[len(prefix) :] if prefix and name.startswith(prefix) else name.lstrip("/")


def _manifest_entries(
    fs, path: str, source: str, storage_options: dict[str, Any] | None
) -> list[tuple[str, dict[str, Any]]]:
    """The URIs a manifest file lists, each with its object's info (size, version)."""
    try:
        uris = _read_uri_list(fs, path)
    except FileNotFoundError:
        raise CatalogError(f"{source}: no such manifest") from None
    folder = posixpath.dirname(path)

    def locate(uri: str) -> tuple[str, dict[str, Any]]:
        if "://" not in uri and not uri.startswith("/"):
            uri = posixpath.join(folder, uri)
        entry_fs, entry_path = open_location(uri, storage_options)
        try:
            info = retry_storage(lambda: entry_fs.info(entry_path), f"reading {uri}")
        except FileNotFoundError:
            info = {"name": entry_path, "size": 0, "type": "file", "missing": True}
        return _relative(entry_path, folder), {
            **info,
            "name": entry_path,
            "uri": full_url(entry_fs, entry_path),
        }

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(locate, dict.fromkeys(uris)))


def _read_uri_list(fs, path: str) -> list[str]:
    data = read_bytes(fs, path)
    extension = posixpath.splitext(path)[1].lower()
    if extension == ".txt":
        lines = (line.strip() for line in data.decode("utf-8").splitlines())
        return [line for line in lines if line and not line.startswith("#")]
    table = (
        pq.read_table(io.BytesIO(data))
        if extension == ".parquet"
        else pacsv.read_csv(io.BytesIO(data))
    )
    column = next((c for c in ("uri", "source_uri", "path") if c in table.column_names), None)
    if column is None:
        raise CatalogError(f"{path}: a manifest of URIs needs a 'uri' column")
    return [str(uri) for uri in table.column(column).to_pylist() if uri]
