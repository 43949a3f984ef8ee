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

    def holds(self, relative_paths: list[str]) -> np.ndarray:
        """Per path, whether the destination holds it (a boolean array)."""
        wanted = np.fromiter((hash(path) for path in relative_paths), np.int64, len(relative_paths))
        return np.isin(wanted, self._hashes, assume_unique=False)


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
    joined = listing.join(
        done.select(["track_id", "source_version", "model_id", "options_hash"]),
        "track_id",
        join_type="left outer",
        right_suffix="_done",
    )
    current = pc.and_kleene(
        pc.equal(joined["source_version"], joined["source_version_done"]),
        pc.and_kleene(
            pc.equal(joined["model_id"], model_id), pc.equal(joined["options_hash"], options_hash)
        ),
    )
    current = pc.fill_null(current, False)
    lost = np.zeros(len(joined), dtype=bool)
    if stems is not None:
        keys = joined["output_key"].to_pylist()
        candidates = np.flatnonzero(current.to_numpy(zero_copy_only=False))
        for stem in STEMS:
            present = stems.holds([f"{keys[i]}/{stem}.{stem_format}" for i in candidates])
            lost[candidates[~present]] = True
    keep = pc.and_(current, pc.invert(pa.array(lost)))
    columns = listing.column_names
    todo = joined.filter(pc.invert(keep)).select(columns).sort_by("track_id")
    lost_ids = joined.filter(pa.array(lost)).select(["track_id"]).sort_by("track_id")
    return Plan(
        todo=todo,
        listed=listing.num_rows,
        skipped=int(pc.sum(keep.cast(pa.int64())).as_py() or 0),
        lost=lost_ids.num_rows,
        lost_examples=lost_ids["track_id"].slice(0, MAX_LISTED).to_pylist(),
    )
