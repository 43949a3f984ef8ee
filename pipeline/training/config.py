"""Training options and the named presets (``--config default|paper|FILE.json``)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model import TasNetConfig


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and data-sampling options; the defaults are the release's ``train.py``."""

    batch_size: int = 12
    crop_seconds: float = 8.0  # length of a training example
    steps: int = 1_000_000
    learning_rate: float = 1e-3
    weight_decay: float = 5e-4
    sgdr_period: int = 200_000  # steps between warm restarts
    sgdr_decay: float = 0.85  # peak learning rate factor at each restart
    clip_gradient: float = 5.0
    shuffle_p: float = 0.5  # part of each batch whose stems come from different tracks
    gain_range: tuple[float, float] = (0.75, 1.25)
    silence_peak: float = 1e-4  # a stem crop whose peak is below this counts as silent
    stats_examples: int = 256  # crops used for the spectrogram statistics
    seed: int = 42
    log_every: int = 10  # steps between metrics.jsonl lines
    validate_every: int = 500  # steps between validations and checkpoints
    valid_tracks: int = 8  # at most this many held-out tracks are scored


@dataclass(frozen=True)
class RunConfig:
    """A model architecture plus its training options."""

    model: TasNetConfig = field(default_factory=TasNetConfig)
    training: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "training": dataclasses.asdict(self.training)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        training = dict(values.get("training", {}))
        if "gain_range" in training:
            training["gain_range"] = tuple(training["gain_range"])
        return cls(TasNetConfig.from_dict(values.get("model", {})), TrainConfig(**training))


# The project's shipped model: small enough to separate stereo 44.1 kHz at >= 20x real time on
# 2 CPU cores, trained with short crops and one cosine cycle of 2000 steps (about an hour of CPU on one thread).
DEFAULT = RunConfig(
    model=TasNetConfig(N=64, B=32, H=32, layers=4, stack=2, num_mels=32),
    training=TrainConfig(
        batch_size=4, crop_seconds=2.0, steps=2000, sgdr_period=2000, validate_every=500
    ),
)
PRESETS = {"default": DEFAULT, "paper": RunConfig()}


def load_run_config(name_or_path: str) -> RunConfig:
    """A preset name (``default``, ``paper``) or a JSON file ``{"model": {...}, "training": {...}}``."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(
            f"--config: {name_or_path!r} is neither a preset {sorted(PRESETS)} nor a file"
        )
    try:
        return RunConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        raise ValueError(f"--config {path}: {error}") from None
