"""Writing a MUSDB18-HQ-shaped dataset: ``OUT/<split>/<track>/{mixture,drums,bass,other,vocals}.wav``.

A track is planned, composed, and each stem rendered on its own from its MIDI file, so stems
never bleed into each other; the SoundFont is picked per track from the seed. Each stem gets its
random gain and is silenced in the sections where the plan says it does not play (its last notes
ring out over a short fade). The track is then scaled to its peak level, the stems quantised,
and the mixture computed as the sum of the stems exactly as written. The MIDI files stay beside
the audio (``midi/<stem>.mid``). Files go to a temporary folder that is renamed into place when
complete; ``OUT/index.parquet`` gets one row per track with everything needed to use or rebuild
it, and ``OUT/notes.parquet`` one row per note of the MIDI files.
"""

from __future__ import annotations

import multiprocessing
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from model import STEMS
from pipeline.audio import write_audio
from pipeline.synth.music import Part
from pipeline.synth.plan import TrackPlan, plan_track
from pipeline.synth.render import SAMPLE_RATE, SynthError, Synthesizer
from pipeline.synth.score import NOTE_COLUMNS, compose, note_columns, write_midi

SPLITS = ("train", "test", "valid")
INDEX_NAME = "index.parquet"
NOTES_NAME = "notes.parquet"
MIDI_DIR = "midi"  # beside a track's audio: <stem>.mid, the file that rendered the stem
NOTE_SCHEMA = pa.schema(  # notes.parquet: the track (as in the index), then score.NOTE_COLUMNS
    {
        "split": pa.string(),
        "name": pa.string(),
        "stem": pa.string(),
        "role": pa.string(),
        "program": pa.int16(),
        "drum": pa.string(),
        "pitch": pa.int16(),
        "onset": pa.float64(),
        "offset": pa.float64(),
        "velocity": pa.int16(),
    }
)
TEMP_DIR = ".synth-tmp"  # beside the split folders, so that no reader mistakes it for a track
GATE_SECONDS = 0.25  # fade that silences a stem at the start of a section it sits out
TAIL_SECONDS = 0.5  # MIDI runs this far past the end so that rendering covers the whole track


@dataclass(frozen=True)
class TrackJob:
    """One track to write: where, its name, and the seeds it comes from."""

    out: Path
    split: str
    name: str
    index: int  # position within this run
    base_seed: int  # the --seed of the run
    seed: int  # the track's own seed: plan_track(seed, seconds) rebuilds it
    seconds: float
    float32: bool


@dataclass(frozen=True)
class BuiltTrack:
    """A track written: its row of the index and its notes (a table of ``NOTE_SCHEMA``)."""

    row: dict[str, Any]
    notes: pa.Table


@dataclass(frozen=True)
class DatasetSummary:
    """What a run wrote."""

    tracks: int
    seconds: float  # wall-clock time of the run
    split_dir: Path
    index_path: Path
    index_rows: int
    notes_path: Path
    notes_rows: int


def track_seed(base_seed: int, split: str, index: int) -> int:
    """The seed of track ``index`` of ``split``: independent streams for every track and split."""
    state = np.random.SeedSequence([base_seed, SPLITS.index(split), index]).generate_state(
        1, np.uint64
    )
    return int(state[0] >> np.uint64(1))  # 63 bits: fits the index's int64 column


def track_name(split: str, base_seed: int, index: int) -> str:
    """A filesystem-safe name, unique across splits and seeds: ``synth-train-s7-00003``."""
    return f"synth-{split}-s{base_seed}-{index:05d}"


