"""The bass and "other" stems: parts that follow the chord timeline of the plan.

The bass plays one of the style's patterns on each chord (roots, fifths, octaves, walking lines,
approach notes). The accompaniment parts each take a role: sustained ``pad`` voicings, rhythmic
``comp`` chords, guitar ``strum`` with spread strings, ``power`` chords, and ``arp`` arpeggios.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.synth.music import Chord, Feel, Part
from pipeline.synth.plan import PartSpec, Section, TrackPlan

BASS_RANGE = (28, 55)  # E1..G3

# Bass rhythms, one bar of sixteenth steps; each onset plays a chord tone named in ``BASS_TONES``.
SYNCOPATED_BASS = ("x.....x...x.....", "x..x..x...x.....", "x.....x.x...x...", "x..x....x..x..x.")
FUNK_BASS = ("x..x..x.x..x.x..", "x.x..xx...x..x..", "x..x.x..xx....x.")
BASS_TONES = {"R": 0, "5": 7, "8": 12}

COMP_RHYTHMS: dict[str, tuple[str, ...]] = {
    "rock": ("x.x.x.x.x.x.x.x.", "x...x...x...x..."),
    "pop": ("x..x..x...x.x...", "x...x...x...x...", "x.x.x.x.x.x.x.x."),
    "disco": ("..x...x...x...x.",),
    "funk": ("x..x.x..x.x..x..", ".x.x..x..x.x..x."),
    "hiphop": ("x.........x.....", "x.......x......."),
    "shuffle": ("x.x.x.x.x.x.x.x.", "x...x...x...x..."),
    "halftime": ("x.......x.......",),
    "jazz": ("x.....x.........", "...x......x.....", "x.......x..x...."),
    "reggae": ("..x...x...x...x.",),
    "waltz": ("....x...x...", "x...x...x..."),
}
STACCATO_STYLES = ("disco", "funk", "reggae")
STRUM_RHYTHMS = ("x.x.x.x.", "x.xx.xx.", "x..x..x.", "x.x..xx.")  # eighth-note steps


def compose_bass(plan: TrackPlan, spec: PartSpec, rng: np.random.Generator) -> Part:
    """The bass line: the plan's bass pattern on every chord of the sections with bass."""
    part = spec.part()
    feel = Feel(rng, plan.swing, plan.swing_unit, plan.seconds_per_beat, timing_sd=0.005)
    low = int(rng.integers(BASS_RANGE[0], BASS_RANGE[0] + 8))
    for section in _playing(plan, "bass"):
        loud = 82 + 25 * section.intensity
        chords = _chords_in(plan, section)
        for index, chord in enumerate(chords):
            root = low + (chord.root - low) % 12
            following = chords[index + 1] if index + 1 < len(chords) else chord
            for offset, length, pitch, accent in _bass_events(plan, rng, chord, root, following):
                note = feel.note(
                    chord.start + offset, length, pitch, loud * accent, section.start, section.end
                )
                if note is not None:
                    part.notes.append(note)
    return part


def _bass_events(
    plan: TrackPlan, rng: np.random.Generator, chord: Chord, root: int, following: Chord
) -> list[tuple[float, float, int, float]]:
    """(offset, length, pitch, accent) of the bass notes on one chord."""
    length = chord.end - chord.start
    bar = plan.beats_per_bar
    third = root + (chord.tones[1] - chord.root) % 12
    fifth = root + 7 if root + 7 <= BASS_RANGE[1] else root - 5
    pattern = plan.bass_pattern
    events: list[tuple[float, float, int, float]] = []
    if pattern == "sustained":
        beat = 0.0
        while beat < length:  # re-struck every bar, held almost to the next
            events.append((beat, min(bar, length - beat) * 0.95, root, 1.0))
            beat += bar
    elif pattern in ("eighths", "octaves"):
        for index in range(int(length / 0.5)):
            pitch = root + 12 * (index % 2) if pattern == "octaves" else root
            events.append((index * 0.5, 0.45, pitch, 1.0 if index % 2 == 0 else 0.85))
    elif pattern == "root_fifth":
        for index in range(int(length)):
            events.append((float(index), 0.9, root if index % 2 == 0 else fifth, 1.0))
    elif pattern in ("syncopated", "funk"):
        rhythms = FUNK_BASS if pattern == "funk" else SYNCOPATED_BASS
        staccato = pattern == "funk"
        for bar_start in np.arange(0.0, length, bar):
            rhythm = rhythms[int(rng.integers(len(rhythms)))]
            onsets = [i * 0.25 for i, symbol in enumerate(rhythm) if symbol == "x"]
            for onset, following_onset in zip(onsets, [*onsets[1:], float(bar)], strict=True):
                tone = "R" if onset == 0 else str(rng.choice(["R", "R", "8", "5"]))
                gap = following_onset - onset
                events.append(
                    (
                        bar_start + onset,
                        0.2 if staccato else gap * 0.9,
                        root + BASS_TONES[tone],
                        1.0,
                    )
                )
    elif pattern == "boogie":
        sixth = root + (9 if (third - root) == 4 else 8)
        line = (root, third, fifth, sixth, root + 10, sixth, fifth, third)
        for index in range(int(length / 0.5)):
            events.append((index * 0.5, 0.45, line[index % len(line)], 1.0))
    elif pattern == "walking":
        events += _walking(rng, chord, root, following, length)
    elif pattern == "reggae":
        for bar_start in np.arange(0.0, length, bar):
            riddim = (
                (0.5, 0.45, root),
                (1.0, 0.9, root),
                (2.0, 0.45, fifth),
                (2.5, 0.9, root + 12),
            )
            events += [(bar_start + onset, dur, pitch, 1.0) for onset, dur, pitch in riddim]
    else:  # waltz: root on one, fifth on the last beat
        for bar_start in np.arange(0.0, length, bar):
            events += [(bar_start, bar - 1.1, root, 1.0), (bar_start + bar - 1, 0.9, fifth, 0.85)]
    if len(events) > 1 and pattern != "walking" and rng.random() < 0.3:
        offset, dur, _, accent = events[-1]  # approach the next chord from a semitone away
        target = root + (following.root - chord.root) % 12
        events[-1] = (offset, dur, target + (1 if rng.random() < 0.5 else -1), accent)
    return [(o, min(d, length - o), p, a) for o, d, p, a in events if o < length]


