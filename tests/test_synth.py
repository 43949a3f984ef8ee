"""``metasep synth``: layout, exact sums and durations, determinism, sections, index and errors.

These tests run the real FluidSynth with the General MIDI SoundFonts that ``make`` installs
(``fluid-soundfont-gm`` and ``timgm6mb-soundfont``).
"""

from __future__ import annotations

import itertools
import math
import re
from collections import defaultdict
from pathlib import Path

import mido
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from synth_listening import plot_track

from model import STEMS
from pipeline.cli import main
from pipeline.synth import find_synthesizer, plan_track
from pipeline.synth import render as render_module
from pipeline.synth.dataset import (
    GATE_SECONDS,
    MIDI_DIR,
    TEMP_DIR,
    TrackJob,
    build_track,
    track_name,
    track_seed,
)
from pipeline.synth.music import Note
from pipeline.synth.plan import (
    BASS_PROGRAMS,
    PLAN_SHARE,
    SINGLE_SECTION_SECONDS,
    STYLES,
    TEMPO_RANGE,
    VOCAL_PROGRAMS,
    PartSpec,
)
from pipeline.synth.render import installed_soundfonts
from pipeline.synth.score import compose, note_columns, write_midi

SECONDS = 10.0
RATE = 44100
FILES = ("mixture", *STEMS)
AUDIBLE_DBFS = -50.0
SOUNDING_DBFS = -60.0  # a 1 s frame or a note's first 50 ms above this level sounds
SOUNDING_SHARE = 0.4  # every stem sounds in at least this share of a track's 1 s frames
SOUNDFONT_NAMES = {"FluidR3_GM.sf2", "TimGM6mb.sf2"}