def write_dataset(
    out: Path,
    split: str,
    tracks: int,
    seconds: float,
    seed: int,
    synth: Synthesizer,
    workers: int,
    float32: bool = False,
    progress: bool = True,
) -> DatasetSummary:
    """Render ``tracks`` tracks into ``out/split`` in parallel and update ``out/index.parquet``.

    The index is updated with the tracks that completed even when a later one fails.
    """
    started = time.perf_counter()
    jobs = [
        TrackJob(
            out=out,
            split=split,
            name=track_name(split, seed, index),
            index=index,
            base_seed=seed,
            seed=track_seed(seed, split, index),
            seconds=seconds,
            float32=float32,
        )
        for index in range(tracks)
    ]
    for name in (INDEX_NAME, NOTES_NAME):
        _read_table(out / name)  # an unreadable table stops the run before anything is rendered
    built: list[BuiltTrack] = []
    try:
        progress_bar = tqdm(
            _rendered(jobs, synth, workers),
            total=len(jobs),
            unit="track",
            desc=f"synth {split}",
            disable=not progress,
        )
        for track in progress_bar:
            built.append(track)
    finally:
        if built:
            update_tables(out, built)
        _remove_if_empty(out / TEMP_DIR)
    return DatasetSummary(
        tracks=len(built),
        seconds=time.perf_counter() - started,
        split_dir=out / split,
        index_path=out / INDEX_NAME,
        index_rows=pq.ParquetFile(out / INDEX_NAME).metadata.num_rows,
        notes_path=out / NOTES_NAME,
        notes_rows=pq.ParquetFile(out / NOTES_NAME).metadata.num_rows,
    )


