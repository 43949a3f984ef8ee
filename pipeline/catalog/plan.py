"""Planning a run: which listed tracks still need separating.

A track is skipped when its most recent ``ok`` manifest row was made from the same source version
by the same model with the same options; everything else (new, changed, failed before, or made
by another model) is planned. Because a row exists only once its stems are written, re-running a
killed run plans exactly the tracks it had not finished.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.catalog.listing import CatalogTrack
from pipeline.storage.manifest import DoneRecord
from pipeline.storage.paths import short_hash


@dataclass(frozen=True)
class Plan:
    """The tracks of a run: those to separate and those already done."""

    todo: list[CatalogTrack]
    skipped: list[CatalogTrack]


def catalog_options_hash(separator_options_hash: str, stem_format: str) -> str:
    """The options that shape a track's stems: the separator's and the file format written."""
    return short_hash(f"{separator_options_hash}|{stem_format}", 12)


def plan_tracks(
    tracks: list[CatalogTrack], done: dict[str, DoneRecord], model_id: str, options_hash: str
) -> Plan:
    """Split ``tracks`` into those to separate and those whose last ``ok`` row still holds."""
    todo, skipped = [], []
    for track in tracks:
        record = done.get(track.track_id)
        current = DoneRecord(track.source_version, model_id, options_hash)
        (skipped if record == current else todo).append(track)
    return Plan(todo, skipped)
