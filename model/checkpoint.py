"""Checkpoint I/O: the release's ``best_model.pt`` and the project's own safetensors format.

The release format is a ``torch.save`` dict with ``state_dict`` and ``args`` (an
``argparse.Namespace`` of the training options). It is read with ``weights_only=True`` and only
``argparse.Namespace`` allow-listed, so a file carrying any other pickled object is refused before
anything in it can run.

The own format is one ``.safetensors`` file: the tensors, plus in its header metadata the
architecture (``metasep.config``, JSON) and free-form information (``metasep.metadata``, JSON:
training data, steps, metrics). Reading it involves no pickle at all.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from model.config import TasNetConfig
from model.network import MultiTasNet

WEIGHTS_DIR = Path(__file__).parent / "weights"
CONFIG_KEY = "metasep.config"
METADATA_KEY = "metasep.metadata"
_OWN_SUFFIX = ".safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, corrupt, unsafe or of another architecture."""


def resolve_checkpoint(name: str | Path) -> Path:
    """The file behind a checkpoint name: a path, or the name of a weights file shipped in
    ``model/weights/`` (``"default"`` is the project's own trained model)."""
    path = Path(name)
    if path.exists():
        return path
    shipped = WEIGHTS_DIR / f"{name}{_OWN_SUFFIX}"
    if isinstance(name, str) and shipped.exists():
        return shipped
    raise CheckpointError(f"no checkpoint at {str(name)!r} (and no shipped weights of that name)")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> MultiTasNet:
    """Load a release ``.pt`` or an own-format ``.safetensors`` checkpoint, in eval mode."""
    model, _ = load_checkpoint_with_metadata(path, device)
    return model


def load_checkpoint_with_metadata(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[MultiTasNet, dict[str, Any]]:
    """Like :func:`load_checkpoint`, also returning the checkpoint's metadata."""
    path = resolve_checkpoint(path)
    config, state, metadata = read_checkpoint(path)
    return build_model(config, state, path).to(device), metadata


def read_checkpoint(
    path: str | Path,
) -> tuple[TasNetConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """The configuration, tensors and metadata of a checkpoint file (either format), without
    building the network, so that a caller can check them before paying for the model."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    if _is_safetensors(path):
        return _read_own(path)
    return _read_release(path)


def build_model(
    config: TasNetConfig, state: dict[str, torch.Tensor], origin: str | Path = "checkpoint"
) -> MultiTasNet:
    """The network of ``config`` holding ``state`` (every key, every shape), in eval mode;
    :class:`CheckpointError` naming ``origin`` when the tensors do not fit."""
    model = MultiTasNet(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{origin}: weights do not fit the configuration: {error}") from None
    return model.eval()


def save_checkpoint(
    model: MultiTasNet, path: str | Path, metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` in the own format (safetensors + JSON config and metadata)."""
    path = Path(path)
    if path.suffix != _OWN_SUFFIX:
        path = path.with_suffix(_OWN_SUFFIX)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    header = {
        CONFIG_KEY: model.config.to_json(),
        METADATA_KEY: json.dumps(metadata or {}, sort_keys=True, default=str),
    }
    save_file(state, str(path), metadata=header)
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)  # safetensors creates 0600 files; give the usual permissions
    return path


def _is_safetensors(path: Path) -> bool:
    """Own format is recognised by content, not by name: an 8-byte length then a JSON header."""
    with path.open("rb") as file:
        head = file.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read_own(path: Path) -> tuple[TasNetConfig, dict[str, torch.Tensor], dict[str, Any]]:
    try:
        with safe_open(str(path), framework="pt") as file:
            header = file.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file: {error}") from None
    if CONFIG_KEY not in header:
        raise CheckpointError(f"{path}: safetensors file without a metasep configuration")
    config = TasNetConfig.from_json(header[CONFIG_KEY])
    return config, state, json.loads(header.get(METADATA_KEY, "{}"))


def _read_release(path: Path) -> tuple[TasNetConfig, dict[str, torch.Tensor], dict[str, Any]]:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused to load: it carries pickled objects other than tensors and "
            f"argparse.Namespace, which could run code ({_first_line(error)})"
        ) from None
    except (RuntimeError, OSError, EOFError) as error:
        raise CheckpointError(f"{path}: not a readable checkpoint: {_first_line(error)}") from None
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise CheckpointError(f"{path}: not a Meta-TasNet checkpoint (no 'state_dict')")
    args = payload.get("args")
    options = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    metadata = {
        "format": "release",
        "epoch": payload.get("epoch"),
        "steps": payload.get("steps"),
        "training_options": {k: v for k, v in options.items() if _is_plain(v)},
    }
    return TasNetConfig.from_dict(options), payload["state_dict"], metadata


def _is_plain(value: object) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
