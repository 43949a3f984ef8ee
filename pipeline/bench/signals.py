"""Test signals for measurements: deterministic music-like audio, made with numpy alone.

Runs on different machines separate the same samples, without data files or system tools.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

BENCH_RATE = 44100  # sample rate of the benchmark audio (stereo)


def bench_audio(seconds: float, rate: int = BENCH_RATE, seed: int = 0) -> np.ndarray:
    """Deterministic music-like stereo (2, samples) float32 at 120 bpm: kick, snare and hi-hat,
    a bass line on a four-chord loop, sustained chords, and a vibrato lead that sings three bars
    in four. Each part has its own stereo position; the peak is about -3 dBFS."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    beat = 0.5
    in_beat, beats = t % beat, (t // beat).astype(np.int64)
    bar = beats // 4
    roots = np.array([110.0, 87.31, 130.81, 98.0])[bar % 4]  # A, F, C, G
    kick = np.sin(2 * np.pi * (50 * in_beat + 4.7 * (1 - np.exp(-15 * in_beat))))
    kick *= np.exp(-in_beat * 18)
    noise = rng.standard_normal(t.size)
    snare = noise * np.exp(-in_beat * 25) * (beats % 2 == 1)
    in_eighth = t % (beat / 2)
    hat = np.diff(noise, prepend=0.0) * np.exp(-in_eighth * 90)
    bass_note = roots * np.where(beats % 4 == 3, 1.5, 1.0)  # root, fifth on the fourth beat
    bass = sum(np.sin(2 * np.pi * k * bass_note * in_beat) / k for k in (1, 2, 3))
    bass *= 1 - np.exp(-in_beat * 60)
    chord = sum(np.sin(2 * np.pi * roots * 2 * ratio * t) for ratio in (1.0, 1.26, 1.5))
    scale = np.array([1.0, 1.125, 1.25, 1.5, 1.667, 2.0])
    melody = roots * 4 * scale[rng.integers(0, len(scale), beats.max() + 1)][beats]
    vibrato = 1 + 0.01 * np.sin(2 * np.pi * 5.5 * t)
    phase = 2 * np.pi * np.cumsum(melody * vibrato) / rate
    lead = sum(np.sin(k * phase) * 0.6**k for k in range(1, 6)) * (bar % 4 != 3)
    lead *= np.minimum(1, in_beat * 40)
    parts = [(kick, 0.5, 0.0), (snare, 0.15, -0.2), (hat, 0.05, 0.5), (bass, 0.25, 0.0)]
    parts += [(chord, 0.08, -0.6), (lead, 0.2, 0.3)]
    left = sum(gain * np.sqrt((1 - pan) / 2) * part for part, gain, pan in parts)
    right = sum(gain * np.sqrt((1 + pan) / 2) * part for part, gain, pan in parts)
    audio = np.stack([left, right])
    return (audio * (0.7 / np.abs(audio).max())).astype(np.float32)


def write_long_track(
    path: Path, minutes: float, rate: int = 44100, channels: int = 2, seed: int = 0
) -> Path:
    """A music-like FLAC of ``minutes``, written one minute at a time (each minute its own
    :func:`bench_audio` seed, so the file does not repeat; ``seed`` makes
    another file)."""
    total = round(minutes * 60 * rate)
    with sf.SoundFile(path, "w", rate, channels, format="FLAC", subtype="PCM_16") as file:
        for minute, start in enumerate(range(0, total, 60 * rate)):
            seconds = min(60 * rate, total - start) / rate
            block = bench_audio(seconds, rate, seed=minute + 100_000 * seed)[:channels]
            file.write(block.T)
    return path
