"""Writing a MUSDB18-HQ-shaped dataset: ``OUT/<split>/<track>/{mixture,drums,bass,other,vocals}.wav``.

A track is planned, composed, and each stem rendered on its own, so stems never bleed into each
other. Each stem gets its random gain and is silenced in the sections where the plan says it
does not play (its last notes ring out over a short fade). The track is then scaled to its peak
level, the stems quantised, and the mixture computed as the sum of the stems exactly as written.
Files go to a temporary folder that is renamed into place when complete, and
``OUT/index.parquet`` gets one row per track with everything needed to use or rebuild it.
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
import pyarrow.parquet as pq
from tqdm import tqdm

from model import STEMS
from pipeline.synth.plan import TrackPlan, plan_track
from pipeline.synth.render import SAMPLE_RATE, SynthError, Synthesizer
from pipeline.synth.score import compose, write_midi
from pipeline.synth.wav import write_wav

SPLITS = ("train", "test", "valid")
INDEX_NAME = "index.parquet"
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
class DatasetSummary:
    """What a run wrote."""

    tracks: int
    seconds: float  # wall-clock time of the run
    split_dir: Path
    index_path: Path
    index_rows: int


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
    _read_rows(out / INDEX_NAME)  # an unreadable index stops the run before anything is rendered
    rows: list[dict[str, Any]] = []
    try:
        progress_bar = tqdm(
            _rendered(jobs, synth, workers),
            total=len(jobs),
            unit="track",
            desc=f"synth {split}",
            disable=not progress,
        )
        for row in progress_bar:
            rows.append(row)
    finally:
        if rows:
            update_index(out, rows)
        _remove_if_empty(out / TEMP_DIR)
    return DatasetSummary(
        tracks=len(rows),
        seconds=time.perf_counter() - started,
        split_dir=out / split,
        index_path=out / INDEX_NAME,
        index_rows=pq.ParquetFile(out / INDEX_NAME).metadata.num_rows,
    )


def _rendered(jobs: list[TrackJob], synth: Synthesizer, workers: int) -> Iterator[dict[str, Any]]:
    """The index rows of ``jobs`` as tracks complete, rendered by ``workers`` processes."""
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


def build_track(job: TrackJob, synth: Synthesizer) -> dict[str, Any]:
    """Plan, compose, render and write one track; returns its index row."""
    plan = plan_track(job.seed, job.seconds)
    samples = round(job.seconds * SAMPLE_RATE)
    work = job.out / TEMP_DIR / f"{job.split}-{job.name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        stems = render_stems(plan, synth, work, samples)
        for name, audio in level(stems, plan, job.float32).items():
            write_wav(work / f"{name}.wav", audio, SAMPLE_RATE)
        (job.out / job.split).mkdir(parents=True, exist_ok=True)
        _move_into_place(work, job.out / job.split / job.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return index_row(job, plan, synth, samples)


def render_stems(
    plan: TrackPlan, synth: Synthesizer, work: Path, samples: int
) -> dict[str, np.ndarray]:
    """Each stem rendered on its own, its gain applied and its sit-out sections silenced."""
    score = compose(plan)
    end_beat = plan.total_beats + TAIL_SECONDS / plan.seconds_per_beat
    stems = {}
    for stem in STEMS:
        midi = work / f"{stem}.mid"
        write_midi(score[stem], plan.tempo_us, end_beat, midi)
        audio = synth.render(midi, samples).astype(np.float64)
        midi.unlink()
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


def index_row(job: TrackJob, plan: TrackPlan, synth: Synthesizer, samples: int) -> dict[str, Any]:
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
    row["soundfont"] = synth.soundfont.name
    return row


def update_index(out: Path, rows: list[dict[str, Any]]) -> None:
    """Add ``rows`` to ``out/index.parquet``, replacing older rows of the same tracks."""
    path = out / INDEX_NAME
    replaced = {(row["split"], row["name"]) for row in rows}
    kept = [row for row in _read_rows(path) if (row["split"], row["name"]) not in replaced]
    merged = sorted(kept + rows, key=lambda row: (row["split"], row["name"]))
    partial = path.with_name(f".{INDEX_NAME}.partial")
    pq.write_table(pa.Table.from_pylist(merged), partial)
    partial.replace(path)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as error:
        raise SynthError(f"{path} exists but is not a readable index: {error}") from None


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
