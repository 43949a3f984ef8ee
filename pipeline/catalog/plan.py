"""Planning a run: which listed tracks still need separating, in memory that stays small.

A track is skipped when its most recent ``ok`` manifest row was made from the same source version
by the same model with the same options, and its four stems are still where that row says.
Everything else (new, changed, failed before, made by another model, or whose stems were lost) is
planned. Because a row exists only once its stems are written, re-running a killed run plans
exactly the tracks it had not finished.

Everything is columnar (Arrow tables, numpy arrays of hashes), so that planning a library of a
million tracks takes a few hundred megabytes, not one Python object per track and field.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model import STEMS
from pipeline.runtime import release_arrow_memory
from pipeline.storage.paths import short_hash
from pipeline.storage.runs import MAX_LISTED


@dataclass(frozen=True)
class Plan:
    """The tracks of a run: those to separate (a listing table), and what the rest were."""

    todo: pa.Table
    listed: int
    skipped: int
    lost: int = 0  # planned again: done before, but their stems are gone
    lost_examples: list[str] = field(default_factory=list)  # the first of them, by track_id
    partials_removed: int = 0  # files of killed writers found in DST/stems and removed
    quarantined: list[str] = field(default_factory=list)  # unreadable manifest parts, moved

    @property
    def planned(self) -> int:
        return self.todo.num_rows


class StemIndex:
    """The stem files a destination holds, as a sorted array of hashes of their paths relative
    to ``DST/stems`` (8 bytes a file), built from one listing."""

    def __init__(self, relative_paths: Iterable[str]) -> None:
        self._hashes = np.unique(
            np.fromiter((hash(path) for path in relative_paths), dtype=np.int64)
        )

    def __len__(self) -> int:
        return len(self._hashes)

    def holds(self, relative_paths: Iterable[str], count: int = -1) -> np.ndarray:
        """Per path (``count`` of them, when known), whether the destination holds it."""
        wanted = np.fromiter((hash(path) for path in relative_paths), np.int64, count)
        if not len(self._hashes):
            return np.zeros(len(wanted), dtype=bool)
        found = np.searchsorted(self._hashes, wanted).clip(max=len(self._hashes) - 1)
        return self._hashes[found] == wanted


def _strings(column: pa.ChunkedArray, step: int = 1 << 16) -> Iterable[str]:
    """The values of a string column, a slice at a time (never all as Python objects)."""
    for start in range(0, len(column), step):
        yield from column.slice(start, step).to_pylist()


def catalog_options_hash(separator_options_hash: str, stem_format: str) -> str:
    """The options that shape a track's stems: the separator's and the file format written."""
    return short_hash(f"{separator_options_hash}|{stem_format}", 12)


def plan_tracks(
    listing: pa.Table,
    done: pa.Table,
    model_id: str,
    options_hash: str,
    stems: StemIndex | None = None,
    stem_format: str = "flac",
) -> Plan:
    """Split ``listing`` (the catalog's tracks) into those to separate and those done.

    ``done`` is the latest ``ok`` row per track (:func:`pipeline.storage.manifest.latest_done`).
    With ``stems``, a track whose row stands but whose stems are not all there is planned again
    and counted as lost."""
    # Each listed track's last ok row, found by position (a join would copy both tables)
    row = pc.index_in(listing["track_id"], value_set=done["track_id"].combine_chunks())
    current = pc.equal(listing["source_version"], done["source_version"].take(row))
    for column, value in (("model_id", model_id), ("options_hash", options_hash)):
        current = pc.and_kleene(current, pc.equal(done[column].take(row), value))
    current = pc.fill_null(current, False)
    lost = np.zeros(listing.num_rows, dtype=bool)
    if stems is not None:
        candidates = np.flatnonzero(current.to_numpy(zero_copy_only=False))
        keys = listing["output_key"].take(pa.array(candidates, pa.int64()))
        for stem in STEMS:
            paths = (f"{key}/{stem}.{stem_format}" for key in _strings(keys))
            lost[candidates[~stems.holds(paths, len(candidates))]] = True
    keep = pc.and_(current, pc.invert(pa.array(lost)))
    todo = listing.filter(pc.invert(keep))
    lost_ids = listing["track_id"].filter(pa.array(lost))
    release_arrow_memory()
    return Plan(
        todo=todo,
        listed=listing.num_rows,
        skipped=int(pc.sum(keep.cast(pa.int64())).as_py() or 0),
        lost=len(lost_ids),
        lost_examples=lost_ids.slice(0, MAX_LISTED).to_pylist(),
    )