def synth(out: Path, *extra: str, tracks: int = 4, seconds: float = SECONDS, seed: int = 7) -> int:
    argv = ["synth", str(out), "--tracks", str(tracks), "--seconds", str(seconds)]
    return main([*argv, "--seed", str(seed), *extra])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Four 10 s tracks rendered by two workers (the same run the other tests compare with)."""
    out = tmp_path_factory.mktemp("synth") / "data"
    assert synth(out, "--workers", "2") == 0
    return out


@pytest.fixture(scope="module")
def rows(dataset) -> list[dict]:
    return pq.read_table(dataset / "index.parquet").to_pylist()


@pytest.fixture(scope="module")
def notes(dataset) -> list[dict]:
    return pq.read_table(dataset / "notes.parquet").to_pylist()


@pytest.fixture(scope="module")
def long_track(tmp_path_factory) -> tuple[Path, dict, list[dict]]:
    """A 30 s track with a section that some stem sits out: its folder, index row and notes."""
    seed = next(
        seed
        for seed in itertools.count()
        if any(len(section.stems) < len(STEMS) for section in plan_track(seed, 30.0).sections)
    )
    out = tmp_path_factory.mktemp("long")
    built = build_track(TrackJob(out, "train", "long", 0, 0, seed, 30.0, False), find_synthesizer())
    return out / "train" / "long", built.row, built.notes.to_pylist()


def read_int16(path: Path) -> np.ndarray:
    data, _ = sf.read(path, dtype="int16", always_2d=True)
    return data.T


def dbfs(segment: np.ndarray) -> float:
    """RMS level of int16 samples in dB below full scale."""
    return 10 * np.log10(np.mean((segment.astype(np.float64) / 32768) ** 2) + 1e-20)


def frame_share(spans: list[tuple[float, float]], seconds: float) -> float:
    """The share of a track's 1 s frames (museval's windows) that some (onset, offset) span touches."""
    frames = np.zeros(math.ceil(seconds - 1e-9), dtype=bool)
    for onset, offset in spans:
        frames[int(onset) : max(math.ceil(offset), int(onset) + 1)] = True
    return float(frames.mean())


def sounding_share(audio: np.ndarray) -> float:
    """The share of the 1 s frames of int16 ``audio`` above ``SOUNDING_DBFS``."""
    frames = range(math.ceil(audio.shape[1] / RATE))
    return float(
        np.mean([dbfs(audio[:, k * RATE : (k + 1) * RATE]) > SOUNDING_DBFS for k in frames])
    )


def test_layout_formats_and_exact_durations(dataset, rows):
    assert sorted(p.name for p in dataset.iterdir()) == ["index.parquet", "notes.parquet", "train"]
    folders = sorted((dataset / "train").iterdir())
    assert [f.name for f in folders] == sorted(row["name"] for row in rows)
    assert len(folders) == 4
    for folder in folders:
        assert re.fullmatch(r"[a-z0-9-]+", folder.name)
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [MIDI_DIR, *(f"{n}.wav" for n in FILES)]
        )
        assert sorted(p.name for p in (folder / MIDI_DIR).iterdir()) == sorted(
            f"{s}.mid" for s in STEMS
        )
        for name in FILES:
            info = sf.info(folder / f"{name}.wav")
            assert (info.samplerate, info.channels, info.subtype) == (RATE, 2, "PCM_16")
            assert info.frames == round(SECONDS * RATE)


def test_mixture_is_the_sum_of_the_stems(dataset, rows):
    for row in rows:
        folder = dataset / row["path"]
        mixture = read_int16(folder / "mixture.wav").astype(np.int32)
        stems = {stem: read_int16(folder / f"{stem}.wav").astype(np.int32) for stem in STEMS}
        assert np.array_equal(mixture, sum(stems.values()))
        # The loudest file peaks at the level the index gives, below full scale.
        peak = max(np.abs(a).max() for a in [mixture, *stems.values()]) / 32767
        assert peak == pytest.approx(10 ** (row["peak_db"] / 20), abs=2e-4)
        assert peak < 1.0


def test_every_stem_plays_in_most_of_every_track_whatever_its_length():
    lengths = (5.0, 7.5, 10.0, 12.5, 15.0, 16.0, 20.0, 25.0, 30.0, 45.0, 60.0, 90.0, 120.0)
    # Of 600 plans tried once, the least share was 52% (vocals).
    for seed in range(4 * len(lengths)):
        seconds = lengths[seed % len(lengths)]
        plan = plan_track(seed, seconds)
        if seconds < SINGLE_SECTION_SECONDS:
            assert [section.stems for section in plan.sections] == [STEMS]
        columns = note_columns(plan, compose(plan))
        for stem in STEMS:
            planned = sum(s.end - s.start for s in plan.sections if stem in s.stems)
            assert planned >= PLAN_SHARE * plan.total_beats - 1e-6, (seed, seconds, stem)
            spans = [
                (onset, offset)
                for name, onset, offset in zip(
                    columns["stem"], columns["onset"], columns["offset"], strict=True
                )
                if name == stem
            ]
            assert frame_share(spans, seconds) >= SOUNDING_SHARE, (seed, seconds, stem)


def test_the_issue_example_has_four_sounding_stems(tmp_path):
    """``metasep synth OUT --tracks 4 --seconds 15 --seed 11 --split test``, its second track."""
    name, seed = track_name("test", 11, 1), track_seed(11, "test", 1)
    build_track(TrackJob(tmp_path, "test", name, 1, 11, seed, 15.0, False), find_synthesizer())
    for stem in STEMS:
        audio = read_int16(tmp_path / "test" / name / f"{stem}.wav")
        assert sounding_share(audio) >= SOUNDING_SHARE, stem


def test_stems_sound_where_their_notes_are_and_are_silent_elsewhere(long_track):
    folder, row, track_notes = long_track
    assert row["seconds"] == 30.0
    absent = 0
    for stem in STEMS:
        audio = read_int16(folder / f"{stem}.wav")
        assert sounding_share(audio) >= SOUNDING_SHARE, stem
        spans = [(n["onset"], n["offset"]) for n in track_notes if n["stem"] == stem]
        for section in row["sections"]:
            start, end = section["start"], section["end"]
            # a note may reach half a MIDI tick past its section (0.3 ms at these tempos)
            sounding = any(onset < end - 1e-3 and offset > start + 1e-3 for onset, offset in spans)
            assert sounding == (stem in section["stems"]), (section, stem)
            segment = audio[:, round((start + GATE_SECONDS) * RATE) : round(end * RATE)]
            label = f"{section['name']}@{start:.1f}s {stem}"
            if sounding:
                assert dbfs(segment) > AUDIBLE_DBFS, f"{label} is inaudible"
            else:
                absent += 1
                assert not segment.any(), f"{label} has no note but sounds"
    assert absent > 0


def test_audio_has_energy_at_every_note_onset(dataset, rows, notes):
    audio = {
        (row["name"], stem): read_int16(dataset / row["path"] / f"{stem}.wav")
        for row in rows
        for stem in STEMS
    }
    for note in notes:
        start = round(note["onset"] * RATE)
        window = audio[note["name"], note["stem"]][:, start : start + round(0.05 * RATE)]
        assert dbfs(window) > SOUNDING_DBFS, note


def test_time_zero_of_the_midi_file_is_sample_zero(tmp_path):
    """A note at 0.5 s starts sounding there, within FluidSynth's block of 64 samples."""
    synth = find_synthesizer()
    midi = tmp_path / "note.mid"
    for soundfont, drum in itertools.product(synth.soundfonts, (False, True)):
        part = PartSpec("lead", 0, 64, 100, 0, 0).part(is_drum=drum)
        part.notes.append(Note(1.0, 1.5, 38 if drum else 60, 100))  # at 120 bpm: 0.5 s to 0.75 s
        write_midi([part], 500_000, 3.0, midi)
        audio = synth.render(midi, RATE, soundfont)
        onset = RATE // 2
        assert not audio[:, :onset].any()
        assert audio[:, onset : onset + round(0.003 * RATE)].any()
        assert np.abs(audio[:, onset : onset + round(0.05 * RATE)]).max() > 1e-2


