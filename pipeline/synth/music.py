"""Music theory and the note-level model that the composers fill and the MIDI writer reads.

Times are in beats from the start of the track: the grid of the music, independent of tempo.
Pitches are MIDI note numbers; pitch classes are 0..11 with 0 = C.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

PITCH_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")

# Scales as semitones above the tonic. Dorian and mixolydian give modal colour to minor and major.
MODES: dict[str, tuple[int, ...]] = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
    "dorian": (0, 2, 3, 5, 7, 9, 10),
    "mixolydian": (0, 2, 4, 5, 7, 9, 10),
}

# Chord progressions as scale degrees (0 = tonic), one chord per harmonic slot, per mode family.
PROGRESSIONS: dict[str, tuple[tuple[int, ...], ...]] = {
    "major": (
        (0, 4, 5, 3),
        (0, 3, 4, 3),
        (5, 3, 0, 4),
        (0, 5, 3, 4),
        (1, 4, 0, 0),
        (0, 3, 0, 4),
        (3, 4, 2, 5),
        (0, 2, 3, 4),
        (3, 0, 4, 5),
    ),
    "minor": (
        (0, 5, 2, 6),
        (0, 3, 4, 0),
        (0, 6, 5, 6),
        (0, 3, 6, 2),
        (0, 5, 3, 4),
        (5, 6, 0, 0),
        (0, 0, 3, 4),
    ),
    "dorian": ((0, 3, 0, 3), (0, 1, 2, 1), (0, 6, 3, 0)),
    "mixolydian": ((0, 6, 3, 0), (0, 3, 6, 3), (0, 6, 0, 4)),
}


@dataclass(frozen=True)
class Chord:
    """A chord sounding from ``start`` to ``end`` (beats): its root and its pitch classes."""

    start: float
    end: float
    root: int
    tones: tuple[int, ...]  # pitch classes, root first, then third, fifth (and seventh)

    def pitches_in(self, low: int, high: int) -> list[int]:
        """All MIDI pitches of the chord's pitch classes within ``[low, high]``."""
        return [p for p in range(low, high + 1) if p % 12 in self.tones]


@dataclass(frozen=True)
class Note:
    """One note: onset and release in beats, MIDI pitch and velocity (1..127)."""

    start: float
    end: float
    pitch: int
    velocity: int


@dataclass
class Part:
    """One instrument of a stem, rendered on its own MIDI channel.

    ``bends`` are (beat, value) pitch-bend points (value -8192..8191, +-2 semitones) and
    ``controls`` (beat, controller, value) changes, e.g. expression (11) swells.
    """

    role: str
    program: int
    is_drum: bool = False
    pan: int = 64
    volume: int = 100
    reverb: int = 0
    chorus: int = 0
    notes: list[Note] = field(default_factory=list)
    bends: list[tuple[float, int]] = field(default_factory=list)
    controls: list[tuple[float, int, int]] = field(default_factory=list)


def key_name(root: int, mode: str) -> str:
    """A readable key such as ``"F# minor"``."""
    return f"{PITCH_NAMES[root % 12]} {mode}"


def diatonic_chord(root: int, mode: str, degree: int, seventh: bool = False) -> tuple[int, ...]:
    """Pitch classes of the chord built in thirds on ``degree`` of the scale of ``root``/``mode``."""
    scale = MODES[mode]
    steps = (0, 2, 4, 6) if seventh else (0, 2, 4)
    return tuple((root + scale[(degree + step) % 7]) % 12 for step in steps)


def scale_pitches(root: int, mode: str, low: int, high: int) -> list[int]:
    """All MIDI pitches of the scale within ``[low, high]``, ascending."""
    classes = {(root + step) % 12 for step in MODES[mode]}
    return [p for p in range(low, high + 1) if p % 12 in classes]


def nearest(pitches: list[int], target: float) -> int:
    """The pitch of ``pitches`` closest to ``target`` (the lower one on a tie)."""
    return min(pitches, key=lambda p: (abs(p - target), p))


def chord_at(chords: tuple[Chord, ...], beat: float) -> Chord:
    """The chord sounding at ``beat`` (the last one for beats past the end)."""
    for chord in chords:
        if chord.start <= beat < chord.end:
            return chord
    return chords[-1]


def swing_time(beat: float, swing: float, unit: float) -> float:
    """Move ``beat`` onto a swung grid: the second ``unit`` of each pair starts ``swing`` late.

    The map is piecewise linear within each pair of units, so finer subdivisions follow the feel.
    """
    pair = 2 * unit
    base = math.floor(beat / pair + 1e-9) * pair
    offset = beat - base
    if offset < unit:
        return base + offset * (1 + swing)
    return base + unit * (1 + swing) + (offset - unit) * (1 - swing)


@dataclass
class Feel:
    """Swing plus a player's timing and dynamics: turns grid positions into played notes."""

    rng: np.random.Generator
    swing: float
    swing_unit: float
    seconds_per_beat: float
    timing_sd: float = 0.006  # seconds
    velocity_sd: float = 5.0

    def note(
        self, beat: float, length: float, pitch: int, velocity: float, low: float, high: float
    ) -> Note | None:
        """A note on the grid at ``beat`` for ``length`` beats, kept within ``[low, high)``.

        Returns None when no audible note fits before ``high``.
        """
        jitter = self.rng.normal(0.0, self.timing_sd) / self.seconds_per_beat
        start = max(swing_time(beat, self.swing, self.swing_unit) + jitter, low)
        end = min(swing_time(beat + length, self.swing, self.swing_unit), high)
        shortest = 0.04 / self.seconds_per_beat
        if end - start < shortest:
            end = start + shortest
        if end > high or start >= high:
            return None
        loudness = int(np.clip(round(velocity + self.rng.normal(0.0, self.velocity_sd)), 1, 127))
        return Note(start, end, int(pitch), loudness)
