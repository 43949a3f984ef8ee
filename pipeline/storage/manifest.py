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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.periodic import Periodic
from pipeline.runtime import release_arrow_memory
from pipeline.storage.errors import readable_error
from pipeline.storage.journal import Journal
from pipeline.storage.location import StorageError, read_bytes, retry_storage, write_bytes

log = logging.getLogger(__name__)

_TIME = pa.timestamp("us", tz="UTC")
QUARANTINE = "_quarantine"  # manifest parts that could not be read, moved aside
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
        ("residual_db", pa.float64()),  # mixture minus the stems' sum, against the mixture
        ("flags", pa.list_(pa.string())),  # what to listen to: pipeline.catalog.quality
        ("tags", pa.map_(pa.string(), pa.string())),  # the source's title, artist... (and stems')
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


def new_run_id() -> str:
    """A sortable, unique run name: UTC time plus a random suffix."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def manifest_root(destination: str) -> str:
    return posixpath.join(destination, "manifest")


def read_manifests(
    fs,
    destination: str,
    schema: pa.Schema = MANIFEST_SCHEMA,
    columns: Sequence[str] | None = None,
    on_unreadable: Callable[[str, Exception], None] | None = None,
) -> pa.Table:
    """Every manifest row ever written under ``destination`` (an empty table if none).

    ``schema`` is the manifest's kind: the separation's by default, the evaluation's for an
    evaluation destination (the same layout, other columns). ``columns`` reads only those (a
    planner over a million rows needs five). A part that cannot be read (truncated, not
    Parquet) is skipped with a warning, or handed to ``on_unreadable(path, error)``."""
    pattern = posixpath.join(manifest_root(destination), "run=*", "*.parquet")
    fs.invalidate_cache()
    paths = sorted(retry_storage(lambda: fs.glob(pattern), f"listing {pattern}"))
    wanted = [name for name in schema.names if columns is None or name in columns]

    def read(path: str) -> pa.Table | None:
        try:
            part = pq.ParquetFile(io.BytesIO(read_bytes(fs, path)))
            present = [name for name in wanted if name in part.schema_arrow.names]
            return part.read(columns=present)
        except (pa.ArrowInvalid, OSError) as error:
            if on_unreadable is None:
                log.warning("ignoring unreadable manifest %s: %s", path, error)
            else:
                on_unreadable(path, error)
            return None

    with ThreadPoolExecutor(max_workers=16) as pool:
        tables = [table for table in pool.map(read, paths) if table is not None]
    empty = pa.schema([schema.field(name) for name in wanted]).empty_table()
    if not tables:
        return empty
    return pa.concat_tables([empty, *tables], promote_options="permissive")


def quarantine_part(fs, destination: str, path: str) -> str:
    """Move an unreadable manifest part aside, to ``manifest/_quarantine/`` (which readers,
    ``pyarrow.dataset`` included, skip: its name starts with ``_``); returns where it went."""
    root = manifest_root(destination)
    target = posixpath.join(root, QUARANTINE, posixpath.relpath(path, root))
    fs.makedirs(posixpath.dirname(target), exist_ok=True)  # a local disk's folders; no-op on S3
    retry_storage(lambda: fs.mv(path, target), f"moving {path} aside")
    return target


def latest_ok_rows(manifests: pa.Table, key: tuple[str, ...] = ("track_id",)) -> dict:
    """Per ``key`` value (one column: the value; several: a tuple), the most recent ``ok`` row."""
    rows = manifests.filter(pc.equal(manifests["status"], "ok")).to_pylist()
    rows.sort(key=lambda row: row["finished_at"] or datetime.min.replace(tzinfo=UTC))
    if len(key) == 1:
        return {row[key[0]]: row for row in rows}
    return {tuple(row[name] for name in key): row for row in rows}


# The columns a planner reads: what made each track's last ok row
DONE_COLUMNS = ("track_id", "status", "source_version", "model_id", "options_hash", "finished_at")


def latest_done(manifests: pa.Table) -> pa.Table:
    """Per track, what its most recent ``ok`` row was made from: ``track_id``,
    ``source_version``, ``model_id``, ``options_hash`` (columnar, for a planner: sorted by track
    and time, the last row of each track is kept; no hash table over a million tracks)."""
    named = ["track_id", "source_version", "model_id", "options_hash"]
    ok = manifests.filter(pc.equal(manifests["status"], "ok"))
    ok = ok.select([*named, "finished_at"]).sort_by(
        [("track_id", "ascending"), ("finished_at", "ascending")]
    )
    if ok.num_rows < 2:
        return ok.select(named)
    ids = ok["track_id"]
    last = pc.not_equal(ids.slice(0, ok.num_rows - 1), ids.slice(1)).combine_chunks()
    done = ok.select(named).filter(pa.concat_arrays([last, pa.array([True])]))
    release_arrow_memory()
    return done


class ManifestWriter:
    """Buffers rows and writes them as Parquet parts of one run: every ``flush_rows`` rows, at
    least every ``flush_seconds`` seconds (a background timer, stopped by :meth:`close`), and on
    :meth:`close`.

    A part the store does not take (after the storage layer's own retries: down, full,
    read-only, any error) goes to the ``journal`` on this machine instead, and every later flush
    tries to publish the journal first: rows are never held only in memory for longer than a
    flush interval, whatever the store does. Without a journal the error is raised."""

    def __init__(
        self,
        fs,
        destination: str,
        run_id: str,
        flush_rows: int = 256,
        flush_seconds: float = 10.0,
        schema: pa.Schema = MANIFEST_SCHEMA,
        journal: Journal | None = None,
    ) -> None:
        self.fs = fs
        self.schema = schema
        self.root = destination
        self.folder = posixpath.join(manifest_root(destination), f"run={run_id}")
        self.flush_rows = flush_rows
        self.rows: list[dict[str, Any]] = []
        self.parts: list[str] = []  # where each part is: the destination, or the journal
        self.journal = journal
        self._count = 0
        self._lock = threading.Lock()
        self._timer = Periodic(flush_seconds, self.flush, "manifest").start()

    @property
    def journaled(self) -> int:
        """Files of this destination waiting in the journal (0 without a journal)."""
        return len(self.journal.pending()) if self.journal is not None else 0

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
        """Stop the timer, then write what is left (to the journal if the store is down)."""
        self._timer.stop()
        self.flush()

    def _write_part(self) -> None:
        store_takes = self._publish_journal()
        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        path = posixpath.join(self.folder, f"part-{self._count:05d}.parquet")
        try:
            if not store_takes:  # the journal's older parts go first: keep the order
                raise StorageError("earlier parts are still waiting in the journal")
            write_bytes(self.fs, path, buffer.getvalue())
        except Exception as error:
            if self.journal is None:
                raise
            kept = self.journal.keep(posixpath.relpath(path, self.root), buffer.getvalue())
            log.warning(
                "%d manifest row(s) kept in %s (the destination did not take them: %s); "
                "published when it does",
                len(self.rows),
                kept,
                readable_error(error),
            )
            path = str(kept)
        self.parts.append(path)
        self._count += 1
        self.rows = []

    def _publish_journal(self) -> bool:
        """Publish the journal's waiting files; whether the destination took all of them."""
        if self.journal is None or not self.journal.pending():
            return True
        try:
            self.journal.publish()
        except Exception as error:
            log.debug("journal not published yet: %s", error)
            return False
        return True