def midi_notes(path: Path) -> list[tuple]:
    """(drum, program, pitch, onset s, offset s, velocity) of the notes mido reads in a file."""
    programs: dict[int, int] = {}
    started: dict[tuple[int, int], tuple[float, int]] = {}
    found = []
    now = 0.0
    for message in mido.MidiFile(path):  # times in seconds, at the file's tempo
        now += message.time
        if message.type == "program_change":
            programs[message.channel] = message.program
        elif message.type == "note_on" and message.velocity > 0:
            started[message.channel, message.note] = (now, message.velocity)
        elif message.type in ("note_on", "note_off"):
            onset, velocity = started.pop((message.channel, message.note))
            drum = message.channel == 9
            found.append((drum, programs[message.channel], message.note, onset, now, velocity))
    assert not started
    return sorted(found)


def test_notes_table_holds_exactly_the_notes_of_the_midi_files(dataset, rows, notes):
    by_stem = defaultdict(list)
    for note in notes:
        by_stem[note["name"], note["stem"]].append(note)
    assert {name for name, _ in by_stem} == {row["name"] for row in rows}
    for row, stem in itertools.product(rows, STEMS):
        table = sorted(
            (
                n["drum"] is not None,
                n["program"],
                n["pitch"],
                n["onset"],
                n["offset"],
                n["velocity"],
            )
            for n in by_stem[row["name"], stem]
        )
        read = midi_notes(dataset / row["path"] / MIDI_DIR / f"{stem}.mid")
        assert len(table) == len(read) > 0
        for ours, theirs in zip(table, read, strict=True):
            assert ours[:3] == theirs[:3] and ours[5] == theirs[5]
            assert ours[3:5] == pytest.approx(theirs[3:5], abs=1e-9)
    for note in notes:
        assert note["split"] == "train" and 0 <= note["onset"] < note["offset"] <= SECONDS + 1e-3
        row = next(row for row in rows if row["name"] == note["name"])
        if note["stem"] == "drums":
            assert note["role"] == "kit" and note["program"] == row["drums_programs"][0]
            assert re.fullmatch(r"[a-z_]+", note["drum"])
        else:
            assert note["drum"] is None and note["program"] in row[f"{note['stem']}_programs"]
    roles = {(n["stem"], n["role"]) for n in notes}
    assert {("bass", "bass"), ("vocals", "lead")} <= roles and len(roles) >= 6


