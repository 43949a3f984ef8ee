"""Housekeeping of a destination before a run plans: what stems it holds, what is left over.

Under the run's lease (no other run writes the destination meanwhile), one listing of
``DST/stems`` tells which stems exist, and removes the partial files of writers that were killed
(``.drums.flac.1a2b3c4d.partial``: no live run owns them). Manifest parts that cannot be read are
moved to ``DST/manifest/_quarantine/``, where readers do not look, and their tracks are planned
again (a track without a readable ``ok`` row is not done).
"""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Iterator

import pyarrow as pa

from pipeline.catalog.listing import walk_files
from pipeline.catalog.plan import StemIndex
from pipeline.storage.location import full_url, retry_storage
from pipeline.storage.manifest import DONE_COLUMNS, latest_done, quarantine_part, read_manifests

log = logging.getLogger(__name__)

# What the engine's writers name a file they are still writing: ".drums.flac.1a2b3c4d.partial"
PARTIAL = re.compile(r"^\..+\.[0-9a-f]{8}\.partial$")


def survey_stems(fs, destination: str) -> tuple[StemIndex, int]:
    """The stems ``destination`` holds, from one listing of ``DST/stems``; partial files found
    on the way are removed. Returns the index and how many partial files went."""
    root = posixpath.join(destination, "stems")
    if not retry_storage(lambda: fs.isdir(root), f"checking {root}"):
        return StemIndex([]), 0
    partials: list[str] = []

    def stems() -> Iterator[str]:
        for relative, info in walk_files(fs, root, full_url(fs, root)):
            if PARTIAL.match(posixpath.basename(relative)):
                partials.append(info["name"])
            else:
                yield relative

    index = StemIndex(stems())
    for path in partials:
        retry_storage(lambda path=path: fs.rm_file(path), f"removing {path}")
    if partials:
        log.warning("removed %d partial file(s) left by killed writers in %s", len(partials), root)
    return index, len(partials)


def read_done(fs, destination: str) -> tuple[pa.Table, list[str]]:
    """The latest ``ok`` row of each track in ``destination``'s manifests, and where the parts
    that could not be read were moved."""
    quarantined: list[str] = []

    def move_aside(path: str, error: Exception) -> None:
        target = quarantine_part(fs, destination, path)
        quarantined.append(full_url(fs, target))
        log.warning("unreadable manifest part %s (%s) moved to %s", path, error, target)

    manifests = read_manifests(fs, destination, columns=DONE_COLUMNS, on_unreadable=move_aside)
    return latest_done(manifests), quarantined
