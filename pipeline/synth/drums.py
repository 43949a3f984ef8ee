"""The drum stem: grooves on the GM percussion channel, with variations, fills and crashes.

A groove is a set of lanes (kick, snare, hi-hat, ...) written as one bar of sixteenth-note steps:
``X`` accent, ``x`` normal hit, ``o`` soft (ghost) hit, ``.`` rest. Each bar picks a kick variation,
sprinkles ghost notes, and the last bar of a section may end in a fill that leads to a crash.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.synth.music import Feel, Part
from pipeline.synth.plan import PartSpec, Section, TrackPlan

KICK, SIDE_STICK, SNARE, CLAP, ELECTRIC_SNARE = 36, 37, 38, 39, 40
CLOSED_HAT, PEDAL_HAT, OPEN_HAT = 42, 44, 46
CRASH, RIDE, TAMBOURINE = 49, 51, 54
TOMS = (50, 48, 47, 45, 43, 41)  # high to low
ELECTRONIC_KITS = (24, 25)
# The kit pieces the grooves play, by GM percussion key: the labels of the note table.
DRUM_PIECES = {
    KICK: "kick", SIDE_STICK: "side_stick", SNARE: "snare", CLAP: "clap",
    ELECTRIC_SNARE: "electric_snare", CLOSED_HAT: "closed_hat", PEDAL_HAT: "pedal_hat",
    OPEN_HAT: "open_hat", CRASH: "crash", RIDE: "ride", TAMBOURINE: "tambourine",
    **dict(zip(TOMS, ("high_tom", "high_mid_tom", "low_mid_tom", "low_tom", "high_floor_tom",
                      "low_floor_tom"), strict=True)),
}  # fmt: skip
RINGING = {CRASH: 3.0, RIDE: 1.0, OPEN_HAT: 0.5}  # beats a cymbal note is held
STEP = 0.25  # beats per pattern step
VELOCITY = {"X": 112, "x": 96, "o": 55}


@dataclass(frozen=True)
class Groove:
    """One bar per lane; ``kick`` and ``hat`` hold variations, the first being the main one."""

    kick: tuple[str, ...]
    snare: str
    hat: tuple[str, ...]
    ghost: str = ""  # candidate positions of soft snare notes
    open_hat: str = ""
    pedal: str = ""
    hat_note: int = CLOSED_HAT


GROOVES: dict[str, Groove] = {
    "rock": Groove(
        kick=("x.......x.......", "x.......x.x.....", "x......xx.......", "x.....x.x.......", "x.x.....x......."),
        snare="....X.......X...",
        hat=("X.x.X.x.X.x.X.x.", "x.x.x.x.x.x.x.x."),
        ghost="......o........o",
    ),
    "pop": Groove(
        kick=("x.....x...x.....", "x.....x.x.......", "x.......x.x.....", "x..x....x......."),
        snare="....X.......X...",
        hat=("XoxoXoxoXoxoXoxo", "x.x.x.x.x.x.x.x."),
        ghost="..........o.....",
    ),
    "disco": Groove(
        kick=("x...x...x...x...",),
        snare="....X.......X...",
        hat=("xoxoxoxoxoxoxoxo", "x.o.x.o.x.o.x.o."),
        open_hat="..x...x...x...x.",
    ),
    "funk": Groove(
        kick=("x..x..x...x..x..", "x.x...x..x......", "x..x....xx......", "x.....x..x..x..."),
        snare="....X.......X...",
        hat=("XoxoXoxoXoxoXoxo",),
        ghost=".o....o..o.o..o.",
    ),
    "hiphop": Groove(
        kick=("x......x..x.....", "x.x....x..x.....", "x......x.xx.....", "x..x...x..x....."),
        snare="....X.......X...",
        hat=("x.x.x.x.x.x.x.x.", "xoxoxoxoxoxoxoxo"),
        ghost=".......o......o.",
    ),
    "shuffle": Groove(
        kick=("x.......x.......", "x.......x.x.....", "x.x.....x......."),
        snare="....X.......X...",
        hat=("X.x.X.x.X.x.X.x.",),
        ghost="..o.......o.....",
    ),
    "halftime": Groove(
        kick=("x.....x...x.....", "x.........x..x..", "x.x.......x....."),
        snare="........X.......",
        hat=("XoxoXoxoXoxoXoxo", "x.x.x.x.x.x.x.x."),
        ghost="...o.......o..o.",
    ),
    "jazz": Groove(
        kick=("o...o...o...o...", "o.......o......."),
        snare="",
        hat=("x...x.x.x...x.x.",),
        ghost="......o...o...o.",
        pedal="....x.......x...",
        hat_note=RIDE,
    ),
    "reggae": Groove(
        kick=("........x.......", "........x.....x."),
        snare="........x.......",
        hat=("x.x.x.x.x.x.x.x.", "..x...x...x...x."),
        ghost="..............o.",
    ),
    "waltz": Groove(
        kick=("x...........", "x.......o..."),
        snare="....o...o...",
        hat=("x.x.x.x.x.x.", "x...x...x..."),
    ),
}  # fmt: skip


def compose_drums(plan: TrackPlan, spec: PartSpec, rng: np.random.Generator) -> Part:
    """The drum part of ``plan``: its groove in every section where the drums play."""
    groove = GROOVES[plan.style]
    part = spec.part(is_drum=True)
    feel = Feel(rng, plan.swing, plan.swing_unit, plan.seconds_per_beat, timing_sd=0.004)
    snare = SIDE_STICK if plan.style == "reggae" else SNARE
    if spec.program in ELECTRONIC_KITS and plan.style in ("disco", "hiphop", "pop"):
        snare = CLAP if rng.random() < 0.5 else ELECTRIC_SNARE
    hat_choice = int(rng.integers(len(groove.hat)))
    sections = plan.sections
    for index, section in enumerate(sections):
        if "drums" not in section.stems:
            continue
        previous = sections[index - 1] if index else None
        if previous is not None and (section.name == "chorus" or "drums" not in previous.stems):
            _hit(part, feel, section, section.start, CRASH, 110)
        _play_section(part, feel, rng, groove, plan, section, snare, hat_choice)
    return part


def _play_section(
    part: Part,
    feel: Feel,
    rng: np.random.Generator,
    groove: Groove,
    plan: TrackPlan,
    section: Section,
    snare: int,
    hat_choice: int,
) -> None:
    bar_beats = plan.beats_per_bar
    loud = 0.8 + 0.25 * section.intensity
    sparse = section.intensity < 0.4  # quarter-note hats and a side stick in quiet sections
    hat_note = groove.hat_note
    if section.intensity > 0.75 and groove.hat_note == CLOSED_HAT and rng.random() < 0.5:
        hat_note = RIDE if rng.random() < 0.5 else OPEN_HAT
    tambourine = section.intensity > 0.75 and rng.random() < 0.3
    fill_beats = float(rng.choice([1.0, 2.0], p=[0.6, 0.4])) if rng.random() < 0.6 else 0.0
    bar_start = section.start
    while bar_start < section.end - 1e-9:
        last_bar = bar_start + bar_beats >= section.end - 1e-9
        fill_from = bar_start + bar_beats - fill_beats if last_bar and fill_beats else np.inf
        kick = (
            groove.kick[0]
            if rng.random() < 0.6
            else groove.kick[int(rng.integers(len(groove.kick)))]
        )
        lanes = [(kick, KICK), (groove.snare, SIDE_STICK if sparse else snare)]
        lanes.append(
            (_thin(groove.hat[hat_choice]) if sparse else groove.hat[hat_choice], hat_note)
        )
        lanes += [(groove.open_hat, OPEN_HAT), (groove.pedal, PEDAL_HAT)]
        if tambourine:
            lanes.append((groove.snare, TAMBOURINE))
        for pattern, drum in lanes:
            for step, symbol in enumerate(pattern):
                beat = bar_start + step * STEP
                if symbol != "." and beat < fill_from:
                    _hit(part, feel, section, beat, drum, VELOCITY[symbol] * loud)
        for step, symbol in enumerate(groove.ghost):
            beat = bar_start + step * STEP
            if symbol != "." and beat < fill_from and rng.random() < 0.5:
                _hit(part, feel, section, beat, snare, VELOCITY["o"] * loud)
        if fill_from < np.inf:
            _fill(part, feel, rng, section, plan, fill_from, fill_beats, snare)
        bar_start += bar_beats


def _thin(pattern: str) -> str:
    """Keep only the hits on the beat (quiet sections)."""
    return "".join(symbol if step % 4 == 0 else "." for step, symbol in enumerate(pattern))


def _fill(
    part: Part,
    feel: Feel,
    rng: np.random.Generator,
    section: Section,
    plan: TrackPlan,
    start: float,
    beats: float,
    snare: int,
) -> None:
    """A snare-and-toms fill: sixteenths (eighths when fast) walking down the toms, crescendo."""
    step = 0.5 if plan.bpm > 140 else STEP
    count = round(beats / step)
    toms = TOMS[int(rng.integers(0, 2)) :: 1 + int(rng.integers(0, 2))]
    for index in range(count):
        position = index * len(toms) // count
        drum = snare if rng.random() < 0.35 else toms[position]
        velocity = 75 + 40 * (index + 1) / count
        _hit(part, feel, section, start + index * step, drum, velocity)
        if index == 0 or rng.random() < 0.25:
            _hit(part, feel, section, start + index * step, KICK, velocity - 10)


def _hit(part: Part, feel: Feel, section: Section, beat: float, drum: int, velocity: float) -> None:
    """One drum hit; cymbals are held so that they ring."""
    note = feel.note(beat, RINGING.get(drum, 0.25), drum, velocity, section.start, section.end)
    if note is not None:
        part.notes.append(note)
