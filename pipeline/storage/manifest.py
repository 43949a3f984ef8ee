"""Parquet manifests: one row per processed track, the record of what is done.

A run writes ``DST/manifest/run=<run_id>/part-<n>.parquet`` files as it goes, each written whole
or not at all, and only after the stems it points at are in place. So a track is done exactly when
a row says so, and a run killed at any moment loses at most the rows not yet flushed.
"""

from __future__ import annotations

import io
import logging
import posixpath
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.storage.location import read_bytes, retry_storage, write_bytes

log = logging.getLogger(__name__)

_TIME = pa.timestamp("us", tz="UTC")
MANIFEST_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("track_id", pa.string()),
        ("source_uri", pa.string()),
        ("source_size", pa.int64()),
        ("source_version", pa.string()),
        ("status", pa.string()),  # "ok" or "error"
        ("error", pa.string()),
        ("duration_s", pa.float64()),
        ("sample_rate", pa.int32()),
        ("channels", pa.int32()),
        ("gain_db", pa.float64()),  # the stems' level change, < 0 where they would have clipped
        ("drums_uri", pa.string()),
        ("bass_uri", pa.string()),
        ("other_uri", pa.string()),
        ("vocals_uri", pa.string()),
        ("model_id", pa.string()),
        ("options_hash", pa.string()),
        ("precision", pa.string()),  # what the worker ran ("auto" made concrete for its device)
        ("started_at", _TIME),
        ("finished_at", _TIME),
        ("worker", pa.string()),
        ("model_seconds", pa.float64()),  # time the worker's model spent on this track
    ]
)


@dataclass(frozen=True)
class DoneRecord:
    """What the last ``ok`` row of a track says it was made from."""

    source_version: str
    model_id: str
    options_hash: str


def new_run_id() -> str:
    """A sortable, unique run name: UTC time plus a random suffix."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def manifest_root(destination: str) -> str:
    return posixpath.join(destination, "manifest")


def read_manifests(fs, destination: str, schema: pa.Schema = MANIFEST_SCHEMA) -> pa.Table:
    """Every manifest row ever written under ``destination`` (an empty table if none).

    ``schema`` is the manifest's kind: the separation's by default, the evaluation's for an
    evaluation destination (the same layout, other columns)."""
    pattern = posixpath.join(manifest_root(destination), "run=*", "*.parquet")
    fs.invalidate_cache()
    paths = sorted(retry_storage(lambda: fs.glob(pattern), f"listing {pattern}"))

    def read(path: str) -> pa.Table | None:
        try:
            table = pq.read_table(io.BytesIO(read_bytes(fs, path)))
        except (pa.ArrowInvalid, OSError) as error:
            log.warning("ignoring unreadable manifest %s: %s", path, error)
            return None
        return table.select([n for n in schema.names if n in table.column_names])

    with ThreadPoolExecutor(max_workers=16) as pool:
        tables = [table for table in pool.map(read, paths) if table is not None]
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables, promote_options="permissive")


def latest_ok_rows(manifests: pa.Table, key: tuple[str, ...] = ("track_id",)) -> dict:
    """Per ``key`` value (one column: the value; several: a tuple), the most recent ``ok`` row."""
    rows = manifests.filter(pc.equal(manifests["status"], "ok")).to_pylist()
    rows.sort(key=lambda row: row["finished_at"] or datetime.min.replace(tzinfo=UTC))
    if len(key) == 1:
        return {row[key[0]]: row for row in rows}
    return {tuple(row[name] for name in key): row for row in rows}


def done_records(manifests: pa.Table) -> dict[str, DoneRecord]:
    """Per track, what its most recent ``ok`` row was made from."""
    return {
        track_id: DoneRecord(row["source_version"], row["model_id"], row["options_hash"])
        for track_id, row in latest_ok_rows(manifests).items()
    }


class ManifestWriter:
    """Buffers rows and writes them as Parquet parts of one run: every ``flush_rows`` rows, at
    least every ``flush_seconds`` seconds (a background timer), and on :meth:`close`."""

    def __init__(
        self,
        fs,
        destination: str,
        run_id: str,
        flush_rows: int = 256,
        flush_seconds: float = 10.0,
        schema: pa.Schema = MANIFEST_SCHEMA,
    ) -> None:
        self.fs = fs
        self.schema = schema
        self.folder = posixpath.join(manifest_root(destination), f"run={run_id}")
        self.flush_rows = flush_rows
        self.rows: list[dict[str, Any]] = []
        self.parts: list[str] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._timer = threading.Thread(target=self._flush_every, args=(flush_seconds,), daemon=True)
        self._timer.start()

    def add(self, row: dict[str, Any]) -> None:
        with self._lock:
            self.rows.append(row)
            if len(self.rows) >= self.flush_rows:
                self._write_part()

    def flush(self) -> None:
        """Write the buffered rows as the next part file (atomically)."""
        with self._lock:
            self._write_part()

    def close(self) -> None:
        self._closed.set()
        self._timer.join()
        self.flush()

    def _flush_every(self, seconds: float) -> None:
        while not self._closed.wait(seconds):
            try:
                self.flush()
            except OSError as error:  # the next flush (or close) tries again with these rows
                log.warning("manifest flush failed, will retry: %s", error)

    def _write_part(self) -> None:
        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        path = posixpath.join(self.folder, f"part-{len(self.parts):05d}.parquet")
        write_bytes(self.fs, path, buffer.getvalue())
        self.parts.append(path)
        self.rows = []
