"""The scoring job: one Ray Data task per (method, track), results recorded as Parquet manifests.

BSSEval v4 (:mod:`pipeline.scoring`) is CPU-bound and single-threaded, so a task takes one CPU
and ``workers`` of them run at once. Each task opens the reference and estimate files itself (so
only URLs travel) and reads them block by block, twice, so that its memory does not depend on
the track's length; it writes museval's per-track JSON and returns a manifest row holding the
per-frame scores. Whatever goes wrong with one track (a corrupt file, a wrong channel count)
becomes that track's error row; the run goes on, and a task whose worker died is run again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from pipeline.audio import AudioError, AudioReader, StreamResampler
from pipeline.evaluation.plan import Pair
from pipeline.scoring import METRICS, SISEC_RATE, score_blocks, track_store
from pipeline.storage.errors import readable_error
from pipeline.storage.location import open_audio_at, open_location, write_bytes
from pipeline.storage.manifest import ManifestWriter
from pipeline.storage.references import MIXTURE, open_references
from pipeline.storage.runs import RunTally

_TIME = pa.timestamp("us", tz="UTC")
FRAME_TYPE = pa.struct(
    [
        ("target", pa.string()),
        ("frame", pa.int32()),
        ("time", pa.float64()),
        *((metric, pa.float64()) for metric in METRICS),
    ]
)
EVALUATION_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("method", pa.string()),
        ("track", pa.string()),
        ("status", pa.string()),  # "ok" or "error"
        ("error", pa.string()),
        ("warnings", pa.string()),  # resampled, trimmed, silent references...; "; "-separated
        ("reference_uri", pa.string()),
        ("reference_version", pa.string()),
        ("estimate_uri", pa.string()),
        ("estimate_version", pa.string()),
        ("scoring", pa.string()),
        ("duration_s", pa.float64()),
        ("json_uri", pa.string()),
        ("started_at", _TIME),
        ("finished_at", _TIME),
        ("worker", pa.string()),
        ("score_seconds", pa.float64()),  # wall time of the task
        ("cpu_seconds", pa.float64()),  # CPU time of the task: what a track costs, load aside
        ("frames", pa.list_(FRAME_TYPE)),
    ]
)


@dataclass(frozen=True)
class EvaluationConfig:
    """What the driver and the tasks need; plain values, so that Ray can ship it anywhere."""

    destination: str
    run_id: str
    workers: int = 1
    cpus_per_task: float = 1.0
    storage_options: dict[str, Any] | None = None
    flush_rows: int = 64
    flush_seconds: float = 10.0


@dataclass
class EvaluationResult(RunTally):
    """What the job did (:class:`pipeline.storage.runs.RunTally`: counts, audio, per-worker
    scoring time), the CPU time it cost, its failures and warnings."""

    cpu_s: float = 0.0
    errors: list[tuple[str, str, str]] = field(default_factory=list)  # (method, track, message)
    warnings: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def tracks_per_hour(self) -> float | None:
        """Pairs scored per hour of wall time: the throughput of the cluster on this catalog."""
        return 3600 * self.ok / self.wall_s if self.wall_s > 0 and self.ok else None


def run_evaluation(
    todo: list[Pair], failing: list[Pair], config: EvaluationConfig
) -> EvaluationResult:
    """Score ``todo`` on the connected Ray cluster and record an error row for each pair of
    ``failing``; every row goes to ``DST/manifest/run=<run_id>/``."""
    import ray

    fs, destination = open_location(config.destination, config.storage_options)
    result = EvaluationResult()
    writer = ManifestWriter(
        fs,
        destination,
        config.run_id,
        config.flush_rows,
        config.flush_seconds,
        schema=EVALUATION_SCHEMA,
    )
    try:
        for pair in failing:
            _record(writer, result, problem_row(pair), config.run_id)
        if todo:
            _score_on_ray(ray, todo, config, writer, result)
    finally:
        writer.close()  # rows collected so far are true (their JSON exists) even if Ray failed
    return result


def _score_on_ray(
    ray,
    todo: list[Pair],
    config: EvaluationConfig,
    writer: ManifestWriter,
    result: EvaluationResult,
) -> None:
    """Score ``todo`` as a Ray Data job, the idiom of catalog separation: one block per pair,
    ``config.workers`` scoring tasks at once; each row is recorded as soon as it arrives.

    :func:`score_pair` never raises (a pair's failure is its row), storage errors are retried
    inside it, and a task whose worker process died is run again by Ray Data, as in separation.
    The rows travel pickled, so that their UTC times and per-frame scores come back exactly as
    the task made them.
    """
    blocks = min(len(todo), 5000)
    dataset = ray.data.from_items(
        [{"index": index} for index in range(len(todo))], override_num_blocks=blocks
    )
    dataset.context.enable_progress_bars = False  # the driver shows one bar in pairs
    dataset = dataset.map_batches(
        score_batch,
        batch_size=1,
        num_cpus=config.cpus_per_task,
        compute=ray.data.TaskPoolStrategy(size=max(1, min(config.workers, blocks))),
        fn_kwargs={"pairs": todo, "storage_options": config.storage_options},
    )
    started = time.monotonic()
    with tqdm(total=len(todo), unit="track", desc="scoring", dynamic_ncols=True) as bar:
        for item in dataset.iter_rows():
            _record(writer, result, pickle.loads(item["row"]), config.run_id)
            bar.update()
            bar.set_postfix(ok=result.ok, error=result.error)
    result.wall_s = time.monotonic() - started


def score_batch(
    batch: dict[str, np.ndarray], pairs: list[Pair], storage_options: dict[str, Any] | None
) -> dict[str, np.ndarray]:
    """The Ray Data stage: score the pairs whose indices ``batch`` holds (one, in practice)."""
    rows = np.empty(len(batch["index"]), dtype=object)
    rows[:] = [pickle.dumps(score_pair(pairs[int(i)], storage_options)) for i in batch["index"]]
    return {"row": rows}


def _record(
    writer: ManifestWriter, result: EvaluationResult, row: dict[str, Any], run_id: str
) -> None:
    row = {**row, "run_id": run_id}
    writer.add(row)
    where = (row["method"], row["track"])
    if row["warnings"]:
        result.warnings.append((*where, row["warnings"]))
    if row["status"] != "ok":
        result.error += 1
        result.errors.append((*where, row["error"]))
        return
    result.cpu_s += row["cpu_seconds"]
    result.count_ok(
        row["worker"],
        audio_s=row["duration_s"],
        started=row["started_at"].timestamp(),
        busy_s=row["score_seconds"],
    )


def problem_row(pair: Pair) -> dict[str, Any]:
    """The error row of a pair that cannot be scored (its ``problem`` is the message)."""
    now = datetime.now(UTC)
    return {
        **_identity(pair),
        "status": "error",
        "error": pair.problem or "not scored",
        "warnings": None,
        "duration_s": None,
        "json_uri": None,
        "started_at": now,
        "finished_at": now,
        "worker": None,
        "score_seconds": None,
        "cpu_seconds": None,
        "frames": None,
    }


def score_pair(pair: Pair, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score one method's estimates of one track (runs in a Ray task); never raises: a failure
    is the row's ``error``. Writes museval's per-track JSON before returning an ``ok`` row."""
    started_at = datetime.now(UTC)
    clock, cpu = time.perf_counter(), time.process_time()
    logging.getLogger("pipeline.scoring").setLevel(logging.ERROR)  # its warnings go in the row
    row = {**_identity(pair), "started_at": started_at, "worker": _worker_name()}
    try:
        frames, warnings, duration_s = _score(pair, storage_options)
        fs, path = open_location(pair.json_uri, storage_options)
        write_bytes(fs, path, track_store(pair.track, frames).json.encode())
    except Exception as failure:
        return {
            **row,
            "status": "error",
            "error": readable_error(failure),
            "warnings": None,
            "duration_s": None,
            "json_uri": None,
            "finished_at": datetime.now(UTC),
            "score_seconds": time.perf_counter() - clock,
            "cpu_seconds": time.process_time() - cpu,
            "frames": None,
        }
    return {
        **row,
        "status": "ok",
        "error": None,
        "warnings": "; ".join(warnings) or None,
        "duration_s": duration_s,
        "json_uri": pair.json_uri,
        "finished_at": datetime.now(UTC),
        "score_seconds": time.perf_counter() - clock,
        "cpu_seconds": time.process_time() - cpu,
        "frames": frames.to_dict("records"),
    }


def _score(pair: Pair, storage_options: dict[str, Any] | None) -> tuple[Any, list[str], float]:
    """Per-frame scores of the pair, the warnings about how its files were used, its length.

    Every file is read block by block, twice (filters, then frames), so a task's memory does
    not depend on the track's length."""
    baseline = pair.estimate is None
    names = (*pair.targets, MIXTURE) if baseline else pair.targets
    warnings: list[str] = []
    with contextlib.ExitStack() as stack:
        references = open_references(stack, pair.reference, names, storage_options)
        first = references[names[0]]
        if baseline:
            estimates = [_Conformed(references[MIXTURE], first, MIXTURE, [])] * len(pair.targets)
        else:
            estimates = [
                _Conformed(
                    open_audio_at(stack, pair.estimate.files[t], storage_options),
                    first,
                    t,
                    warnings,
                )
                for t in pair.targets
            ]
        if first.rate != SISEC_RATE:
            warnings.append(
                f"references at {first.rate} Hz: scored at {SISEC_RATE} Hz (SiSEC settings)"
            )

        def blocks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            signals = [_at_sisec_rate(references[t].blocks(), first) for t in pair.targets]
            signals += [_at_sisec_rate(e.blocks(), first) for e in _unique(estimates)]
            count = len(pair.targets)
            for parts in _in_step(signals):
                estimated = parts[count:] * count if baseline else parts[count:]
                yield np.stack(parts[:count]), np.stack(estimated)

        scores = score_blocks(pair.targets, blocks, SISEC_RATE)
    for estimate in _unique(estimates):
        warnings.extend(estimate.length_warnings())
    if scores.silent:
        warnings.append(f"silent reference ({', '.join(scores.silent)}): its scores are NaN")
    return scores.frames, warnings, scores.samples / SISEC_RATE


class _Conformed:
    """An estimate's blocks brought to its reference's rate, channels and length, each change
    noted in ``warnings`` (the length's once the file has been read: see length_warnings); an
    estimate that cannot be matched raises :class:`AudioError`."""

    def __init__(
        self, reader: AudioReader, reference: AudioReader, target: str, warnings: list[str]
    ) -> None:
        self.reader, self.target, self.natural = reader, target, 0
        self.rate, self.channels, self.samples = (
            reference.rate,
            reference.channels,
            reference.frames,
        )
        if reader.rate != self.rate:
            warnings.append(f"{target}: estimate at {reader.rate} Hz resampled to {self.rate} Hz")
        if reader.channels != self.channels:
            if reader.channels == 1:
                warnings.append(f"{target}: mono estimate used for all {self.channels} channels")
            elif self.channels == 1:
                warnings.append(f"{target}: {reader.channels}-channel estimate mixed down to mono")
            else:
                raise AudioError(
                    f"{target}: the estimate has {reader.channels} channels, "
                    f"the reference {self.channels}"
                )

    def blocks(self) -> Iterator[np.ndarray]:
        """The conformed estimate: exactly the reference's length (trimmed, or padded with
        silence); ``natural`` counts the samples it had at the reference's rate."""
        resampler = StreamResampler(self.reader.rate, self.rate, self.reader.channels)
        written = self.natural = 0
        for block in resampler.stream(self.reader.blocks()):
            block = self._channels(block)
            self.natural += block.shape[1]
            block = block[:, : self.samples - written]
            written += block.shape[1]
            if block.shape[1]:
                yield block
        if written < self.samples:
            yield np.zeros((self.channels, self.samples - written), np.float32)

    def _channels(self, block: np.ndarray) -> np.ndarray:
        if block.shape[0] == self.channels:
            return block
        if block.shape[0] == 1:
            return np.repeat(block, self.channels, axis=0)
        return block.mean(axis=0, keepdims=True)

    def length_warnings(self) -> list[str]:
        difference = self.natural - self.samples
        if difference > 0:
            return [f"{self.target}: estimate {difference} samples longer, trimmed"]
        if difference < 0:
            return [f"{self.target}: estimate {-difference} samples shorter, padded with silence"]
        return []


def _at_sisec_rate(blocks: Iterator[np.ndarray], reference: AudioReader) -> Iterator[np.ndarray]:
    """``blocks`` at the reference's rate, resampled to SiSEC's 44.1 kHz as one signal."""
    return StreamResampler(reference.rate, SISEC_RATE, reference.channels).stream(blocks)


def _in_step(signals: list[Iterator[np.ndarray]]) -> Iterator[list[np.ndarray]]:
    """Blocks of several signals of one length, cut to the same lengths."""
    held: list[np.ndarray | None] = [None] * len(signals)
    while True:
        held = [next(s, None) if h is None else h for h, s in zip(held, signals, strict=True)]
        if any(h is None for h in held):
            if any(h is not None for h in held):
                raise RuntimeError("internal error: the signals of a track differ in length")
            return
        size = min(h.shape[1] for h in held)
        yield [h[:, :size] for h in held]
        held = [h[:, size:] if h.shape[1] > size else None for h in held]


def _unique(estimates: list[_Conformed]) -> list[_Conformed]:
    """The distinct estimates (the mixture baseline is one, for every target)."""
    return list({id(e): e for e in estimates}.values())


def _identity(pair: Pair) -> dict[str, Any]:
    return {
        "method": pair.method,
        "track": pair.track,
        "reference_uri": pair.reference.location,
        "reference_version": pair.reference_version,
        "estimate_uri": pair.estimate_location,
        "estimate_version": pair.estimate_version,
        "scoring": pair.scoring,
    }


def _worker_name() -> str:
    try:
        import ray

        # outside Ray (a direct call) the host and process are enough: asking a process that
        # is not connected for its runtime context would start a local Ray
        node = ray.get_runtime_context().get_node_id()[:8] if ray.is_initialized() else "local"
    except Exception:
        node = "local"
    return f"{socket.gethostname()}/{node}/{os.getpid()}"
