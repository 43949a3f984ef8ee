"""Audio I/O and resampling: the one place the project decodes, encodes and resamples audio.

Arrays are float32 of shape (channels, samples) everywhere in the project.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr


class AudioError(ValueError):
    """Audio that cannot be read or used: the message names the input and says why."""


def read_audio(source: str | Path | BinaryIO) -> tuple[np.ndarray, int]:
    """Decode a file into float32 (channels, samples) and its sample rate."""
    try:
        data, rate = sf.read(source, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as error:
        raise AudioError(f"{_name(source)}: cannot decode audio ({error})") from None
    return np.ascontiguousarray(data.T), int(rate)


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample (channels, samples) audio with soxr's high-quality filter."""
    if from_rate == to_rate:
        return audio
    return np.ascontiguousarray(soxr.resample(audio.T, from_rate, to_rate, quality="HQ").T)


def _name(source: str | Path | BinaryIO) -> str:
    return str(getattr(source, "name", source))
