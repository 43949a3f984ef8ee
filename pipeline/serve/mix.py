"""The remix a person hears on the page, rendered to a file: the stems, each times its gain
(parsed by :func:`pipeline.stems.parse_gains`, the rule the CLI's ``--remix`` follows too)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from model import STEMS
from pipeline.audio import (
    AudioError,
    AudioReader,
    AudioWriter,
    check_writable,
    headroom_gain,
    open_audio,
)


def render_mix(
    stems: Mapping[str, Path], gains: Mapping[str, float], destination: Path, format: str = "wav"
) -> Path:
    """Write ``sum(gains[k] * stems[k])`` to ``destination`` block by block (bounded memory).

    WAV is 32-bit float, so a loud mix keeps its peaks; a FLAC (24-bit) or MP3 mix that would go
    over full scale is written again, scaled as a whole (:func:`pipeline.audio.headroom_gain`).
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
        check_writable(destination.name, format, first.rate, first.channels)
        weights = np.array([gains[stem] for stem in STEMS], dtype=np.float32)
        writer = _write(readers, weights, destination, format)
        if (gain := headroom_gain(writer.peak)) < 1.0:
            writer.discard()
            writer = _write(readers, weights * np.float32(gain), destination, format)
        writer.commit()
    return destination


def _write(
    readers: list[AudioReader], weights: np.ndarray, destination: Path, format: str
) -> AudioWriter:
    """The weighted sum of the readers' audio, complete under a temporary name (see commit)."""
    first = readers[0]
    writer = AudioWriter(destination, first.rate, first.channels, format, first.frames)
    try:
        for blocks in zip(*(reader.blocks() for reader in readers), strict=True):
            writer.write(np.einsum("s,sct->ct", weights, np.stack(blocks)))
        writer.close()
    except BaseException:
        writer.discard()
        raise
    return writer
