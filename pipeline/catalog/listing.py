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
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.runtime import release_arrow_memory
from pipeline.storage.errors import CatalogError
from pipeline.storage.files import AUDIO_EXTENSIONS, is_audio_name, source_version
from pipeline.storage.location import full_url, open_location, read_bytes, retry_storage
from pipeline.storage.paths import sanitized_key, short_hash

MANIFEST_EXTENSIONS = frozenset({".txt", ".csv", ".parquet"})
_GLOB_CHARACTERS = "*?["
# One row per audio file of the catalog. track_id: the path relative to SOURCE, '/'-separated, as
# the store spells it; source_uri: the full URL (or local path) to read it from; source_version:
# ETag, generation or modification time, which changes when the file does; output_key: the
# sanitised, unique folder of its stems under DST/stems/.
TRACK_SCHEMA = pa.schema(
    [
        ("track_id", pa.string()),
        ("source_uri", pa.string()),
        ("source_size", pa.int64()),
        ("source_version", pa.string()),
        ("output_key", pa.string()),
    ]
)
_CHUNK = 1 << 16  # listing entries gathered into one Arrow batch
# (track_id, source_uri, source_size, source_version) of one audio file, as a listing yields it
Entry = tuple[str, str, int, str]


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
) -> pa.Table:
    """Every audio file of ``source`` (:data:`TRACK_SCHEMA`, sorted by ``track_id``); files
    under ``exclude`` (the destination, when it lies inside the source) are left out, or a run
    would list its own stems as new tracks. Folders and prefixes are listed as a stream (a
    million files never sit in memory as Python objects)."""
    source = str(source)
    table = listing_table(_entries(source, storage_options, exclude))
    if not table.num_rows:
        raise CatalogError(
            f"{source}: no audio files (looked for {', '.join(sorted(AUDIO_EXTENSIONS))})"
        )
    return table


def has_audio(source: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``source`` holds at least one audio file (it stops at the first one found)."""
    return next(_entries(str(source), storage_options, None), None) is not None


def listing_table(entries: Iterable[Entry]) -> pa.Table:
    """The listing of a catalog from its entries, in Arrow: sorted by ``track_id``, one row per
    track (the first entry of a repeated one), each with its output folder (unique: the few that
    two tracks would share get hash suffixes). Built a chunk at a time, so that a million entries
    never exist as Python objects at once."""
    batches, chunk = [], []
    for entry in entries:
        chunk.append(entry)
        if len(chunk) == _CHUNK:
            batches.append(_batch(chunk))
            chunk = []
    batches.append(_batch(chunk))
    table = pa.Table.from_batches(batches, schema=TRACK_SCHEMA).sort_by("track_id")
    del batches, chunk
    ids = table["track_id"]
    repeated = pc.equal(ids.slice(1), ids.slice(0, max(0, table.num_rows - 1)))
    if pc.any(repeated).as_py():  # a track_id listed twice (a list naming a file twice): the first
        keep = pa.concat_arrays([pa.array([True]), pc.invert(repeated).combine_chunks()])
        table = table.filter(keep)
    table = _unique_keys(table)
    release_arrow_memory()
    return table


def _batch(entries: list[Entry]) -> pa.RecordBatch:
    """Listing entries as one Arrow batch, each with its sanitised output folder."""
    columns = list(zip(*entries, strict=True)) if entries else [()] * 4
    keys = [sanitized_key(track_id) for track_id in columns[0]]
    arrays = [
        pa.array(column, field.type)
        for column, field in zip([*columns, keys], TRACK_SCHEMA, strict=True)
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=TRACK_SCHEMA)


def _unique_keys(table: pa.Table) -> pa.Table:
    """The listing with every output folder that two tracks would share (``a.wav`` and
    ``a.flac``) suffixed with a hash of its track_id (only those rows leave Arrow)."""
    keys = table["output_key"].combine_chunks()
    counts = pc.value_counts(keys)
    shared = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    if not len(shared):
        return table
    clash = pc.is_in(keys, value_set=shared)
    rows = table.filter(clash)
    suffixed = [
        f"{key}-{short_hash(track_id)}"
        for key, track_id in zip(
            rows["output_key"].to_pylist(), rows["track_id"].to_pylist(), strict=True
        )
    ]
    keys = pc.replace_with_mask(keys, clash, pa.array(suffixed, pa.string()))
    return table.set_column(4, "output_key", keys)


def _entries(
    source: str, storage_options: dict[str, Any] | None, exclude: str | None
) -> Iterator[Entry]:
    """The audio files of ``source`` as listing entries, outside ``exclude``."""
    fs, path = open_location(source, storage_options)
    excluded = _excluded_prefix(fs, exclude, storage_options)
    fs.invalidate_cache()  # fsspec keeps listings per filesystem instance; a catalog changes
    kind = _kind(fs, path, source)
    if kind == "folder":
        found = walk_files(fs, path, source)
    elif kind == "glob":
        base = path[: min(path.find(c) for c in _GLOB_CHARACTERS if c in path)]
        base = base.rsplit("/", 1)[0] if "/" in base else ""
        entries = retry_storage(lambda: fs.glob(path, detail=True), f"listing {source}")
        found = ((_relative(name, base), info) for name, info in entries.items())
    elif kind == "file" and posixpath.splitext(path)[1].lower() in MANIFEST_EXTENSIONS:
        found = iter(_manifest_entries(fs, path, source, storage_options))
    else:
        raise CatalogError(f"{source}: no such folder, prefix, glob or manifest of URIs")
    for track_id, info in found:
        if (
            info.get("type", "file") == "file"
            and is_audio_name(track_id)
            and not (excluded and info["name"].startswith(excluded))
        ):
            uri = info.get("uri") or full_url(fs, info["name"])
            yield track_id, uri, int(info.get("size") or 0), source_version(info)


def walk_files(fs, path: str, source: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every file below ``path`` with its info, as a stream where the store allows: a local
    folder walked with ``scandir``, an S3 prefix a page at a time; elsewhere ``find``."""
    if isinstance(fs, LocalFileSystem):
        yield from _walk_local(path)
    elif type(fs).__name__ == "S3FileSystem":
        yield from _walk_s3(fs, path, source)
    else:
        entries = retry_storage(lambda: fs.find(path, detail=True), f"listing {source}")
        yield from ((_relative(name, path), info) for name, info in entries.items())


def _walk_local(root: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Files below a local folder (symbolic links followed, as fsspec's ``find`` does), with
    the size and modification time fsspec's ``info`` gives."""
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_dir():
                        folders.append(entry.path)
                    elif entry.is_file():
                        stat = entry.stat()
                        info = {"name": entry.path, "size": stat.st_size, "mtime": stat.st_mtime}
                        yield _relative(entry.path, root), info
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed while we listed


def _walk_s3(fs, path: str, source: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Objects below an S3 prefix, a page (1,000 keys) at a time, each request retried."""
    from fsspec.asyn import sync

    bucket, _, prefix = path.partition("/")
    request = {"Bucket": bucket, "Prefix": f"{prefix}/" if prefix else ""}
    while True:
        page = retry_storage(
            lambda: sync(fs.loop, fs._call_s3, "list_objects_v2", **request),
            f"listing {source}",
        )
        for item in page.get("Contents", []):
            name = f"{bucket}/{item['Key']}"
            info = {"name": name, "size": item["Size"], "ETag": item.get("ETag"), "type": "file"}
            yield _relative(name, path), info
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


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
