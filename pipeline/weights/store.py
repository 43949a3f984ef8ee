"""Named weights on disk: resolve a ``--checkpoint`` value to a file, fetching and converting
named weights once into ``<cache_dir>/weights/``.

:func:`resolve_weights` is the one place where a ``--checkpoint`` / ``METASEP_CHECKPOINT`` value
becomes a file: every command and flow calls it and hands the file to :mod:`model`. A fetched
file is checked before anything uses it (the release format is read with
``weights_only=True``; the configuration, every key and shape and finite values are those its
registry entry expects), converted to ``<name>.safetensors`` (so that no later load unpickles
anything) with ``<name>.json`` beside it (the file's sha256, where it came from, when), and the
original is deleted. A cached name is used without any network request.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from model import (
    CheckpointError,
    MultiTasNet,
    TasNetConfig,
    build_model,
    read_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from model.checkpoint import WEIGHTS_DIR
from pipeline.settings import Settings, load_settings, redact_url
from pipeline.storage.location import open_location, write_bytes
from pipeline.weights.download import DownloadError, download
from pipeline.weights.registry import REGISTRY, UnknownWeightsError, WeightsEntry, weights_entry

FOLDER = "weights"
# Training options, not architecture: a checkpoint may differ from its entry in these.
_NOT_ARCHITECTURE = {
    "dropout",
    "reconstruction_loss_weight",
    "dissimilarity_loss_weight",
    "similarity_loss_weight",
}


class WeightsError(CheckpointError):
    """Named weights that cannot be had (unknown, offline, not what they should be); the
    message is one line for the user."""


def resolve_weights(checkpoint: str | Path, settings: Settings | None = None) -> Path:
    """The file behind a ``--checkpoint`` value: an existing file as given (it wins over a
    name); ``default`` the shipped file; another registry name its cached conversion, fetched
    first when missing. Raises :class:`WeightsError` (a ``CheckpointError``) saying why not."""
    path = Path(checkpoint)
    if path.is_file():
        return path
    name = str(checkpoint)
    if name not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise WeightsError(f"no checkpoint file {name!r} and no weights of that name ({known})")
    if not REGISTRY[name].shipped:
        return fetch_weights(name, settings)
    try:
        return resolve_checkpoint(name)
    except CheckpointError:
        raise WeightsError(
            f"the shipped {name} weights (model/weights/{name}.safetensors) are not installed; "
            "pass --checkpoint release (the paper's weights) or a checkpoint file"
        ) from None


def cached_file(name: str, settings: Settings | None = None) -> Path:
    """Where the converted weights of ``name`` live: ``<cache_dir>/weights/<name>.safetensors``."""
    return (settings or load_settings()).cache_dir / FOLDER / f"{name}.safetensors"


def source_url(entry: WeightsEntry, settings: Settings | None = None) -> str:
    """Where ``entry``'s file is fetched from: ``<METASEP_WEIGHTS_MIRROR>/<filename>`` when a
    mirror is set, else its published URL."""
    mirror = (settings or load_settings()).weights_mirror
    if mirror and entry.filename:
        return f"{mirror.rstrip('/')}/{entry.filename}"
    return entry.url or ""


def fetch_weights(name: str, settings: Settings | None = None, source: Path | None = None) -> Path:
    """The cached file of ``name``: downloaded, checked and converted when not cached yet, or
    imported from ``source`` (a file the user got another way, checked the same way)."""
    settings = settings or load_settings()
    entry = _fetchable(name)
    target = cached_file(name, settings)
    if source is None and target.exists():
        return target
    if source is not None and not Path(source).is_file():
        raise WeightsError(f"{source}: no such file")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.with_name(f".{name}.lock")):
        if source is None and target.exists():  # fetched by another process meanwhile
            return target
        if source is not None:
            _install(entry, Path(source), str(source), target)
            return target
        original = _download(entry, settings, target.parent)
        try:
            _install(entry, original, redact_url(source_url(entry, settings)), target)
        finally:
            original.unlink(missing_ok=True)
    return target


def weights_table(settings: Settings | None = None) -> list[dict[str, Any]]:
    """One row per registry name: whether it is here, its size, parameters and scores."""
    settings = settings or load_settings()
    rows = []
    for entry in REGISTRY.values():
        here = _shipped_file(entry.name) if entry.shipped else cached_file(entry.name, settings)
        if here.exists():
            state = "shipped" if entry.shipped else "cached"
        else:
            state = "not installed" if entry.shipped else "not cached"
        rows.append(
            {
                "name": entry.name,
                "state": state,
                "bytes": here.stat().st_size if here.exists() else entry.size,
                "parameters": parameter_count(entry.config),
                "scores": dict(entry.scores),
                "source": entry.source,
                "url": entry.url,
                "licence": entry.licence,
                "description": entry.description,
            }
        )
    return rows


@functools.lru_cache(maxsize=8)
def expected_shapes(config: TasNetConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the network of ``config`` and its shape."""
    return {key: tuple(value.shape) for key, value in MultiTasNet(config).state_dict().items()}