def _walking(
    rng: np.random.Generator, chord: Chord, root: int, following: Chord, length: float
) -> list[tuple[float, float, int, float]]:
    """Quarter notes: root first, chord and scale tones after, a chromatic approach last."""
    target = root + (following.root - chord.root) % 12
    tones = chord.pitches_in(root, root + 12)
    events = []
    beats = int(length)
    for beat in range(beats):
        if beat == 0:
            pitch = root
        elif beat == beats - 1:
            pitch = target + (1 if rng.random() < 0.5 else -1)
        else:
            pitch = int(rng.choice(tones))
        events.append((float(beat), 0.92, pitch, 1.0 if beat % 2 == 0 else 0.9))
    return events


def compose_other(
    plan: TrackPlan, specs: tuple[PartSpec, ...], rng: np.random.Generator
) -> list[Part]:
    """The accompaniment: the first part plays in every section with "other", the rest in some."""
    parts = []
    playing = _playing(plan, "other")
    for index, spec in enumerate(specs):
        feel = Feel(rng, plan.swing, plan.swing_unit, plan.seconds_per_beat)
        player = _Player(spec.part(), feel, rng, plan, int(rng.integers(58, 68)))
        for section in playing:
            if index and rng.random() > 0.35 + 0.55 * section.intensity:
                continue
            ROLES[spec.role](player, section)
        parts.append(player.part)
    return parts


@dataclass
class _Player:
    """One accompaniment part being played: the part its notes go to, its feel, the random
    draws, the track's plan and the middle of the part's range."""

    part: Part
    feel: Feel
    rng: np.random.Generator
    plan: TrackPlan
    center: int


def _pad(player: _Player, section: Section) -> None:
    """Sustained voicings, one per chord, with the root doubled below now and then."""
    previous = float(player.center)
    loud = 58 + 25 * section.intensity
    for chord in _chords_in(player.plan, section):
        voicing = _voicing(chord, previous, size=4 if len(chord.tones) > 3 else 3)
        previous = float(np.mean(voicing))
        if player.rng.random() < 0.3:
            voicing = [voicing[0] - 12, *voicing]
        _add_chord(player, chord.start, chord.end - chord.start - 0.05, voicing, loud, section)


def _comp(player: _Player, section: Section) -> None:
    """Rhythmic block chords on the style's comping rhythm; short in funk, disco and reggae."""
    rhythms = COMP_RHYTHMS[player.plan.style]
    staccato = player.plan.style in STACCATO_STYLES
    previous = float(player.center)
    loud = 65 + 30 * section.intensity
    for chord in _chords_in(player.plan, section):
        voicing = _voicing(chord, previous, size=3 + int(player.rng.random() < 0.4))
        previous = float(np.mean(voicing))
        rhythm = rhythms[int(player.rng.integers(len(rhythms)))]
        onsets = [step * 0.25 for step, symbol in enumerate(rhythm) if symbol == "x"]
        for bar_start in np.arange(chord.start, chord.end, player.plan.beats_per_bar):
            for onset, following in zip(
                onsets, [*onsets[1:], float(player.plan.beats_per_bar)], strict=True
            ):
                if bar_start + onset >= chord.end or player.rng.random() < 0.08:
                    continue
                length = 0.2 if staccato else (following - onset) * 0.9
                _add_chord(player, bar_start + onset, length, voicing, loud, section)


