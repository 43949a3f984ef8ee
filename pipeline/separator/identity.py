"""Who made a stem: the model id and the options hash, pure functions of weights and options.

A catalog run plans with them (a track is done when its row has the same model id and options
hash) and every worker checks that it holds the model the run planned with.
"""

from __future__ import annotations

import hashlib
import json

import torch

from model import MultiTasNet
from pipeline.separator.feed import SILENCE
from pipeline.separator.options import SeparationOptions
from pipeline.separator.windows import window_frames

# Bump when a change alters the engine's output for the same options. 3: the device-resident
# engine (on a CPU its output equals version 2's; on a GPU it resamples with torch, not soxr).
ENGINE_VERSION = 3


def identify(model: MultiTasNet, options: SeparationOptions) -> tuple[str, str]:
    """``(model_id, options_hash)`` of a separator over ``model`` with ``options``, computed
    without building one. The hash covers what changes the output as it was asked for (engine
    version, precision, ``"auto"`` included, window sizes), not the device or the batching."""
    segment, context = window_frames(model, options.segment, options.context)
    described = {
        "engine": ENGINE_VERSION,
        "precision": options.precision,
        "segment": segment,
        "context": context,
        "silence": SILENCE,
    }
    return model_fingerprint(model), digest(json.dumps(described, sort_keys=True).encode())


def model_fingerprint(model: MultiTasNet) -> str:
    """A short stable hash of a model's configuration and weights."""
    hashed = hashlib.blake2b(model.config.to_json().encode(), digest_size=8)
    for name, tensor in sorted(model.state_dict().items()):
        hashed.update(name.encode())
        hashed.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return hashed.hexdigest()


def digest(data: bytes) -> str:
    """A short hex digest (16 characters)."""
    return hashlib.blake2b(data, digest_size=8).hexdigest()