def test_soundfonts_are_picked_per_track_by_its_seed(tmp_path, rows):
    synthesizer = find_synthesizer()
    assert {path.name for path in synthesizer.soundfonts} == SOUNDFONT_NAMES
    assert {row["soundfont"] for row in rows} == SOUNDFONT_NAMES
    for row in rows:
        assert row["soundfont"] == synthesizer.soundfont_for(row["seed"]).name
    picks = [synthesizer.soundfont_for(seed).name for seed in range(400)]
    assert 0.35 < picks.count("TimGM6mb.sf2") / len(picks) < 0.65
    chosen = synthesizer.soundfonts[1]
    assert synthesizer.soundfonts == find_synthesizer([*synthesizer.soundfonts, chosen]).soundfonts
    assert synthesizer.soundfonts[::-1] == find_synthesizer(synthesizer.soundfonts[::-1]).soundfonts
    out = tmp_path / "one"
    assert synth(out, "--workers", "1", "--soundfont", str(chosen), tracks=2, seconds=2) == 0
    assert {r["soundfont"] for r in pq.read_table(out / "index.parquet").to_pylist()} == {
        chosen.name
    }


def test_same_seed_gives_identical_files_and_tables(tmp_path, dataset, rows):
    again = tmp_path / "again"
    assert synth(again, "--workers", "1") == 0
    for row in rows:
        files = [f"{name}.wav" for name in FILES] + [f"{MIDI_DIR}/{stem}.mid" for stem in STEMS]
        for file in files:
            relative = Path(row["path"]) / file
            assert (again / relative).read_bytes() == (dataset / relative).read_bytes()
    for table in ("index.parquet", "notes.parquet"):
        assert pq.read_table(again / table).equals(pq.read_table(dataset / table))


def test_the_index_seed_and_soundfont_rebuild_a_track(tmp_path, dataset, rows):
    row = rows[2]
    soundfont = {path.name: path for path in installed_soundfonts()}[row["soundfont"]]
    job = TrackJob(tmp_path, "train", row["name"], 0, 0, row["seed"], row["seconds"], False)
    rebuilt = build_track(job, find_synthesizer([soundfont])).row
    assert rebuilt["sections"] == row["sections"] and rebuilt["tempo"] == row["tempo"]
    for file in [f"{name}.wav" for name in FILES] + [f"{MIDI_DIR}/{stem}.mid" for stem in STEMS]:
        original = (dataset / row["path"] / file).read_bytes()
        assert (tmp_path / "train" / row["name"] / file).read_bytes() == original


def test_index_describes_every_track(rows):
    assert len({row["seed"] for row in rows}) == len(rows)
    for row in rows:
        assert row["split"] == "train" and row["path"] == f"train/{row['name']}"
        assert row["seconds"] == SECONDS and row["samples"] == SECONDS * RATE
        assert row["format"] == "pcm16" and row["sample_rate"] == RATE
        assert TEMPO_RANGE[0] <= row["tempo"] <= TEMPO_RANGE[1]
        assert re.fullmatch(r"[A-G][#b]? (major|minor|dorian|mixolydian)", row["key"])
        assert row["drums_programs"][0] in STYLES[row["style"]].kits
        assert row["bass_programs"][0] in BASS_PROGRAMS
        assert 1 <= len(row["other_programs"]) == len(row["other_roles"]) <= 3
        assert row["vocals_programs"][0] in VOCAL_PROGRAMS
        sections = row["sections"]
        assert sections[0]["start"] == 0 and sections[-1]["end"] == pytest.approx(SECONDS)
        for before, after in itertools.pairwise(sections):
            assert before["end"] == pytest.approx(after["start"])
        plan = plan_track(row["seed"], row["seconds"])
        assert (plan.key, plan.section_times()) == (row["key"], sections)