def _strum(player: _Player, section: Section) -> None:
    """Guitar strums: up to six strings spread over a few milliseconds, down and up strokes."""
    rhythm = STRUM_RHYTHMS[int(player.rng.integers(len(STRUM_RHYTHMS)))]
    spread = 0.012 / player.plan.seconds_per_beat
    loud = 62 + 30 * section.intensity
    for chord in _chords_in(player.plan, section):
        strings = _guitar_voicing(chord)
        for bar_start in np.arange(chord.start, chord.end, player.plan.beats_per_bar):
            for step, symbol in enumerate(rhythm[: player.plan.beats_per_bar * 2]):
                beat = bar_start + step * 0.5
                if symbol != "x" or beat >= chord.end:
                    continue
                down = step % 2 == 0
                played = strings if down else strings[::-1][:4]
                for order, pitch in enumerate(played):
                    note = player.feel.note(
                        beat + order * spread,
                        0.95,
                        pitch,
                        loud * (1.0 if down else 0.8),
                        section.start,
                        min(chord.end, section.end),
                    )
                    if note is not None:
                        player.part.notes.append(note)


def _power(player: _Player, section: Section) -> None:
    """Power chords (root, fifth, octave): eighth-note chugs, or held in loud sections."""
    held = section.intensity > 0.7 and player.rng.random() < 0.5
    loud = 75 + 25 * section.intensity
    for chord in _chords_in(player.plan, section):
        root = 40 + (chord.root - 40) % 12
        voicing = [root, root + 7, root + 12]
        if held:
            _add_chord(player, chord.start, chord.end - chord.start - 0.1, voicing, loud, section)
            continue
        for beat in np.arange(chord.start, chord.end, 0.5):
            accent = 1.0 if (beat - chord.start) % 1 == 0 else 0.85
            _add_chord(player, float(beat), 0.35, voicing, loud * accent, section)


def _arp(player: _Player, section: Section) -> None:
    """Arpeggios over one and a half octaves: up, down or up-and-down, in eighths or sixteenths."""
    step = 0.25 if player.plan.bpm <= 115 else 0.5
    shape = str(player.rng.choice(["up", "down", "updown"]))
    loud = 60 + 30 * section.intensity
    for chord in _chords_in(player.plan, section):
        tones = chord.pitches_in(player.center - 5, player.center + 14)
        if shape == "down":
            tones = tones[::-1]
        elif shape == "updown":
            tones = tones + tones[-2:0:-1]
        for index, beat in enumerate(np.arange(chord.start, chord.end, step)):
            accent = 1.0 if (beat - chord.start) % 1 == 0 else 0.85
            pitch = tones[index % len(tones)]
            note = player.feel.note(
                float(beat), step * 1.5, pitch, loud * accent, section.start, section.end
            )
            if note is not None:
                player.part.notes.append(note)


ROLES = {"pad": _pad, "comp": _comp, "strum": _strum, "power": _power, "arp": _arp}


def _playing(plan: TrackPlan, stem: str) -> list[Section]:
    return [section for section in plan.sections if stem in section.stems]


def _chords_in(plan: TrackPlan, section: Section) -> list[Chord]:
    return [chord for chord in plan.chords if section.start <= chord.start < section.end]


def _voicing(chord: Chord, center: float, size: int) -> list[int]:
    """A close-position voicing of ``size`` notes whose middle lies nearest to ``center``."""
    candidates = []
    for bottom in chord.pitches_in(int(center) - 12, int(center) + 6):
        stack = [bottom]
        while len(stack) < size:
            stack.append(chord.pitches_in(stack[-1] + 1, stack[-1] + 12)[0])
        candidates.append(stack)
    return min(candidates, key=lambda stack: (abs(np.mean(stack) - center), stack[0]))


def _guitar_voicing(chord: Chord) -> list[int]:
    """Up to six strings from a low root, chord tones at least three semitones apart."""
    root = 40 + (chord.root - 40) % 12
    strings = [root]
    for pitch in chord.pitches_in(root + 3, root + 26):
        if pitch - strings[-1] >= 3 and len(strings) < 6:
            strings.append(pitch)
    return strings


def _add_chord(
    player: _Player,
    beat: float,
    length: float,
    pitches: list[int],
    loudness: float,
    section: Section,
) -> None:
    for pitch in pitches:
        note = player.feel.note(beat, length, pitch, loudness, section.start, section.end)
        if note is not None:
            player.part.notes.append(note)
