"""Reference catalogs: tracks whose true stems are known, for training and for evaluation.

Two layouts are read:

- MUSDB18-HQ: ``ROOT/<split>/<track>/{mixture,drums,bass,other,vocals}.wav`` (what
  ``metasep synth`` writes and MUSDB18-HQ ships; FLAC files of the same names work too), on a
  local path or any fsspec URL. One recursive listing finds every track, so a bucket of thousands
  of tracks costs a few paginated requests, not one per folder.
- MUSDB18: a local folder of ``.stem.mp4`` files, read through the musdb package (its
  ``train``/``valid``/``test`` splits); the streams are mixture, drums, bass, other, vocals.

A track folder that lacks some of the files is still listed, with what it has: training skips it,
evaluation reports it as that track's error.
"""

from __future__ import annotations

import contextlib
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from model import STEMS
from pipeline.audio import AudioError, AudioReader, open_audio
from pipeline.storage.errors import CatalogError
from pipeline.storage.files import is_audio_name, source_version
from pipeline.storage.location import full_url, open_audio_at, open_location, retry_storage
from pipeline.storage.paths import short_hash

MIXTURE = "mixture"
REFERENCE_NAMES = (MIXTURE, *STEMS)
STEM_CONTAINER = "stem.mp4"
_EXTENSION_ORDER = ("wav", "flac")  # when a folder holds both, the WAV is the reference


@dataclass(frozen=True)
class ReferenceTrack:
    """One track of a reference catalog and where each of its files is."""

    name: str
    files: dict[str, str]  # "mixture", "drums", ... -> URL; MUSDB18: {"stem.mp4": path}
    versions: dict[str, str]  # same keys: what changes when the file does (ETag, mtime)
    location: str  # the track's folder or .stem.mp4 file, for messages

    def missing(self, names: tuple[str, ...] = STEMS) -> list[str]:
        """Which of ``names`` the track has no file for (a .stem.mp4 holds all of them)."""
        if STEM_CONTAINER in self.files:
            return []
        return [name for name in names if name not in self.files]

    def version(self, names: tuple[str, ...] = STEMS) -> str:
        """A short hash of the versions of the files of ``names``: it changes when any does."""
        if STEM_CONTAINER in self.files:
            return short_hash(self.versions[STEM_CONTAINER], 16)
        return short_hash("|".join(f"{n}={self.versions.get(n)}" for n in names), 16)


def list_references(
    root: str, split: str = "test", storage_options: dict[str, Any] | None = None
) -> list[ReferenceTrack]:
    """The tracks under ``root/split`` (or ``root`` itself when it has no such folder), by name.

    Raises :class:`CatalogError` when there is no such folder or it holds no track.
    """
    fs, base = open_location(root, storage_options)
    if isinstance(fs, LocalFileSystem) and any(Path(base).glob("*/*.stem.mp4")):
        return _musdb_tracks(Path(base), split)
    folder = posixpath.join(base, split)
    if not retry_storage(lambda: fs.isdir(folder), f"checking {root}"):
        folder = base
    if not retry_storage(lambda: fs.isdir(folder), f"checking {root}"):
        raise CatalogError(f"{root}: no such catalog folder")
    fs.invalidate_cache()
    entries = retry_storage(lambda: fs.find(folder, detail=True), f"listing {root}")
    found: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {}
    prefix = folder.rstrip("/") + "/"
    for path, info in sorted(entries.items()):
        parts = path[len(prefix) :].split("/") if path.startswith(prefix) else []
        if len(parts) != 2 or not is_audio_name(parts[1]):
            continue
        name, extension = posixpath.splitext(parts[1])
        if name not in REFERENCE_NAMES:
            continue
        files = found.setdefault(parts[0], {})
        if name not in files or preferred_file(extension, files[name][0]):
            files[name] = (path, info)
    if not found:
        raise CatalogError(
            f"{root}: no track folders with {', '.join(f'{n}.wav' for n in REFERENCE_NAMES)} "
            f"in {full_url(fs, folder)}"
        )
    return [
        ReferenceTrack(
            name=track,
            files={name: full_url(fs, path) for name, (path, _) in files.items()},
            versions={name: source_version(info) for name, (_, info) in files.items()},
            location=full_url(fs, posixpath.join(folder, track)),
        )
        for track, files in sorted(found.items())
    ]


def preferred_file(extension: str, current_path: str) -> bool:
    """Whether a file with ``extension`` should replace the one at ``current_path``."""
    order = {f".{e}": i for i, e in enumerate(_EXTENSION_ORDER)}
    current = posixpath.splitext(current_path)[1].lower()
    return order.get(extension.lower(), 99) < order.get(current, 99)


def _musdb_tracks(root: Path, split: str) -> list[ReferenceTrack]:
    import musdb

    subsets, musdb_split = ("test", None) if split == "test" else ("train", split)
    database = musdb.DB(root=str(root), subsets=subsets, split=musdb_split)
    tracks = []
    for track in database.tracks:
        info = Path(track.path).stat()
        tracks.append(
            ReferenceTrack(
                name=track.name,
                files={STEM_CONTAINER: track.path},
                versions={STEM_CONTAINER: f"mtime:{info.st_mtime}:size:{info.st_size}"},
                location=track.path,
            )
        )
    if not tracks:
        raise CatalogError(f"{root}: no MUSDB18 .stem.mp4 tracks in the {split} split")
    return sorted(tracks, key=lambda t: t.name)


def open_references(
    stack: contextlib.ExitStack,
    track: ReferenceTrack,
    names: tuple[str, ...] = STEMS,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, AudioReader]:
    """Each of ``names`` open for block-wise reading (closed with ``stack``), in memory that
    does not grow with the track's length: objects are read as streams, and a .stem.mp4's
    streams are decoded by ffmpeg to temporary files. Raises :class:`AudioError` for a file
    that is missing or unreadable, and when the files differ in rate, channels or length (they
    are one track's stems, compared by their headers)."""
    missing = track.missing(names)
    if missing:
        raise AudioError(f"{track.location}: no {', '.join(f'{n}.wav' for n in missing)}")
    if STEM_CONTAINER in track.files:
        path = track.files[STEM_CONTAINER]
        readers = {
            n: stack.enter_context(open_audio(path, REFERENCE_NAMES.index(n))) for n in names
        }
    else:
        readers = {n: open_audio_at(stack, track.files[n], storage_options) for n in names}
    shapes = {n: (r.rate, r.channels, r.frames) for n, r in readers.items()}
    if len(set(shapes.values())) > 1:
        detail = ", ".join(f"{n} {rate} Hz ({c}, {f})" for n, (rate, c, f) in shapes.items())
        raise AudioError(f"{track.location}: reference files differ in rate or shape ({detail})")
    return readers