def test_plans_follow_the_song_rules_and_vary():
    styles, kits, vocal_programs, other_programs, absent = set(), set(), set(), set(), set()
    for seed in range(300):
        plan = plan_track(seed, (8.0, 30.0, 60.0)[seed % 3])
        assert TEMPO_RANGE[0] <= plan.bpm <= TEMPO_RANGE[1]
        assert plan.sections[0].start == 0
        assert plan.sections[-1].end == pytest.approx(plan.total_beats)
        for section in plan.sections:
            assert section.name != "intro" or "vocals" not in section.stems
            assert section.name != "breakdown" or "drums" not in section.stems
            assert "other" in section.stems or section.name in ("verse",)
            absent |= {(section.name, stem) for stem in STEMS if stem not in section.stems}
        styles.add(plan.style)
        kits.add(plan.parts["drums"][0].program)
        vocal_programs.add(plan.parts["vocals"][0].program)
        other_programs |= {spec.program for spec in plan.parts["other"]}
    assert styles == set(STYLES) and len(kits) >= 6 and vocal_programs == set(VOCAL_PROGRAMS)
    assert len(other_programs) >= 30
    assert {("intro", "vocals"), ("breakdown", "drums"), ("verse", "drums")} <= absent


def test_notes_start_only_in_sections_where_the_stem_plays():
    for seed in range(40):
        plan = plan_track(seed, 20.0)
        score = compose(plan)
        for section in plan.sections:
            for stem in STEMS:
                onsets = [
                    note.start
                    for part in score[stem]
                    for note in part.notes
                    if section.start <= note.start < section.end
                ]
                assert bool(onsets) == (stem in section.stems), (seed, section, stem)


def test_float_output_is_exact_and_deterministic(tmp_path):
    for name in ("one", "two"):
        assert synth(tmp_path / name, "--float", "--workers", "1", tracks=1, seconds=3) == 0
    folder = next((tmp_path / "one" / "train").iterdir())
    for file in FILES:
        info = sf.info(folder / f"{file}.wav")
        assert (info.subtype, info.frames) == ("FLOAT", 3 * RATE)
        data = (folder / f"{file}.wav").read_bytes()
        assert b"PEAK" not in data  # libsndfile's PEAK chunk holds the time of writing
        assert (tmp_path / "two" / "train" / folder.name / f"{file}.wav").read_bytes() == data
    mixture, _ = sf.read(folder / "mixture.wav", dtype="float64")
    total = sum(sf.read(folder / f"{stem}.wav", dtype="float64")[0] for stem in STEMS)
    assert np.abs(mixture - total).max() <= 1e-6 and np.abs(mixture).max() < 1.0


def test_effects_add_the_synthesizers_reverb(tmp_path):
    for name, extra in (("dry", ()), ("wet", ("--effects",)), ("wet2", ("--effects",))):
        assert synth(tmp_path / name, "--workers", "1", *extra, tracks=1, seconds=3) == 0
    rows = {
        name: pq.read_table(tmp_path / name / "index.parquet").to_pylist()[0]
        for name in ("dry", "wet")
    }
    assert (rows["dry"]["effects"], rows["wet"]["effects"]) == (False, True)
    path = Path(rows["wet"]["path"]) / "mixture.wav"
    assert (tmp_path / "wet" / path).read_bytes() == (tmp_path / "wet2" / path).read_bytes()
    dry, wet = (read_int16(tmp_path / name / path).astype(np.float64) for name in ("dry", "wet"))
    assert np.sqrt(np.mean((wet - dry) ** 2)) > 0.05 * np.sqrt(np.mean(dry**2))


