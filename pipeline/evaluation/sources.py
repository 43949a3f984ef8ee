"""Where each method's estimates are: the methods of an evaluation and their files per track.

A method is a name and a location, one of

- a ``separate_catalog`` destination (it has ``manifest/``): its manifests say, per ``track_id``,
  which stems the last successful run wrote; the track is the reference whose name is the file's
  name without extension, or its folder's for a MUSDB18-HQ ``<track>/mixture.wav``;
- a folder in museval's layout, ``<track>/<target>.wav`` (also one folder deeper, as in
  ``<split>/<track>/<target>.wav``); WAV or FLAC;
- the mixture baseline: the reference's own mixture as every target's estimate, the floor that
  any separation must beat.

A method's ``version`` of a track is a hash of what its estimate files are (their ETags or
modification times; for a catalog also the model and options that made them), so a rerun scores a
track again exactly when its estimates or references changed.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from model import STEMS
from pipeline.storage.errors import CatalogError
from pipeline.storage.files import is_audio_name, source_version
from pipeline.storage.location import full_url, open_location, retry_storage
from pipeline.storage.manifest import latest_ok_rows, manifest_root, read_manifests
from pipeline.storage.paths import short_hash
from pipeline.storage.references import MIXTURE, preferred_file

MIXTURE_METHOD = "mixture"
_METHOD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,79}")


@dataclass(frozen=True)
class Method:
    """One estimate source to score: ``kind`` is ``catalog``, ``folder`` or ``mixture``."""

    name: str
    location: str
    kind: str


@dataclass(frozen=True)
class EstimateTrack:
    """A method's estimates of one track: the file of each target it has, and their version."""

    files: dict[str, str] = field(default_factory=dict)  # target -> URL
    version: str = ""
    location: str = ""  # the track's folder, for messages
    problem: str = ""  # why these estimates cannot be scored (several folders claim the track)


def parse_methods(estimates: Mapping[str, str] | Sequence[str] | str) -> list[tuple[str, str]]:
    """``(name, location)`` of each estimate source.

    A mapping gives the names; in a list, ``NAME=LOCATION`` names an entry and a bare location is
    named after its last path part (``out/separated/meta-tasnet`` -> ``meta-tasnet``).
    """
    if isinstance(estimates, str):
        estimates = [estimates]
    if isinstance(estimates, Mapping):
        pairs = [(str(name), str(location)) for name, location in estimates.items()]
    else:
        pairs = [_split_named(str(item)) for item in estimates]
    names = [name for name, _ in pairs]
    for name in names:
        if not _METHOD_NAME.fullmatch(name):
            raise CatalogError(
                f"method name {name!r}: use letters, digits, '.', '_', '+' and '-' (name a "
                "source with NAME=LOCATION)"
            )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise CatalogError(
            f"two estimate sources are named {', '.join(duplicates)}: name them NAME=LOCATION"
        )
    return pairs


def _split_named(item: str) -> tuple[str, str]:
    name, sep, location = item.partition("=")
    if sep and name and location and not any(c in name for c in "/:\\"):
        return name, location
    return posixpath.basename(item.rstrip("/")) or item, item


def resolve_methods(
    pairs: list[tuple[str, str]],
    with_mixture: bool,
    storage_options: dict[str, Any] | None = None,
) -> list[Method]:
    """The methods to score: each source's kind found from what is there, plus the baseline."""
    methods = [Method(name, location, _kind(location, storage_options)) for name, location in pairs]
    if with_mixture:
        if any(method.name == MIXTURE_METHOD for method in methods):
            raise CatalogError(f"{MIXTURE_METHOD!r} names the mixture baseline; rename the source")
        methods.append(Method(MIXTURE_METHOD, "", "mixture"))
    if not methods:
        raise CatalogError("no estimates to score: give an estimate source or the mixture baseline")
    return methods


def _kind(location: str, storage_options: dict[str, Any] | None) -> str:
    fs, root = open_location(location, storage_options)
    if not retry_storage(lambda: fs.isdir(root), f"checking {location}"):
        raise CatalogError(f"{location}: no such estimates folder or catalog destination")
    manifests = manifest_root(root)
    if retry_storage(lambda: fs.isdir(manifests), f"checking {location}"):
        return "catalog"
    return "folder"


