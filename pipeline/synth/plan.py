"""The plan of one synthetic track: every musical decision above the note level.

``plan_track(seed, seconds)`` picks a style, tempo, meter, key and mode, a song form whose
sections switch stems on and off (vocals never play in intros, drums never in breakdowns, and
every stem plays in sections that make up ``PLAN_SHARE`` of the track), the chord progressions, the instruments of every stem with their pan, level and effect sends, and the
per-stem gains. The composers (``drums``, ``harmony``, ``vocals``) turn it into notes. Everything
is drawn from a generator seeded by ``seed`` alone, so the seed rebuilds the track.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from model import STEMS
from pipeline.synth.music import PROGRESSIONS, Chord, Part, diatonic_chord, key_name

TEMPO_RANGE = (70, 170)  # bpm, every style's range lies within it


@dataclass(frozen=True)
class Style:
    """A groove family: tempo range, meter, swing and the instruments and patterns that fit."""

    tempo: tuple[int, int]
    beats_per_bar: int
    swing: tuple[float, float]  # delay of the off-beat subdivision, as a fraction of it
    swing_unit: float  # the swung subdivision in beats: 0.5 (eighths) or 0.25 (sixteenths)
    kits: tuple[int, ...]  # GM drum kits (bank 128 programs)
    bass: tuple[str, ...]  # bass pattern names (see pipeline.synth.harmony)
    roles: dict[str, float]  # weights of the accompaniment roles of the "other" stem
    weight: float  # how often the style is drawn


STYLES: dict[str, Style] = {
    "rock": Style(
        (100, 160), 4, (0.0, 0.0), 0.5, (0, 8, 16), ("eighths", "root_fifth", "sustained"),
        {"power": 3, "strum": 2, "comp": 2, "pad": 1, "arp": 1}, 3.0,
    ),
    "pop": Style(
        (85, 130), 4, (0.0, 0.06), 0.25, (0, 8, 24), ("syncopated", "eighths", "sustained"),
        {"comp": 3, "pad": 2, "arp": 2, "strum": 2}, 3.0,
    ),
    "disco": Style(
        (110, 130), 4, (0.0, 0.0), 0.25, (24, 25, 0), ("octaves", "syncopated"),
        {"comp": 3, "pad": 2, "arp": 2}, 1.5,
    ),
    "funk": Style(
        (90, 118), 4, (0.0, 0.12), 0.25, (0, 8), ("funk", "octaves"),
        {"comp": 4, "pad": 1, "arp": 1}, 1.5,
    ),
    "hiphop": Style(
        (70, 100), 4, (0.1, 0.3), 0.25, (25, 24, 0), ("sustained", "syncopated"),
        {"pad": 2, "comp": 2, "arp": 2}, 1.5,
    ),
    "shuffle": Style(
        (80, 140), 4, (0.33, 0.33), 0.5, (0, 8, 32), ("boogie", "root_fifth"),
        {"comp": 3, "strum": 1, "power": 1, "pad": 1}, 1.0,
    ),
    "halftime": Style(
        (130, 170), 4, (0.0, 0.0), 0.25, (0, 16, 25), ("sustained", "eighths"),
        {"pad": 2, "power": 2, "arp": 2, "comp": 1}, 1.0,
    ),
    "jazz": Style(
        (100, 170), 4, (0.25, 0.33), 0.5, (32, 40), ("walking",),
        {"comp": 3, "pad": 1, "arp": 1}, 1.0,
    ),
    "reggae": Style(
        (70, 95), 4, (0.0, 0.12), 0.25, (0, 8), ("reggae",),
        {"comp": 3, "pad": 1, "arp": 1}, 1.0,
    ),
    "waltz": Style(
        (80, 160), 3, (0.0, 0.0), 0.5, (0, 32, 40), ("waltz", "sustained"),
        {"strum": 2, "comp": 2, "pad": 2, "arp": 2}, 1.0,
    ),
}  # fmt: skip

# GM programs that can take each accompaniment role of the "other" stem.
ROLE_PROGRAMS: dict[str, tuple[int, ...]] = {
    "pad": (48, 49, 50, 51, 88, 89, 90, 92, 94, 95, 19),
    "comp": (0, 1, 2, 4, 5, 7, 16, 17, 18, 27, 61, 62),
    "strum": (24, 25, 26, 27),
    "power": (29, 30),
    "arp": (0, 4, 6, 8, 9, 10, 11, 12, 13, 46, 80, 81, 24, 25),
}
BASS_PROGRAMS = (32, 33, 34, 35, 36, 37, 38, 39)
VOCAL_PROGRAMS = (85, 54, 53, 52)  # solo vox, synth voice, voice oohs, choir aahs
VOCAL_WEIGHTS = (0.35, 0.25, 0.25, 0.15)
HARMONY_PROGRAMS = (52, 53)

MODE_WEIGHTS = {"major": 0.45, "minor": 0.4, "dorian": 0.08, "mixolydian": 0.07}

# Song forms; a track is a window of one, extended with verse/chorus pairs when too short.
FORMS: tuple[tuple[str, ...], ...] = (
    ("intro", "verse", "chorus", "verse", "chorus", "breakdown", "chorus", "outro"),
    ("intro", "verse", "verse", "chorus", "breakdown", "chorus", "chorus", "outro"),
    ("intro", "chorus", "verse", "chorus", "breakdown", "verse", "chorus", "outro"),
    ("verse", "chorus", "verse", "chorus", "breakdown", "chorus", "outro"),
    ("intro", "verse", "chorus", "breakdown", "verse", "chorus", "outro"),
    ("intro", "breakdown", "verse", "chorus", "outro"),
)
SECTION_SECONDS = {
    "intro": (4.0, 9.0),
    "verse": (7.0, 15.0),
    "chorus": (7.0, 15.0),
    "breakdown": (4.0, 10.0),
    "outro": (4.0, 9.0),
}
# Probability that a stem plays in a section of each kind. Intros have no vocals and breakdowns no
# drums, always; the "other" stem carries the intros, breakdowns and outros.
PRESENCE: dict[str, dict[str, float]] = {
    "intro": {"drums": 0.5, "bass": 0.5, "other": 1.0, "vocals": 0.0},
    "verse": {"drums": 0.9, "bass": 0.95, "other": 0.9, "vocals": 1.0},
    "chorus": {"drums": 1.0, "bass": 1.0, "other": 1.0, "vocals": 1.0},
    "breakdown": {"drums": 0.0, "bass": 0.4, "other": 1.0, "vocals": 0.5},
    "outro": {"drums": 0.5, "bass": 0.6, "other": 1.0, "vocals": 0.3},
}
INTENSITY = {"intro": 0.3, "verse": 0.55, "chorus": 0.9, "breakdown": 0.3, "outro": 0.5}
# Every stem plays in sections that make up at least this share of the track, so that it sounds
# in well over 40% of it (a scorer such as museval cannot use a silent reference).
PLAN_SHARE = 0.6
SINGLE_SECTION_SECONDS = 16.0  # shorter tracks are one verse or chorus with all four stems


@dataclass(frozen=True)
class Section:
    """A section of the track, ``start``..``end`` in beats, and the stems that play in it."""

    name: str
    start: float
    end: float
    stems: tuple[str, ...]
    intensity: float  # 0..1: how busy and loud the parts are


@dataclass(frozen=True)
class PartSpec:
    """An instrument of a stem: its role for the composer, GM program, pan and levels."""

    role: str
    program: int
    pan: int  # MIDI CC10, 64 = centre
    volume: int  # MIDI CC7
    reverb: int  # MIDI CC91 send, used when effects are on
    chorus: int  # MIDI CC93 send, used when effects are on

    def part(self, is_drum: bool = False) -> Part:
        """An empty part playing this instrument, for a composer to fill."""
        return Part(
            self.role, self.program, is_drum, self.pan, self.volume, self.reverb, self.chorus
        )


@dataclass(frozen=True)
class TrackPlan:
    """Every decision about one track above the note level (see the module docstring)."""

    seed: int
    seconds: float
    style: str
    bpm: int
    tempo_us: int  # microseconds per beat, as written to the MIDI file
    beats_per_bar: int
    swing: float
    swing_unit: float
    key_root: int
    mode: str
    sections: tuple[Section, ...]
    chords: tuple[Chord, ...]
    parts: dict[str, tuple[PartSpec, ...]]  # per stem
    bass_pattern: str
    vocal_center: int  # MIDI pitch at the middle of the singer's range
    gains_db: dict[str, float]  # per stem, before the track is scaled to ``peak_db``
    peak_db: float  # peak level of the loudest file of the track, dBFS

    @property
    def seconds_per_beat(self) -> float:
        return self.tempo_us / 1e6

    @property
    def total_beats(self) -> float:
        return self.seconds / self.seconds_per_beat

    @property
    def key(self) -> str:
        return key_name(self.key_root, self.mode)

    def section_times(self) -> list[dict]:
        """The sections in seconds, as stored in the index."""
        spb = self.seconds_per_beat
        return [
            {
                "name": section.name,
                "start": section.start * spb,
                "end": min(section.end * spb, self.seconds),
                "stems": list(section.stems),
            }
            for section in self.sections
        ]


def plan_track(seed: int, seconds: float) -> TrackPlan:
    """Draw the plan of a track of ``seconds`` from ``seed`` (same seed, same plan)."""
    rng = np.random.default_rng([seed, 0])
    style_name = _choice(rng, {name: style.weight for name, style in STYLES.items()})
    style = STYLES[style_name]
    bpm = int(rng.integers(style.tempo[0], style.tempo[1] + 1))
    tempo_us = round(60e6 / bpm)
    beats_per_bar = style.beats_per_bar
    bar_seconds = beats_per_bar * tempo_us / 1e6
    mode = _choice(rng, MODE_WEIGHTS)
    key_root = int(rng.integers(12))
    total_beats = seconds * 1e6 / tempo_us
    sections = _sections(rng, seconds, total_beats, beats_per_bar, bar_seconds)
    chords = _chords(rng, sections, key_root, mode, style_name, beats_per_bar, bar_seconds)
    parts = {
        "drums": (_part_spec(rng, "kit", int(rng.choice(style.kits)), pan_width=10),),
        "bass": (_part_spec(rng, "bass", int(rng.choice(BASS_PROGRAMS)), pan_width=8),),
        "other": _other_specs(rng, style),
        "vocals": _vocal_specs(rng),
    }
    return TrackPlan(
        seed=seed,
        seconds=seconds,
        style=style_name,
        bpm=bpm,
        tempo_us=tempo_us,
        beats_per_bar=beats_per_bar,
        swing=float(rng.uniform(*style.swing)),
        swing_unit=style.swing_unit,
        key_root=key_root,
        mode=mode,
        sections=sections,
        chords=chords,
        parts=parts,
        bass_pattern=str(rng.choice(style.bass)),
        vocal_center=int(rng.integers(57, 69)),
        gains_db={
            stem: float(rng.uniform(-5.0 if stem == "vocals" else -9.0, 0.0)) for stem in STEMS
        },
        peak_db=float(rng.uniform(-6.0, -1.0)),
    )


def _choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    probabilities = np.array([weights[name] for name in names], dtype=float)
    return names[int(rng.choice(len(names), p=probabilities / probabilities.sum()))]


def _section_bars(rng: np.random.Generator, name: str, bar_seconds: float) -> int:
    """A section length in bars near a natural duration; even when longer than two bars."""
    bars = max(1, round(rng.uniform(*SECTION_SECONDS[name]) / bar_seconds))
    return bars + bars % 2 if bars > 2 else bars


def _sections(
    rng: np.random.Generator,
    seconds: float,
    total_beats: float,
    beats_per_bar: int,
    bar_seconds: float,
) -> tuple[Section, ...]:
    """The sections of the track and the stems that play in each (see ``PLAN_SHARE``).

    A short track is one section with every stem; a longer one a window of a song form, with
    intros or breakdowns turned into verses where they would keep the vocals or the drums out of
    too much of it, and stems added to sections until each plays in ``PLAN_SHARE`` of the track.
    """
    if seconds < SINGLE_SECTION_SECONDS:
        name = "chorus" if rng.random() < 0.5 else "verse"
        return (dataclasses.replace(_section(rng, name, 0.0, total_beats), stems=STEMS),)
    spans = _opened(_form(rng, total_beats, beats_per_bar, bar_seconds), total_beats)
    sections = []
    for index, (name, start, end) in enumerate(spans):
        first_verse = name == "verse" and all(span[0] != "verse" for span in spans[:index])
        sections.append(_section(rng, name, start, end, first_verse))
    return _filled(sections, total_beats)


def _form(
    rng: np.random.Generator, total_beats: float, beats_per_bar: int, bar_seconds: float
) -> list[tuple[str, float, float]]:
    """(name, start, end) of a window of a song form covering ``total_beats``."""
    form = list(FORMS[int(rng.integers(len(FORMS)))])
    start = 0 if rng.random() < 0.5 else int(rng.integers(len(form)))
    names = form[start:]
    lengths = [_section_bars(rng, name, bar_seconds) for name in names]
    total_bars = math.ceil(total_beats / beats_per_bar - 1e-9)
    while sum(lengths) < total_bars:  # too short: keep going with verse/chorus before the outro
        insert_at = len(names) - 1 if names[-1] == "outro" else len(names)
        for name in ("verse", "chorus"):
            names.insert(insert_at, name)
            lengths.insert(insert_at, _section_bars(rng, name, bar_seconds))
            insert_at += 1
    spans: list[tuple[str, float, float]] = []
    beat = 0.0
    for name, bars in zip(names, lengths, strict=True):
        end = min(beat + bars * beats_per_bar, total_beats)
        if end >= total_beats and total_beats - beat < beats_per_bar and spans:
            spans[-1] = (*spans[-1][:2], total_beats)  # no sliver of a section at the end
            break
        spans.append((name, beat, end))
        beat = end
        if beat >= total_beats:
            break
    return spans


def _opened(
    spans: list[tuple[str, float, float]], total_beats: float
) -> list[tuple[str, float, float]]:
    """Turn the longest intros (no vocals) and breakdowns (no drums) into verses while they keep
    a stem out of more than ``1 - PLAN_SHARE`` of the track."""
    spans = list(spans)
    for closed in ("intro", "breakdown"):
        while (
            _beats(spans, [name != closed for name, _, _ in spans])
            < PLAN_SHARE * total_beats - 1e-9
        ):
            index = max(
                (i for i, span in enumerate(spans) if span[0] == closed),
                key=lambda i: (spans[i][2] - spans[i][1], -i),
            )
            spans[index] = ("verse", *spans[index][1:])
    return spans


def _filled(sections: list[Section], total_beats: float) -> tuple[Section, ...]:
    """Add each stem to sections it sits out (the kind where it is likeliest first, then the
    longest) until it plays in ``PLAN_SHARE`` of the track."""
    playing = [set(section.stems) for section in sections]
    spans = [(section.name, section.start, section.end) for section in sections]
    for stem in STEMS:
        while _beats(spans, [stem in stems for stems in playing]) < PLAN_SHARE * total_beats - 1e-9:
            index = max(
                (
                    i
                    for i, (name, _, _) in enumerate(spans)
                    if stem not in playing[i] and PRESENCE[name][stem] > 0
                ),
                key=lambda i: (PRESENCE[spans[i][0]][stem], spans[i][2] - spans[i][1], -i),
            )
            playing[index].add(stem)
    return tuple(
        dataclasses.replace(section, stems=tuple(stem for stem in STEMS if stem in stems))
        for section, stems in zip(sections, playing, strict=True)
    )


def _beats(spans: list[tuple[str, float, float]], keep: list[bool]) -> float:
    """The beats covered by the spans that ``keep`` marks."""
    return sum(end - start for (_, start, end), kept in zip(spans, keep, strict=True) if kept)


def _section(
    rng: np.random.Generator, name: str, start: float, end: float, first_verse: bool = False
) -> Section:
    """A section whose stems are drawn with the probabilities of ``PRESENCE``."""
    presence = dict(PRESENCE[name])
    if first_verse:
        presence["drums"] = 0.75  # songs often bring the drums in after the first verse
    stems = tuple(stem for stem in STEMS if rng.random() < presence[stem])
    intensity = float(np.clip(INTENSITY[name] + rng.uniform(-0.1, 0.1), 0.0, 1.0))
    return Section(name=name, start=start, end=end, stems=stems, intensity=intensity)


def _chords(
    rng: np.random.Generator,
    sections: tuple[Section, ...],
    key_root: int,
    mode: str,
    style: str,
    beats_per_bar: int,
    bar_seconds: float,
) -> tuple[Chord, ...]:
    """The chord timeline: each section cycles its progression from its own first beat."""
    slot = float(beats_per_bar)
    if bar_seconds < 1.7 and rng.random() < 0.5:
        slot *= 2  # fast tempo: a chord every two bars
    elif bar_seconds > 2.8 and beats_per_bar == 4 and rng.random() < 0.4:
        slot /= 2  # slow tempo: two chords a bar
    seventh_chance = 0.85 if style == "jazz" else 0.15
    family = PROGRESSIONS[mode]
    verse, chorus, breakdown = (family[int(i)] for i in rng.choice(len(family), 3, replace=False))
    intro = chorus if rng.random() < 0.5 else verse
    degrees_of = {
        "intro": intro,
        "verse": verse,
        "chorus": chorus,
        "breakdown": breakdown,
        "outro": chorus,
    }
    voiced: dict[str, list[tuple[int, tuple[int, ...]]]] = {}
    for name, degrees in degrees_of.items():
        voiced[name] = []
        for degree in degrees:
            tones = diatonic_chord(key_root, mode, degree, seventh=rng.random() < seventh_chance)
            if mode == "minor" and degree == 4 and rng.random() < 0.5:
                tones = (tones[0], (tones[0] + 4) % 12, *tones[2:])  # harmonic-minor dominant
            voiced[name].append((tones[0], tones))
    chords: list[Chord] = []
    for section in sections:
        progression = voiced[section.name]
        beat, index = section.start, 0
        while beat < section.end - 1e-9:
            root, tones = progression[index % len(progression)]
            chords.append(Chord(beat, min(beat + slot, section.end), root, tones))
            beat += slot
            index += 1
    return tuple(chords)


def _part_spec(rng: np.random.Generator, role: str, program: int, pan_width: int) -> PartSpec:
    return PartSpec(
        role=role,
        program=program,
        pan=64 + int(rng.integers(-pan_width, pan_width + 1)),
        volume=int(rng.integers(90, 121)),
        reverb=int(rng.integers(10, 70)),
        chorus=int(rng.integers(0, 50)),
    )


def _other_specs(rng: np.random.Generator, style: Style) -> tuple[PartSpec, ...]:
    """One to three accompaniment parts with distinct roles and programs, spread left to right."""
    count = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    roles = list(style.roles)
    weights = np.array([style.roles[role] for role in roles], dtype=float)
    chosen = rng.choice(
        len(roles), size=min(count, len(roles)), replace=False, p=weights / weights.sum()
    )
    places = {1: (0.0,), 2: (-1.0, 1.0), 3: (-1.0, 0.0, 1.0)}[len(chosen)]
    side = 1 if rng.random() < 0.5 else -1
    specs = []
    used: set[int] = set()
    for place, index in zip(places, chosen, strict=True):
        role = roles[int(index)]
        program = int(rng.choice([p for p in ROLE_PROGRAMS[role] if p not in used]))
        used.add(program)
        spec = _part_spec(rng, role, program, pan_width=12)
        pan = spec.pan + side * place * rng.uniform(20, 45)
        specs.append(dataclasses.replace(spec, pan=int(np.clip(round(pan), 4, 124))))
    return tuple(specs)


def _vocal_specs(rng: np.random.Generator) -> tuple[PartSpec, ...]:
    """The lead voice, and in some tracks a backing voice singing a harmony in choruses."""
    lead = int(rng.choice(VOCAL_PROGRAMS, p=VOCAL_WEIGHTS))
    specs = [_part_spec(rng, "lead", lead, pan_width=6)]
    if rng.random() < 0.35:
        harmony = _part_spec(rng, "harmony", int(rng.choice(HARMONY_PROGRAMS)), pan_width=30)
        specs.append(harmony)
    return tuple(specs)
