"""The score of a track: the composers' parts per stem, each stem's MIDI file and its notes."""

from __future__ import annotations

from pathlib import Path

import mido
import numpy as np

from model import STEMS
from pipeline.synth.drums import DRUM_PIECES, compose_drums
from pipeline.synth.harmony import compose_bass, compose_other
from pipeline.synth.music import Part
from pipeline.synth.plan import TrackPlan
from pipeline.synth.vocals import compose_vocals

TICKS_PER_BEAT = 960
DRUM_CHANNEL = 9  # the GM percussion channel ("channel 10")
# Order of events that share a tick: set-up and controllers, bends, note-offs, then note-ons.
SETUP, BEND, NOTE_OFF, NOTE_ON = range(4)
NOTE_COLUMNS = ("stem", "role", "program", "drum", "pitch", "onset", "offset", "velocity")


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
    and effect sends set at the start; its notes are those of :func:`written_notes`. Events are
    ordered by tick and then by kind, so the file is the same byte for byte whenever the parts
    are.
    """
    events: list[tuple[int, int, int, mido.Message]] = []

    def add(tick: int, kind: int, message: mido.Message) -> None:
        events.append((tick, kind, len(events), message))

    for part, channel in zip(parts, _channels(parts), strict=True):
        add(0, SETUP, mido.Message("program_change", channel=channel, program=part.program))
        settings = {7: part.volume, 10: part.pan, 91: part.reverb, 93: part.chorus}
        changes = [(0.0, control, value) for control, value in settings.items()]
        for beat, control, value in changes + part.controls:
            message = mido.Message("control_change", channel=channel, control=control, value=value)
            add(_tick(beat), SETUP, message)
        for beat, value in part.bends:
            add(_tick(beat), BEND, mido.Message("pitchwheel", channel=channel, pitch=value))
        for start, end, pitch, velocity in written_notes(part):
            add(
                start,
                NOTE_ON,
                mido.Message("note_on", channel=channel, note=pitch, velocity=velocity),
            )
            add(end, NOTE_OFF, mido.Message("note_off", channel=channel, note=pitch, velocity=0))
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


def note_columns(plan: TrackPlan, score: dict[str, list[Part]]) -> dict[str, list]:
    """The notes of the MIDI files of a track as columns, one entry per note.

    Columns: stem, role, program (GM program; for drums the kit), drum (the kit piece, None for
    pitched parts), pitch, onset and offset in seconds from the first sample, velocity. They come
    from :func:`written_notes`, the very notes the MIDI files hold, at the files' tempo.
    """
    columns: dict[str, list] = {name: [] for name in NOTE_COLUMNS}
    seconds_per_tick = plan.tempo_us / 1e6 / TICKS_PER_BEAT
    for stem in STEMS:
        for part in score[stem]:
            for start, end, pitch, velocity in written_notes(part):
                values = (
                    stem,
                    part.role,
                    part.program,
                    DRUM_PIECES[pitch] if part.is_drum else None,
                    pitch,
                    start * seconds_per_tick,
                    end * seconds_per_tick,
                    velocity,
                )
                for name, value in zip(NOTE_COLUMNS, values, strict=True):
                    columns[name].append(value)
    return columns


def written_notes(part: Part) -> list[tuple[int, int, int, int]]:
    """(onset tick, release tick, pitch, velocity) of the notes of ``part`` as the file has them.

    Each note is cut at the next onset of the same pitch: on one channel a note-off would end
    both. A note starting at the same tick as a later one of its pitch is dropped (a doubled hit).
    """
    kept: list[tuple[int, int, int, int]] = []
    following: dict[int, int] = {}  # pitch -> tick of the next onset seen so far
    for note in sorted(part.notes, key=lambda n: (n.start, n.pitch, n.end), reverse=True):
        start, end = _tick(note.start), _tick(note.end)
        next_onset = following.get(note.pitch)
        if next_onset is not None:
            if next_onset <= start:
                continue
            end = min(end, next_onset)
        following[note.pitch] = start
        kept.append((start, max(end, start + 1), note.pitch, note.velocity))
    return kept[::-1]


def _channels(parts: list[Part]) -> list[int]:
    """The MIDI channel of each part: drums on the percussion channel, the others in turn."""
    melodic = (channel for channel in range(16) if channel != DRUM_CHANNEL)
    return [DRUM_CHANNEL if part.is_drum else next(melodic) for part in parts]


def _tick(beat: float) -> int:
    return max(round(beat * TICKS_PER_BEAT), 0)
