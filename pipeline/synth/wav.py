"""A minimal WAV writer whose output depends on the samples alone.

libsndfile stamps the current time into the PEAK chunk of float WAV files, so two writes of the
same audio differ. This writer emits only the format, (fact) and data chunks: 16-bit PCM, or
32-bit IEEE float with the ``fact`` chunk the WAV specification asks of non-PCM data.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

PCM, IEEE_FLOAT = 1, 3


def write_wav(path: Path, audio: np.ndarray, rate: int) -> None:
    """Write (channels, samples) ``audio``, int16 as 16-bit PCM or float32 as 32-bit float."""
    if audio.dtype == np.int16:
        fmt_tag, width, data_type = PCM, 2, "<i2"
    elif audio.dtype == np.float32:
        fmt_tag, width, data_type = IEEE_FLOAT, 4, "<f4"
    else:
        raise TypeError(f"write_wav takes int16 or float32 audio, not {audio.dtype}")
    channels, samples = audio.shape
    data = np.ascontiguousarray(audio.T, dtype=data_type).tobytes()
    layout = struct.pack(
        "<HHIIHH", fmt_tag, channels, rate, rate * channels * width, channels * width, 8 * width
    )
    if fmt_tag == PCM:
        chunks = _chunk(b"fmt ", layout)
    else:
        chunks = _chunk(b"fmt ", layout + struct.pack("<H", 0)) + _chunk(
            b"fact", struct.pack("<I", samples)
        )
    chunks += _chunk(b"data", data)
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    padding = b"\0" if len(payload) % 2 else b""
    return kind + struct.pack("<I", len(payload)) + payload + padding
