"""``metasep synth``: layout, exact sums and durations, determinism, sections, index and errors.

These tests run the real FluidSynth with the General MIDI SoundFont that ``make`` installs.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from synth_listening import plot_track

from model import STEMS
from pipeline.cli import main
from pipeline.synth import find_synthesizer, plan_track
from pipeline.synth import render as render_module
from pipeline.synth.dataset import GATE_SECONDS, TEMP_DIR, TrackJob, build_track
from pipeline.synth.plan import BASS_PROGRAMS, STYLES, TEMPO_RANGE, VOCAL_PROGRAMS
from pipeline.synth.score import compose

SECONDS = 10.0
RATE = 44100
FILES = ("mixture", *STEMS)
AUDIBLE_DBFS = -50.0


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


def read_int16(path: Path) -> np.ndarray:
    data, _ = sf.read(path, dtype="int16", always_2d=True)
    return data.T


def test_layout_formats_and_exact_durations(dataset, rows):
    assert sorted(p.name for p in dataset.iterdir()) == ["index.parquet", "train"]  # no temp left
    folders = sorted((dataset / "train").iterdir())
    assert [f.name for f in folders] == sorted(row["name"] for row in rows)
    assert len(folders) == 4
    for folder in folders:
        assert re.fullmatch(r"[a-z0-9-]+", folder.name)
        assert sorted(p.name for p in folder.iterdir()) == sorted(f"{n}.wav" for n in FILES)
        for name in FILES:
            info = sf.info(folder / f"{name}.wav")
            assert (info.samplerate, info.channels, info.subtype) == (RATE, 2, "PCM_16")
            assert info.frames == round(SECONDS * RATE)


def test_mixture_is_the_sum_of_the_stems(dataset, rows):
    for row in rows:
        folder = dataset / row["path"]
        mixture = read_int16(folder / "mixture.wav").astype(np.int32)
        stems = {stem: read_int16(folder / f"{stem}.wav").astype(np.int32) for stem in STEMS}
        total = sum(stems.values())
        assert np.abs(mixture - total).max() / 32768 <= 1e-4
        # The loudest file peaks at the level the index gives, below full scale.
        peak = max(np.abs(a).max() for a in [mixture, *stems.values()]) / 32767
        assert peak == pytest.approx(10 ** (row["peak_db"] / 20), abs=2e-4)
        assert peak < 1.0


def section_slices(row: dict):
    """(section, stem, playing, samples after the gate's fade) for every section and stem."""
    for section in row["sections"]:
        start = round((section["start"] + GATE_SECONDS) * RATE)
        end = round(section["end"] * RATE)
        for stem in STEMS:
            yield section, stem, stem in section["stems"], slice(start, end)


def test_stems_sound_where_the_plan_says_and_are_silent_elsewhere(dataset, rows):
    absent = 0
    for row in rows:
        audio = {stem: read_int16(dataset / row["path"] / f"{stem}.wav") for stem in STEMS}
        for section, stem, playing, span in section_slices(row):
            segment = audio[stem][:, span].astype(np.float64) / 32768
            label = f"{row['name']} {section['name']}@{section['start']:.1f}s {stem}"
            if playing:
                rms_db = 10 * np.log10(np.mean(segment**2) + 1e-20)
                assert rms_db > AUDIBLE_DBFS, f"{label} is inaudible ({rms_db:.1f} dBFS)"
            else:
                absent += 1
                assert not segment.any(), f"{label} should be silent"
    assert absent > 0  # the seed gives sections where some stems sit out


def test_same_seed_gives_identical_files_and_index(tmp_path, dataset, rows):
    again = tmp_path / "again"
    assert synth(again, "--workers", "1") == 0
    for row in rows:
        for name in FILES:
            relative = Path(row["path"]) / f"{name}.wav"
            assert (again / relative).read_bytes() == (dataset / relative).read_bytes()
    assert pq.read_table(again / "index.parquet").to_pylist() == rows


def test_the_index_seed_rebuilds_a_track(tmp_path, dataset, rows):
    row = rows[2]
    job = TrackJob(tmp_path, "train", row["name"], 0, 0, row["seed"], row["seconds"], False)
    rebuilt = build_track(job, find_synthesizer())
    assert rebuilt["sections"] == row["sections"] and rebuilt["tempo"] == row["tempo"]
    for name in FILES:
        original = (dataset / row["path"] / f"{name}.wav").read_bytes()
        assert (tmp_path / "train" / row["name"] / f"{name}.wav").read_bytes() == original


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
        twin = tmp_path / "two" / "train" / folder.name / f"{file}.wav"
        assert twin.read_bytes() == (folder / f"{file}.wav").read_bytes()
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


def test_missing_default_soundfont_names_the_package(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(render_module, "DEFAULT_SOUNDFONTS", (tmp_path / "FluidR3_GM.sf2",))
    assert synth(tmp_path / "out", tracks=1, seconds=2) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "apt-get install fluid-soundfont-gm" in error


def test_missing_synthesizer_names_the_package(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without fluidsynth
    assert synth(tmp_path / "out", tracks=1, seconds=2) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "apt-get install fluidsynth" in error


def test_listening_picture(tmp_path, dataset, rows):
    picture = plot_track(dataset / rows[0]["path"], rows[0], tmp_path / "track.png")
    data = picture.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_unreadable_index_stops_the_run_before_rendering(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "index.parquet").write_text("not parquet")
    assert synth(out, tracks=1, seconds=2) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "not a readable index" in error
    assert not (out / "train").exists()
