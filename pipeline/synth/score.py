"""The score of a track: the composers' parts per stem, and each stem written as a MIDI file."""

from __future__ import annotations

from pathlib import Path

import mido
import numpy as np

from model import STEMS
from pipeline.synth.drums import compose_drums
from pipeline.synth.harmony import compose_bass, compose_other
from pipeline.synth.music import Note, Part
from pipeline.synth.plan import TrackPlan
from pipeline.synth.vocals import compose_vocals

TICKS_PER_BEAT = 960
DRUM_CHANNEL = 9  # the GM percussion channel ("channel 10")
# Order of events that share a tick: set-up and controllers, bends, note-offs, then note-ons.
SETUP, BEND, NOTE_OFF, NOTE_ON = range(4)


def compose(plan: TrackPlan) -> dict[str, list[Part]]:
    """Every stem's parts. Each composer draws from its own generator, seeded by the track seed."""
    parts = plan.parts
    return {
        "drums": [compose_drums(plan, parts["drums"][0], _generator(plan, "drums"))],
        "bass": [compose_bass(plan, parts["bass"][0], _generator(plan, "bass"))],
        "other": compose_other(plan, parts["other"], _generator(plan, "other")),
        "vocals": compose_vocals(plan, parts["vocals"], _generator(plan, "vocals")),
    }


def _generator(plan: TrackPlan, stem: str) -> np.random.Generator:
    return np.random.default_rng([plan.seed, 1 + STEMS.index(stem)])


def write_midi(parts: list[Part], tempo_us: int, end_beat: float, path: Path) -> None:
    """Write ``parts`` as a type-0 MIDI file that lasts until ``end_beat``.

    Each part gets its own channel (drums the percussion channel) with its program, volume, pan
    and effect sends set at the start. Events are ordered by tick and then by kind, so the file
    is the same byte for byte whenever the parts are.
    """
    events: list[tuple[int, int, int, mido.Message]] = []

    def add(beat: float, kind: int, message: mido.Message) -> None:
        events.append((_tick(beat), kind, len(events), message))

    melodic_channels = (channel for channel in range(16) if channel != DRUM_CHANNEL)
    for part in parts:
        channel = DRUM_CHANNEL if part.is_drum else next(melodic_channels)
        add(0.0, SETUP, mido.Message("program_change", channel=channel, program=part.program))
        for control, value in (
            (7, part.volume),
            (10, part.pan),
            (91, part.reverb),
            (93, part.chorus),
        ):
            add(
                0.0,
                SETUP,
                mido.Message("control_change", channel=channel, control=control, value=value),
            )
        for beat, control, value in part.controls:
            add(
                beat,
                SETUP,
                mido.Message("control_change", channel=channel, control=control, value=value),
            )
        for beat, value in part.bends:
            add(beat, BEND, mido.Message("pitchwheel", channel=channel, pitch=value))
        for note in _without_overlaps(part.notes):
            add(
                note.start,
                NOTE_ON,
                mido.Message("note_on", channel=channel, note=note.pitch, velocity=note.velocity),
            )
            add(
                note.end,
                NOTE_OFF,
                mido.Message("note_off", channel=channel, note=note.pitch, velocity=0),
            )
    events.sort(key=lambda event: event[:3])
    track = mido.MidiTrack()
    track.append(mido.MetaMessage("set_tempo", tempo=tempo_us, time=0))
    now = 0
    for tick, _, _, message in events:
        track.append(message.copy(time=tick - now))
        now = tick
    track.append(mido.MetaMessage("end_of_track", time=max(_tick(end_beat) - now, 0)))
    midi = mido.MidiFile(type=0, ticks_per_beat=TICKS_PER_BEAT)
    midi.tracks.append(track)
    midi.save(path)


def _without_overlaps(notes: list[Note]) -> list[Note]:
    """Cut each note at the next onset of the same pitch: on one channel a note-off would end both.

    A note starting at the same tick as a later one of its pitch is dropped (a doubled hit).
    """
    kept: list[Note] = []
    following: dict[int, int] = {}  # pitch -> tick of the next onset seen so far
    for note in sorted(notes, key=lambda note: (note.start, note.pitch, note.end), reverse=True):
        start, end = _tick(note.start), _tick(note.end)
        next_onset = following.get(note.pitch)
        if next_onset is not None:
            if next_onset <= start:
                continue
            end = min(end, next_onset)
        following[note.pitch] = start
        kept.append(
            Note(
                start / TICKS_PER_BEAT,
                max(end, start + 1) / TICKS_PER_BEAT,
                note.pitch,
                note.velocity,
            )
        )
    return kept[::-1]


def _tick(beat: float) -> int:
    return max(round(beat * TICKS_PER_BEAT), 0)