def list_estimates(
    method: Method, targets: tuple[str, ...], storage_options: dict[str, Any] | None = None
) -> dict[str, EstimateTrack]:
    """The estimates of ``method`` per reference track name (empty for the mixture baseline,
    whose estimates come with the references)."""
    if method.kind == "catalog":
        return _catalog_estimates(method.location, targets, storage_options)
    if method.kind == "folder":
        return _folder_estimates(method.location, targets, storage_options)
    return {}


def reference_name(track_id: str) -> str:
    """The reference track a separated file stands for: ``a/b/Song.flac`` -> ``Song``,
    ``test/Song/mixture.wav`` -> ``Song``, ``Song.stem.mp4`` -> ``Song``."""
    base = posixpath.basename(track_id)
    name = base[: -len(".stem.mp4")] if base.lower().endswith(".stem.mp4") else base
    name = posixpath.splitext(name)[0] if name == base else name
    folder = posixpath.basename(posixpath.dirname(track_id))
    return folder if name == MIXTURE and folder else name


def _catalog_estimates(
    location: str, targets: tuple[str, ...], storage_options: dict[str, Any] | None
) -> dict[str, EstimateTrack]:
    fs, root = open_location(location, storage_options)
    rows = latest_ok_rows(read_manifests(fs, root))
    if not rows:
        raise CatalogError(f"{location}: its manifests hold no successfully separated track")
    stems_root = posixpath.join(root, "stems")
    try:
        infos = retry_storage(lambda: fs.find(stems_root, detail=True), f"listing {location}")
    except FileNotFoundError:
        infos = {}
    claims: dict[str, list[EstimateTrack]] = {}
    for track_id, row in sorted(rows.items()):
        files = {t: row[f"{t}_uri"] for t in targets if row.get(f"{t}_uri")}
        versions = [row["model_id"], row["options_hash"]]
        for target, uri in sorted(files.items()):
            info = infos.get(open_location(uri, storage_options)[1])
            versions.append(f"{target}={source_version(info) if info else 'absent'}")
        folder = posixpath.dirname(next(iter(files.values()), location))
        estimate = EstimateTrack(files, short_hash("|".join(versions), 16), folder)
        claims.setdefault(reference_name(track_id), []).append(estimate)
    return {name: _one_claim(name, found) for name, found in claims.items()}


def _folder_estimates(
    location: str, targets: tuple[str, ...], storage_options: dict[str, Any] | None
) -> dict[str, EstimateTrack]:
    fs, root = open_location(location, storage_options)
    fs.invalidate_cache()
    entries = retry_storage(lambda: fs.find(root, detail=True), f"listing {location}")
    prefix = root.rstrip("/") + "/"
    folders: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {}
    for path, info in sorted(entries.items()):
        relative = path[len(prefix) :] if path.startswith(prefix) else ""
        folder, base = posixpath.split(relative)
        target, extension = posixpath.splitext(base)
        if not folder or not is_audio_name(base) or target not in STEMS:
            continue
        files = folders.setdefault(folder, {})
        if target not in files or preferred_file(extension, files[target][0]):
            files[target] = (path, info)
    claims: dict[str, list[EstimateTrack]] = {}
    for folder, files in folders.items():
        chosen = {t: files[t] for t in targets if t in files}
        version = "|".join(f"{t}={source_version(info)}" for t, (_, info) in sorted(chosen.items()))
        estimate = EstimateTrack(
            files={t: full_url(fs, path) for t, (path, _) in chosen.items()},
            version=short_hash(version, 16),
            location=full_url(fs, posixpath.join(root, folder)),
        )
        claims.setdefault(posixpath.basename(folder), []).append(estimate)
    return {name: _one_claim(name, found) for name, found in claims.items()}


def _one_claim(name: str, found: list[EstimateTrack]) -> EstimateTrack:
    """The estimates of a track, or a problem when several folders hold estimates for it."""
    if len(found) == 1:
        return found[0]
    places = ", ".join(sorted(estimate.location for estimate in found))
    return EstimateTrack(problem=f"several estimates claim track {name!r}: {places}")
