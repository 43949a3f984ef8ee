"""The remix a person hears on the page, rendered to a file: the stems, each times its gain."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from model import STEMS
from pipeline.audio import AudioError, AudioWriter, open_audio

MAX_GAIN = 4.0  # +12 dB; the page's sliders stop at 2 (+6 dB)


def parse_gains(values: Mapping[str, str]) -> dict[str, float]:
    """Per-stem gains from query parameters (a missing stem keeps gain 1).

    Raises ``ValueError`` naming the bad value: not a number, not finite, negative or above
    :data:`MAX_GAIN`.
    """
    gains = {}
    for stem in STEMS:
        text = values.get(stem, "1")
        try:
            gain = float(text)
        except ValueError:
            raise ValueError(f"{stem}={text!r} is not a number") from None
        if not math.isfinite(gain) or not 0.0 <= gain <= MAX_GAIN:
            raise ValueError(f"{stem}={text!r}: a gain must be between 0 and {MAX_GAIN:g}")
        gains[stem] = gain
    return gains


def render_mix(
    stems: Mapping[str, Path], gains: Mapping[str, float], destination: Path, format: str = "wav"
) -> Path:
    """Write ``sum(gains[k] * stems[k])`` to ``destination`` block by block (bounded memory).

    WAV is 32-bit float, so a loud mix keeps its peaks; FLAC (24-bit) clips at full scale.
    """
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(open_audio(stems[stem])) for stem in STEMS]
        first = readers[0]
        for reader in readers[1:]:
            shape = (reader.rate, reader.channels, reader.frames)
            if shape != (first.rate, first.channels, first.frames):
                raise AudioError(
                    f"{reader.name}: does not match {first.name} (rate/channels/length)"
                )
        weights = np.array([gains[stem] for stem in STEMS], dtype=np.float32)
        with AudioWriter(destination, first.rate, first.channels, format) as writer:
            for blocks in zip(*(reader.blocks() for reader in readers), strict=True):
                writer.write(np.einsum("s,sct->ct", weights, np.stack(blocks)))
    return destination
