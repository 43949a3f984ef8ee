"""The vocal stem: a sung lead line on a voice-like program, and sometimes a backing harmony.

The lead sings phrases of one or two bars separated by breaths. Pitches move mostly by scale steps
with an arch over the phrase, land on chord tones on the beat and resolve at the phrase end.
Choruses sit higher with longer notes, and a section kind that comes back sings the same tune.
Each note gets a singer's pitch curve as pitch bends: an optional scoop into the note, vibrato
that sets in after the attack, and sometimes a fall at the end of a phrase; expression (CC11)
swells on long notes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.synth.music import Feel, Note, Part, chord_at, nearest, scale_pitches
from pipeline.synth.plan import PartSpec, Section, TrackPlan

BEND_RANGE_CENTS = 200.0  # the synthesizer's default pitch-bend range, +-2 semitones
CURVE_RATE = 80.0  # pitch-bend points per second
EXPRESSION_RATE = 25.0  # expression points per second
STEPS = np.array([-3, -2, -1, 0, 1, 2, 3])
STEP_WEIGHTS = np.array([0.04, 0.14, 0.25, 0.15, 0.25, 0.13, 0.04])


@dataclass(frozen=True)
class Singer:
    """The habits of one singer: vibrato rate and depth, how often notes are scooped or dropped."""

    vibrato_hz: float
    vibrato_cents: float
    scoop_chance: float
    fall_chance: float


@dataclass(frozen=True)
class SungNote:
    """A note of a tune: offset from the section start and length in beats, pitch, phrase end."""

    offset: float
    length: float
    pitch: int
    phrase_end: bool


def compose_vocals(
    plan: TrackPlan, specs: tuple[PartSpec, ...], rng: np.random.Generator
) -> list[Part]:
    """The lead vocal (and backing harmony in choruses) in every section with vocals."""
    lead = specs[0].part()
    feel = Feel(rng, plan.swing, plan.swing_unit, plan.seconds_per_beat, timing_sd=0.008)
    singer = Singer(
        vibrato_hz=float(rng.uniform(4.8, 6.5)),
        vibrato_cents=float(rng.uniform(15.0, 40.0)),
        scoop_chance=float(rng.uniform(0.15, 0.5)),
        fall_chance=float(rng.uniform(0.1, 0.4)),
    )
    scale = scale_pitches(plan.key_root, plan.mode, plan.vocal_center - 9, plan.vocal_center + 9)
    tunes: dict[str, list[SungNote]] = {}
    sung: list[tuple[Section, Note]] = []
    for section in plan.sections:
        if "vocals" not in section.stems:
            continue
        length = section.end - section.start
        tune = tunes.get(section.name)
        if tune is None or tune[-1].offset + tune[-1].length < length - plan.beats_per_bar:
            tune = tunes[section.name] = _tune(rng, plan, section, scale)
        loud = 78 + 25 * section.intensity
        for sung_note in tune:
            note = feel.note(
                section.start + sung_note.offset,
                sung_note.length,
                sung_note.pitch,
                loud + (6 if sung_note.offset % 1 == 0 else 0),
                section.start,
                section.end,
            )
            if note is None:
                continue
            lead.notes.append(note)
            sung.append((section, note))
            _sing(lead, note, sung_note.phrase_end, singer, plan.seconds_per_beat, rng)
    parts = [lead]
    if len(specs) > 1:
        parts.append(_harmony(specs[1], sung, plan))
    return parts


def _tune(
    rng: np.random.Generator, plan: TrackPlan, section: Section, scale: list[int]
) -> list[SungNote]:
    """Phrases filling ``section``, each starting on or just after a phrase boundary."""
    length = section.end - section.start
    bar = plan.beats_per_bar
    chorus = section.name == "chorus"
    phrase = bar * (2 if plan.seconds_per_beat * bar < 2.4 else 1)
    center = plan.vocal_center + (3 if chorus else 0)
    cells = [0.5, 1.0, 1.5, 2.0] + ([0.25] if plan.bpm < 100 else [])
    weights = [0.3, 0.35, 0.15, 0.2] if chorus else [0.45, 0.3, 0.1, 0.05]
    weights = np.array(weights + ([0.1] if plan.bpm < 100 else []))
    notes: list[SungNote] = []
    pitch = nearest(scale, center)
    boundary = 0.0
    sung_since_rest = 0
    while boundary < length - 0.5:
        start = boundary + float(rng.choice([0.0, 0.0, 0.5, 1.0])) if notes else boundary
        breath = min(float(rng.choice([0.5, 1.0, 1.5, 2.0])), phrase / 4)  # sing 3/4 or more
        stop = min(boundary + phrase - max(breath, 0.5), length)
        # Now and then a whole phrase of rest, after three sung ones at least (so never the first).
        rest = sung_since_rest >= 3 and rng.random() < 0.12
        sung_since_rest = 0 if rest else sung_since_rest + 1
        if stop - start >= 0.5 and not rest:
            beat = start
            while beat < stop - 1e-9:
                duration = min(float(rng.choice(cells, p=weights / weights.sum())), stop - beat)
                last = stop - (beat + duration) < 0.5
                if last:
                    duration = stop - beat
                progress = (beat - start) / (stop - start)
                pitch = _next_pitch(rng, plan, section, scale, pitch, center, beat, last, progress)
                notes.append(
                    SungNote(beat, duration * 0.94 if last else duration - 0.04, pitch, last)
                )
                beat += duration
        boundary += phrase
    return notes


def _next_pitch(
    rng: np.random.Generator,
    plan: TrackPlan,
    section: Section,
    scale: list[int],
    pitch: int,
    center: int,
    beat: float,
    last: bool,
    progress: float,
) -> int:
    """A step from ``pitch``: rising early in the phrase, falling late, chord tones on the beat."""
    weights = STEP_WEIGHTS.copy()
    weights[STEPS > 0] *= 1.4 if progress < 0.5 else 0.7
    if pitch > center + 5:
        weights[STEPS > 0] *= 0.3
    elif pitch < center - 5:
        weights[STEPS < 0] *= 0.3
    index = scale.index(nearest(scale, pitch))
    step = int(rng.choice(STEPS, p=weights / weights.sum()))
    candidate = scale[int(np.clip(index + step, 0, len(scale) - 1))]
    if beat % 1 == 0 or last:
        chord = chord_at(plan.chords, section.start + beat)
        tones = chord.pitches_in(scale[0], scale[-1])
        if last and rng.random() < 0.6:  # resolve on the root or third
            tones = [p for p in tones if p % 12 in chord.tones[:2]] or tones
        candidate = nearest(tones, candidate)
    return candidate


def _sing(
    part: Part,
    note: Note,
    phrase_end: bool,
    singer: Singer,
    seconds_per_beat: float,
    rng: np.random.Generator,
) -> None:
    """Pitch bends (scoop, vibrato, fall) and an expression swell for one sung note."""
    seconds = (note.end - note.start) * seconds_per_beat
    times = np.arange(0.0, seconds, 1.0 / CURVE_RATE)
    cents = np.zeros_like(times)
    if rng.random() < singer.scoop_chance:
        depth, glide = rng.uniform(60.0, 150.0), rng.uniform(0.05, 0.12)
        cents -= depth * np.clip(1.0 - times / glide, 0.0, 1.0) ** 2
    if seconds > 0.3:
        delay = rng.uniform(0.12, 0.3)
        onset = np.clip((times - delay) / 0.25, 0.0, 1.0)
        cents += (
            singer.vibrato_cents * onset * np.sin(2 * np.pi * singer.vibrato_hz * (times - delay))
        )
    if phrase_end and seconds > 0.3 and rng.random() < singer.fall_chance:
        length = rng.uniform(0.15, 0.25)
        cents -= (
            rng.uniform(100.0, 250.0) * np.clip((times - seconds + length) / length, 0.0, 1.0) ** 2
        )
    values = np.clip(np.round(cents / BEND_RANGE_CENTS * 8191), -8192, 8191).astype(int)
    keep = np.ones(len(values), dtype=bool)
    keep[1:] = values[1:] != values[:-1]
    for time, value in zip(times[keep], values[keep], strict=True):
        part.bends.append((note.start + time / seconds_per_beat, int(value)))
    if seconds > 0.5:
        swell = rng.uniform(8.0, 25.0)
        steps = np.arange(0.0, seconds, 1.0 / EXPRESSION_RATE)
        for time in steps:
            value = round(100 + swell * np.sin(np.pi * time / seconds))
            part.controls.append((note.start + time / seconds_per_beat, 11, value))
    else:
        part.controls.append((note.start, 11, 100))


def _harmony(spec: PartSpec, sung: list[tuple[Section, Note]], plan: TrackPlan) -> Part:
    """A backing voice a third (two scale steps) below the lead, in choruses, light vibrato."""
    part = spec.part()
    part.controls.append((0.0, 1, 30))  # modulation wheel: the preset's own gentle vibrato
    scale = scale_pitches(plan.key_root, plan.mode, plan.vocal_center - 24, plan.vocal_center + 12)
    for section, note in sung:
        if section.name != "chorus":
            continue
        index = scale.index(nearest(scale, note.pitch))
        pitch = scale[max(index - 2, 0)]
        part.notes.append(Note(note.start, note.end, pitch, max(note.velocity - 14, 1)))
    return part