def _rendered(jobs: list[TrackJob], synth: Synthesizer, workers: int) -> Iterator[BuiltTrack]:
    """The tracks of ``jobs`` as they complete, rendered by ``workers`` processes."""
    if workers <= 1 or len(jobs) == 1:
        for job in jobs:
            yield build_track(job, synth)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
        futures = [pool.submit(build_track, job, synth) for job in jobs]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def build_track(job: TrackJob, synth: Synthesizer) -> BuiltTrack:
    """Plan, compose, render and write one track with the SoundFont its seed picks."""
    plan = plan_track(job.seed, job.seconds)
    soundfont = synth.soundfont_for(job.seed)
    samples = round(job.seconds * SAMPLE_RATE)
    work = job.out / TEMP_DIR / f"{job.split}-{job.name}"
    shutil.rmtree(work, ignore_errors=True)
    (work / MIDI_DIR).mkdir(parents=True)
    try:
        score = compose(plan)
        stems = render_stems(plan, score, synth, soundfont, work, samples)
        for name, audio in level(stems, plan, job.float32).items():
            write_audio(work / f"{name}.wav", audio, SAMPLE_RATE, "wav" if job.float32 else "wav16")
        (job.out / job.split).mkdir(parents=True, exist_ok=True)
        _move_into_place(work, job.out / job.split / job.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    columns = note_columns(plan, score)
    count = len(columns["stem"])
    track = {"split": [job.split] * count, "name": [job.name] * count}
    notes = pa.table({**track, **columns}, schema=NOTE_SCHEMA)
    return BuiltTrack(index_row(job, plan, synth, soundfont, samples), notes)


def render_stems(
    plan: TrackPlan,
    score: dict[str, list[Part]],
    synth: Synthesizer,
    soundfont: Path,
    work: Path,
    samples: int,
) -> dict[str, np.ndarray]:
    """Each stem rendered on its own from ``work/midi/<stem>.mid`` (kept), its gain applied and
    its sit-out sections silenced."""
    end_beat = plan.total_beats + TAIL_SECONDS / plan.seconds_per_beat
    stems = {}
    for stem in STEMS:
        midi = work / MIDI_DIR / f"{stem}.mid"
        write_midi(score[stem], plan.tempo_us, end_beat, midi)
        audio = synth.render(midi, samples, soundfont).astype(np.float64)
        stems[stem] = audio * (10 ** (plan.gains_db[stem] / 20)) * section_gate(plan, stem, samples)
    return stems


def section_gate(plan: TrackPlan, stem: str, samples: int) -> np.ndarray:
    """1 where ``stem`` plays; a raised-cosine fade to 0 over the start of each section it sits out.

    The composers start no note there; the fade only ends what rings on from before.
    """
    gate = np.ones(samples)
    per_beat = plan.seconds_per_beat * SAMPLE_RATE
    fade_length = round(GATE_SECONDS * SAMPLE_RATE)
    for section in plan.sections:
        if stem in section.stems:
            continue
        start = min(round(section.start * per_beat), samples)
        end = (
            samples if section is plan.sections[-1] else min(round(section.end * per_beat), samples)
        )
        fade = min(fade_length, end - start)
        gate[start : start + fade] *= 0.5 * (1 + np.cos(np.pi * np.arange(fade) / fade_length))
        gate[start + fade : end] = 0.0
    return gate


def level(stems: dict[str, np.ndarray], plan: TrackPlan, float32: bool) -> dict[str, np.ndarray]:
    """Scale the track to its peak level; quantise; the mixture is the sum of the written stems."""
    mixture = sum(stems.values())
    peak = max(float(np.abs(mixture).max()), *(float(np.abs(s).max()) for s in stems.values()))
    if peak == 0.0:
        raise SynthError(
            f"track with seed {plan.seed} rendered silent: is the SoundFont General MIDI?"
        )
    scale = 10 ** (plan.peak_db / 20) / peak
    if float32:
        written = {stem: (audio * scale).astype(np.float32) for stem, audio in stems.items()}
        total = sum(audio.astype(np.float64) for audio in written.values())
        return {"mixture": total.astype(np.float32), **written}
    written = {
        stem: np.round(audio * scale * 32767).astype(np.int16) for stem, audio in stems.items()
    }
    total = sum(audio.astype(np.int32) for audio in written.values())
    if np.abs(total).max() > 32767:  # cannot happen below -0.01 dBFS; guards the int16 cast
        raise SynthError(f"mixture of the track with seed {plan.seed} exceeds full scale")
    return {"mixture": total.astype(np.int16), **written}


def index_row(
    job: TrackJob, plan: TrackPlan, synth: Synthesizer, soundfont: Path, samples: int
) -> dict[str, Any]:
    """The index row of a track (see README "Synthetic data" for the columns)."""
    row: dict[str, Any] = {
        "name": job.name,
        "split": job.split,
        "path": f"{job.split}/{job.name}",
        "seed": plan.seed,
        "base_seed": job.base_seed,
        "track": job.index,
        "seconds": samples / SAMPLE_RATE,
        "samples": samples,
        "sample_rate": SAMPLE_RATE,
        "format": "float32" if job.float32 else "pcm16",
        "style": plan.style,
        "tempo": 60e6 / plan.tempo_us,
        "meter": f"{plan.beats_per_bar}/4",
        "key": plan.key,
        "mode": plan.mode,
    }
    for stem in STEMS:
        row[f"{stem}_programs"] = [spec.program for spec in plan.parts[stem]]
    row["other_roles"] = [spec.role for spec in plan.parts["other"]]
    row["gains_db"] = {stem: plan.gains_db[stem] for stem in STEMS}
    row["peak_db"] = plan.peak_db
    row["sections"] = plan.section_times()
    row["effects"] = synth.effects
    row["soundfont"] = soundfont.name
    return row


def update_tables(out: Path, built: list[BuiltTrack]) -> None:
    """Add the tracks to ``out/index.parquet`` and ``out/notes.parquet``, replacing the rows of
    older tracks of the same split and name."""
    replaced = {(track.row["split"], track.row["name"]) for track in built}
    old_rows = _read_table(out / INDEX_NAME)
    kept = [] if old_rows is None else old_rows.to_pylist()
    kept = [row for row in kept if (row["split"], row["name"]) not in replaced]
    rows = sorted(kept + [track.row for track in built], key=lambda r: (r["split"], r["name"]))
    _write_table(pa.Table.from_pylist(rows), out / INDEX_NAME)
    notes = [track.notes for track in built]
    old_notes = _read_table(out / NOTES_NAME)
    if old_notes is not None:
        keys = pc.binary_join_element_wise(old_notes["split"], old_notes["name"], "/")
        gone = pa.array([f"{split}/{name}" for split, name in replaced])
        notes.append(old_notes.filter(pc.invert(pc.is_in(keys, value_set=gone))))
    order = [(column, "ascending") for column in ("split", "name", *NOTE_COLUMNS)]
    _write_table(pa.concat_tables(notes).sort_by(order), out / NOTES_NAME)


def _write_table(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` under a temporary name first, so no reader sees half a file."""
    partial = path.with_name(f".{path.name}.partial")
    pq.write_table(table, partial)
    partial.replace(path)


def _read_table(path: Path) -> pa.Table | None:
    """The table at ``path``, or None when there is none yet."""
    if not path.exists():
        return None
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise SynthError(f"{path} exists but is not a readable table: {error}") from None


def _move_into_place(work: Path, final: Path) -> None:
    """Rename the finished folder to its final name, replacing an older track of that name."""
    if final.exists():
        old = work.with_name(work.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        work.rename(final)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        work.rename(final)


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