def parameter_count(config: TasNetConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in MultiTasNet(config).parameters())


def _shipped_file(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


def _fetchable(name: str) -> WeightsEntry:
    try:
        entry = weights_entry(name)
    except UnknownWeightsError as error:
        raise WeightsError(error.args[0]) from None
    if entry.shipped:
        raise WeightsError(f"{name!r} is shipped with metasep: there is nothing to fetch")
    return entry


def _download(entry: WeightsEntry, settings: Settings, folder: Path) -> Path:
    """The entry's original file, downloaded into ``folder``; offline, a one-line error that
    says how to import the file instead."""
    url = source_url(entry, settings)
    destination = folder / f".{entry.name}-{entry.filename}"
    try:
        download(url, destination, settings.options(), entry.size, entry.name, _head_problem)
    except DownloadError as error:
        raise WeightsError(
            f"could not fetch the {entry.name!r} weights: {error}. Offline or blocked? Get "
            f"{entry.filename} from {entry.url} another way and import it: "
            f"metasep weights fetch {entry.name} --from {entry.filename}"
        ) from None
    return destination


def _install(entry: WeightsEntry, original: Path, origin: str, target: Path) -> None:
    """Check ``original`` and write it as ``target`` (safetensors) with its sidecar."""
    _check_looks_like_checkpoint(original, origin)
    digest = _sha256(original)
    model, metadata = _verified(entry, original, origin)
    record = {
        "name": entry.name,
        "origin": origin,
        "url": entry.url,
        "sha256": digest,
        "bytes": original.stat().st_size,
        "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "format": metadata.get("format", "own"),
        "epoch": metadata.get("epoch"),
        "steps": metadata.get("steps"),
    }
    temporary = target.with_name(f".{target.stem}.{uuid.uuid4().hex}.safetensors")
    try:
        save_checkpoint(model, temporary, {**metadata, "weights": record})
        fs, sidecar = open_location(str(target.with_suffix(".json")))
        write_bytes(fs, sidecar, (json.dumps(record, indent=2) + "\n").encode())
        os.replace(temporary, target)  # the commit point: a cache hit is this file existing
    finally:
        temporary.unlink(missing_ok=True)


def _verified(entry: WeightsEntry, path: Path, origin: str) -> tuple[MultiTasNet, dict]:
    """The model in ``path`` once its configuration, keys, shapes and values are checked."""
    prefix = f"{entry.name} from {origin}"
    try:
        config, state, metadata = read_checkpoint(path)
    except CheckpointError as error:
        raise WeightsError(f"{prefix}: {str(error).removeprefix(f'{path}: ')}") from None
    _check_config(config, entry.config, prefix)
    _check_tensors(state, expected_shapes(entry.config), prefix)
    return build_model(config, state, prefix), metadata


def _check_config(config: TasNetConfig, expected: TasNetConfig, prefix: str) -> None:
    differences = [
        f"{field.name}={getattr(config, field.name)!r} (expected {getattr(expected, field.name)!r})"
        for field in dataclasses.fields(TasNetConfig)
        if field.name not in _NOT_ARCHITECTURE
        and getattr(config, field.name) != getattr(expected, field.name)
    ]
    if differences:
        raise WeightsError(f"{prefix}: another architecture: {', '.join(differences)}")


def _check_tensors(
    state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], prefix: str
) -> None:
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise WeightsError(
            f"{prefix}: {len(missing)} tensor(s) missing (e.g. {missing[:1]}), {len(extra)} "
            f"unexpected (e.g. {extra[:1]})"
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise WeightsError(
                f"{prefix}: {key} has shape {tuple(state[key].shape)}, expected {shape}"
            )
        if state[key].is_floating_point() and not torch.isfinite(state[key]).all():
            raise WeightsError(f"{prefix}: {key} holds NaN or infinite values")


def _check_looks_like_checkpoint(path: Path, origin: str) -> None:
    """Refuse a web page or any file that does not start like a checkpoint before reading it."""
    with path.open("rb") as file:
        problem = _head_problem(file.read(16))
    if problem:
        raise WeightsError(f"{origin}: {problem}")


def _head_problem(head: bytes) -> str | None:
    """What is wrong with a file that starts with ``head``, unless it starts like a checkpoint:
    the zip archive of ``torch.save``, the pickle of its legacy format, or safetensors."""
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or head[8:9] == b"{":
        return None
    if head.lstrip()[:1] == b"<":
        return "a web page, not a checkpoint"
    return f"not a checkpoint (it starts with {head[:16]!r})"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``: two processes never write the same weights."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
