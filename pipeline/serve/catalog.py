"""The tracks of a separated catalog (``metasep separate SRC DST``) that the page can open.

A track is listed when its most recent manifest row is ``ok`` and all four of its stems lie under
``DST/stems/``; a row that points elsewhere is ignored (the manifest is data, not a licence to read
any file). Local stems are read where they are; stems in object storage are copied into the job's
folder when the track is opened.
"""

from __future__ import annotations

import logging
import posixpath
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from fsspec.implementations.local import LocalFileSystem

from model import STEMS
from pipeline.storage.location import open_location, retry_storage
from pipeline.storage.manifest import read_manifests
from pipeline.storage.paths import short_hash

log = logging.getLogger(__name__)
REFRESH_SECONDS = 30.0  # manifests are read again at most this often


@dataclass(frozen=True)
class CatalogTrack:
    key: str  # a short hash of track_id: what the page sends back
    track_id: str
    duration_s: float
    sample_rate: int
    channels: int
    stems: dict[str, str]  # protocol-less paths in the catalog's filesystem

    def describe(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "name": self.track_id,
            "duration_s": self.duration_s,
            "sample_rate": self.sample_rate,
            "channels": self.channels,
        }


class Catalog:
    """A separated catalog at ``destination`` (a local path or an fsspec URL)."""

    def __init__(self, destination: str, storage_options: dict[str, Any] | None = None) -> None:
        self.destination = destination
        self.fs, self.root = open_location(destination, storage_options)
        self._tracks: dict[str, CatalogTrack] = {}
        self._loaded_at = -REFRESH_SECONDS
        self._lock = threading.Lock()

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def tracks(self) -> dict[str, CatalogTrack]:
        """key -> track, re-read from the manifests when older than :data:`REFRESH_SECONDS`."""
        with self._lock:
            if time.monotonic() - self._loaded_at >= REFRESH_SECONDS:
                self._tracks = self._read()
                self._loaded_at = time.monotonic()
            return self._tracks

    def search(self, query: str, limit: int = 50) -> tuple[list[CatalogTrack], int]:
        """Tracks whose id contains every word of ``query`` (case-insensitive), sorted by id;
        returns at most ``limit`` of them and how many matched."""
        words = query.lower().split()
        matches = [
            track
            for track in self.tracks().values()
            if all(word in track.track_id.lower() for word in words)
        ]
        matches.sort(key=lambda track: track.track_id)
        return matches[:limit], len(matches)

    def local_stems(self, track: CatalogTrack, folder: Path) -> dict[str, Path]:
        """Local paths of the track's stems: the catalog's own files, or copies in ``folder``."""
        if self.is_local:
            return {stem: Path(path) for stem, path in track.stems.items()}
        copies = {}
        for stem, path in track.stems.items():
            target = folder / f"{stem}{posixpath.splitext(path)[1]}"
            retry_storage(lambda p=path, t=target: self.fs.get_file(p, str(t)), f"reading {path}")
            copies[stem] = target
        return copies

    def _read(self) -> dict[str, CatalogTrack]:
        table = read_manifests(self.fs, self.root)
        rows = table.filter(pc.is_valid(table["track_id"])).to_pylist()
        rows.sort(key=lambda row: row["finished_at"] or datetime.min.replace(tzinfo=UTC))
        latest = {row["track_id"]: row for row in rows}  # the most recent row of each track
        tracks = {}
        for track_id, row in latest.items():
            track = self._track(track_id, row)
            if track is not None:
                tracks[track.key] = track
        log.info("catalog %s: %d separated tracks", self.destination, len(tracks))
        return tracks

    def _track(self, track_id: str, row: dict[str, Any]) -> CatalogTrack | None:
        if row["status"] != "ok":
            return None
        stems_root = posixpath.normpath(posixpath.join(self.root, "stems")) + "/"
        stems = {}
        for stem in STEMS:
            path = posixpath.normpath(self.fs._strip_protocol(row[f"{stem}_uri"] or "/"))
            if not path.startswith(stems_root):
                log.warning(
                    "catalog: ignoring %s: its %s is outside %s", track_id, stem, stems_root
                )
                return None
            stems[stem] = path
        return CatalogTrack(
            key=short_hash(track_id, 16),
            track_id=track_id,
            duration_s=float(row["duration_s"] or 0.0),
            sample_rate=int(row["sample_rate"] or 0),
            channels=int(row["channels"] or 0),
            stems=stems,
        )
