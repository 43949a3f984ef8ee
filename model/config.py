"""Configuration of the Meta-TasNet network.

Field names follow the release's ``train.py`` options so that a release checkpoint's ``args``
maps onto this dataclass one to one (only ``stages_num`` is spelled ``stages`` here).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

STEMS: tuple[str, ...] = ("drums", "bass", "other", "vocals")

# Release option names that differ from ours.
_RELEASE_ALIASES = {"stages_num": "stages"}


@dataclass(frozen=True)
class TasNetConfig:
    """Architecture and loss weights. The defaults are the paper's model (45,545,602 parameters).

    Stage ``i`` runs at ``sampling_rate * 2**i`` and uses ``N``, ``L`` and ``W`` multiplied by
    ``2**i``, so every stage produces latent frames at the same rate.
    """

    N: int = 440  # latent channels of stage 0
    L: int = 20  # base encoder/decoder kernel size
    W: int = 20  # encoder stride (hop) of stage 0
    B: int = 160  # masking TCN bottleneck channels
    H: int = 160  # masking TCN hidden channels
    layers: int = 6  # dilated blocks per stack (dilation 1, 2, 4, ...)
    stack: int = 3  # repeats of the dilated stack
    kernel: int = 3  # depthwise kernel size in the TCN
    E_1: int | None = 8  # instrument embedding size (None: learn the E_2 code directly)
    E_2: int = 5  # bottleneck of the instrument embedding
    filters: int = 3  # parallel encoder/decoder convolutions with kernels L, 2L, 4L...
    num_mels: int = 256  # outputs of the learnable mel branch
    sampling_rate: int = 8000  # rate of stage 0
    stages: int = 3  # number of stages (rates 8, 16, 32 kHz)
    dropout: float = 0.0  # Dropout2d on the latent frames before masking (training only)
    residual_bias: bool = False  # bias on the TCN residual and skip convolutions
    independent_params: bool = False  # each instrument its own weights instead of generated ones
    reconstruction_loss_weight: float = 0.05
    dissimilarity_loss_weight: float = 3.0
    similarity_loss_weight: float = 2.0

    def __post_init__(self) -> None:
        problems = []
        if self.kernel % 2 == 0:
            problems.append(f"kernel must be odd (got {self.kernel})")
        for name in ("N", "B", "H"):
            if getattr(self, name) % 8:
                problems.append(f"{name} must be a multiple of 8 for GroupNorm(8)")
        if self.N % 4:
            problems.append("N must be a multiple of 4 (the encoder has N/4 channels per filter)")
        if self.sampling_rate % 8000:
            problems.append("sampling_rate must be a multiple of 8000 (STFT sizes scale with it)")
        if (4 * self.sampling_rate) % self.L or self.L < self.W or (self.L - self.W) % 2:
            problems.append(
                "L must divide 4 * sampling_rate, be >= W and differ from W by an even number"
            )
        if self.stages < 1 or self.filters < 1:
            problems.append("stages and filters must be at least 1")
        if problems:
            raise ValueError("invalid TasNetConfig: " + "; ".join(problems))

    @property
    def top_rate(self) -> int:
        """Sampling rate of the last stage, the rate of the separated output."""
        return self.sampling_rate * 2 ** (self.stages - 1)

    def stage_rates(self) -> list[int]:
        """Sampling rate of every stage, lowest first."""
        return [self.sampling_rate * 2**i for i in range(self.stages)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TasNetConfig:
        """Build from a mapping, accepting release option names and ignoring unknown keys.

        Training options of the release (batch size, paths, seed...) are not architecture and are
        dropped; missing fields keep their paper defaults.
        """
        known = {f.name for f in fields(cls)}
        renamed = {_RELEASE_ALIASES.get(key, key): value for key, value in values.items()}
        return cls(**{key: value for key, value in renamed.items() if key in known})

    @classmethod
    def from_json(cls, text: str) -> TasNetConfig:
        return cls.from_dict(json.loads(text))
