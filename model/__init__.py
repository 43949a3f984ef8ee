"""Meta-TasNet in pure PyTorch: the network, its configuration and checkpoint I/O."""

from model.checkpoint import (
    CheckpointError,
    build_model,
    load_checkpoint,
    load_checkpoint_with_metadata,
    read_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from model.config import STEMS, TasNetConfig
from model.network import MultiTasNet

__all__ = [
    "STEMS",
    "CheckpointError",
    "MultiTasNet",
    "TasNetConfig",
    "build_model",
    "load_checkpoint",
    "load_checkpoint_with_metadata",
    "read_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
]