def test_rerun_replaces_tracks_and_merges_splits_into_one_index(tmp_path):
    out = tmp_path / "data"
    assert synth(out, "--workers", "1", tracks=1, seconds=2) == 0
    assert synth(out, "--workers", "1", "--split", "test", tracks=2, seconds=2) == 0
    assert synth(out, "--workers", "1", tracks=1, seconds=2, seed=8) == 0
    assert synth(out, "--workers", "1", tracks=1, seconds=2) == 0
    rows = pq.read_table(out / "index.parquet").to_pylist()
    names = [(row["split"], row["name"]) for row in rows]
    assert names == [
        ("test", "synth-test-s7-00000"),
        ("test", "synth-test-s7-00001"),
        ("train", "synth-train-s7-00000"),
        ("train", "synth-train-s8-00000"),
    ]
    for split, name in names:
        assert len(list((out / split / name).glob("*.wav"))) == 5
    notes = pq.read_table(out / "notes.parquet").to_pylist()
    counts = {key: sum((n["split"], n["name"]) == key for n in notes) for key in names}
    for (split, name), count in counts.items():  # a rerun replaces a track's notes, no doubles
        files = (out / split / name / MIDI_DIR).glob("*.mid")
        assert count == sum(len(midi_notes(path)) for path in files) > 0
    assert len(notes) == sum(counts.values())
    assert not (out / TEMP_DIR).exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tracks", "0"], "--tracks must be between 1"),
        (["--seconds", "0.5"], "--seconds must be between 1"),
        (["--seconds", "nan"], "--seconds must be between 1"),
        (["--seconds", "601"], "--seconds must be between 1"),
        (["--seed", "-3"], "--seed must be between 0"),
        (["--workers", "0"], "--workers must be 1 or more"),
        (["--soundfont", "/nonexistent/GM.sf2"], "fluid-soundfont-gm"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, capsys, argv, message):
    base = {"--tracks": "1", "--seconds": "2", "--seed": "1"}
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        base[flag] = value
    args = [part for flag, value in base.items() for part in (flag, value)]
    assert main(["synth", str(tmp_path / "out"), *args]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_and_a_file_that_is_no_soundfont(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert synth(tmp_path / "file", tracks=1, seconds=2) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "fake.sf2").write_bytes(b"RIFF\0\0\0\0WAVEfmt ")
    assert synth(tmp_path / "out", "--soundfont", str(tmp_path / "fake.sf2"), tracks=1) == 2
    assert "is not a SoundFont 2" in capsys.readouterr().err


def test_missing_default_soundfonts_name_the_packages(tmp_path, capsys, monkeypatch):
    defaults = {package: (tmp_path / package,) for package in render_module.DEFAULT_SOUNDFONTS}
    monkeypatch.setattr(render_module, "DEFAULT_SOUNDFONTS", defaults)
    assert synth(tmp_path / "out", tracks=1, seconds=2) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "apt-get install fluid-soundfont-gm timgm6mb-soundfont" in error


def test_missing_synthesizer_names_the_package(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without fluidsynth
    assert synth(tmp_path / "out", tracks=1, seconds=2) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "apt-get install fluidsynth" in error


def test_listening_picture(tmp_path, dataset, rows, notes):
    track = [note for note in notes if note["name"] == rows[0]["name"]]
    bare = plot_track(dataset / rows[0]["path"], rows[0], tmp_path / "bare.png").read_bytes()
    picture = plot_track(dataset / rows[0]["path"], rows[0], tmp_path / "notes.png", track)
    data = picture.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000 and data != bare


@pytest.mark.parametrize("table", ["index.parquet", "notes.parquet"])
def test_unreadable_table_stops_the_run_before_rendering(tmp_path, capsys, table):
    out = tmp_path / "data"
    out.mkdir()
    (out / table).write_text("not parquet")
    assert synth(out, tracks=1, seconds=2) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"{table} exists but is not a readable table" in error
    assert not (out / "train").exists()
