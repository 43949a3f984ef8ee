"""The Ray Data job: tracks flow through three stages so that the model never waits on I/O.

1. ``decode`` (CPU tasks): read the file from storage and decode it.
2. ``separate`` (actors, ``workers`` of them, each holding one :class:`Separator`, on a GPU when
   ``gpus_per_worker`` > 0): the model, and nothing else.
3. ``encode`` (CPU tasks): encode the four stems and write them to storage.

Ray Data streams blocks between the stages, so while a worker separates one track the next is
being decoded and the previous uploaded. The driver collects one result row per track, writes it
to the run's manifest after its stems exist, and measures each worker's model-busy time against
its wall time. Failed tasks and actors are retried by Ray (a worker lost with its node is
restarted elsewhere); a row is written once per track whatever Ray retried.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from tqdm import tqdm

from model import STEMS
from pipeline.audio import AudioError, write_audio
from pipeline.catalog.listing import CatalogTrack
from pipeline.catalog.manifest import ManifestWriter
from pipeline.catalog.paths import stem_paths
from pipeline.catalog.runs import RunTally
from pipeline.catalog.storage import full_url, open_location, read_audio_at, write_bytes

log = logging.getLogger(__name__)

_TRACK_COLUMNS = ("track_id", "source_uri", "source_size", "source_version")
_URI_COLUMNS = tuple(f"{stem}_uri" for stem in STEMS)


@dataclass(frozen=True)
class JobConfig:
    """Everything the stages need; plain values, so that Ray can ship it to any node."""

    destination: str
    run_id: str
    model_id: str
    options_hash: str
    precision: str = "float32"
    separator_options: dict[str, Any] = field(default_factory=dict)  # segment, context, batch_size
    stem_format: str = "flac"
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    io_cpus: float = 0.25  # CPU reserved by each decode/encode task
    storage_options: dict[str, Any] | None = None
    fail_on_error: bool = False
    flush_rows: int = 256
    flush_seconds: float = 10.0


@dataclass
class JobResult(RunTally):
    """What the job did (:class:`pipeline.catalog.runs.RunTally`: counts, audio, per-worker model-busy
    time), whether it stopped at a failure, the failures and the manifest files written."""

    stopped_early: bool = False
    errors: list[tuple[str, str]] = field(default_factory=list)  # (track_id, message)
    manifest_parts: list[str] = field(default_factory=list)


def identify_separator(
    model: Any, precision: str, separator_options: dict[str, Any], gpus_per_worker: float
) -> tuple[str, str]:
    """``model_id`` and ``options_hash`` as the workers will compute them.

    Built here on the CPU when it can run ``precision``; otherwise (float16 for GPU workers on a
    driver without fast float16, say) by a Ray task shaped like a worker. Ray must be connected
    for the second case.
    """
    from pipeline.separator import Separator

    try:
        separator = Separator(model, device="cpu", precision=precision, **separator_options)
        return separator.model_id, separator.options_hash
    except ValueError:
        if gpus_per_worker <= 0:
            raise
    import ray

    probe = ray.remote(num_cpus=1, num_gpus=gpus_per_worker)(_identify_on_worker)
    return ray.get(probe.remote(ray.put(model), precision, separator_options))


def _identify_on_worker(
    model: Any, precision: str, separator_options: dict[str, Any]
) -> tuple[str, str]:
    from pipeline.separator import Separator

    separator = Separator(model, device="cuda", precision=precision, **separator_options)
    return separator.model_id, separator.options_hash


def run_job(tracks: list[CatalogTrack], model_ref: Any, config: JobConfig) -> JobResult:
    """Separate ``tracks`` on the connected Ray cluster, writing stems and manifest rows.

    ``model_ref`` is a Ray object reference to the :class:`MultiTasNet` every worker loads, so
    that a checkpoint on the driver's disk reaches workers on any node.
    """
    import ray

    fs, destination = open_location(config.destination, config.storage_options)
    result = JobResult()
    if not tracks:
        return result
    started = time.monotonic()
    dataset = _build_dataset(ray, _plan_rows(tracks, fs, destination, config), model_ref, config)
    writer = ManifestWriter(fs, destination, config.run_id, config.flush_rows, config.flush_seconds)
    written: set[str] = set()
    try:
        with tqdm(total=len(tracks), unit="track", desc="separating", dynamic_ncols=True) as bar:
            for row in dataset.iter_rows():
                if row["track_id"] in written:  # a retried task's duplicate: the first row stands
                    continue
                written.add(row["track_id"])
                writer.add(_manifest_row(row, config))
                _account(result, row)
                bar.update()
                bar.set_postfix(ok=result.ok, error=result.error)
                if config.fail_on_error and result.error:
                    result.stopped_early = True
                    break
    finally:
        writer.close()  # rows collected so far are true (their stems exist) even if Ray failed
    result.wall_s = time.monotonic() - started
    result.manifest_parts = writer.parts
    return result


def _plan_rows(
    tracks: list[CatalogTrack], fs, destination: str, config: JobConfig
) -> list[dict[str, Any]]:
    rows = []
    for track in tracks:
        paths = stem_paths(destination, track.output_key, config.stem_format)
        row = {name: getattr(track, name) for name in _TRACK_COLUMNS}
        row.update({f"{stem}_uri": full_url(fs, path) for stem, path in paths.items()})
        rows.append(row)
    return rows


def _build_dataset(ray, rows: list[dict[str, Any]], model_ref: Any, config: JobConfig):
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver shows one bar in tracks
    blocks = min(len(rows), 5000)
    io_tasks = min(blocks, max(2, 2 * config.workers))
    dataset = ray.data.from_items(rows, override_num_blocks=blocks)
    dataset = dataset.map_batches(
        decode_batch,
        batch_size=1,
        num_cpus=config.io_cpus,
        compute=ray.data.TaskPoolStrategy(size=io_tasks),
        fn_kwargs={"storage_options": config.storage_options},
    )
    dataset = dataset.map_batches(
        SeparateWorker,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=config.workers),
        num_cpus=config.cpus_per_worker,
        num_gpus=config.gpus_per_worker,
        fn_constructor_kwargs={"model": model_ref, "config": config},
    )  # Ray Data restarts dead actors and retries their tasks (max_restarts=-1) by default
    return dataset.map_batches(
        encode_batch,
        batch_size=1,
        num_cpus=config.io_cpus,
        compute=ray.data.TaskPoolStrategy(size=io_tasks),
        fn_kwargs={"config": config},
    )


def decode_batch(
    batch: dict[str, np.ndarray], storage_options: dict[str, Any] | None
) -> dict[str, np.ndarray]:
    """Stage 1: read and decode each track; a file that cannot be used gets its error message."""
    out: dict[str, list[Any]] = {**{k: list(v) for k, v in batch.items()}}
    for key in ("audio", "channels", "samples", "sample_rate", "error", "started_at"):
        out[key] = []
    for uri in batch["source_uri"]:
        out["started_at"].append(time.time())
        audio, rate, error = None, 0, ""
        try:
            audio, rate = read_audio_at(str(uri), storage_options)
        except Exception as failure:  # whatever a file does, it fails alone, as an error row
            error = readable_error(failure)
        out["audio"].append(b"" if audio is None else audio.tobytes())
        out["channels"].append(0 if audio is None else audio.shape[0])
        out["samples"].append(0 if audio is None else audio.shape[1])
        out["sample_rate"].append(rate)
        out["error"].append(error)
    return _columns(out)


class SeparateWorker:
    """Stage 2: a Ray actor holding one :class:`Separator`, built once, called per track."""

    def __init__(self, model: Any, config: JobConfig) -> None:
        import ray
        import torch

        from pipeline.separator import Separator

        if isinstance(model, ray.ObjectRef):
            model = ray.get(model)
        device = "cuda" if config.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        self.separator = Separator(
            model, device=device, precision=config.precision, **config.separator_options
        )
        if self.separator.model_id != config.model_id:
            raise RuntimeError(
                f"worker loaded model {self.separator.model_id}, the run planned {config.model_id}"
            )
        node = ray.get_runtime_context().get_node_id()[:8]
        self.name = f"{socket.gethostname()}/{node}/{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {k: list(v) for k, v in batch.items() if k != "audio"}
        for key in (*STEMS, "worker", "model_started", "model_seconds"):
            out[key] = []
        for index in range(len(batch["track_id"])):
            stems, started, seconds = self._separate(batch, index, out["error"])
            for stem in STEMS:
                out[stem].append(b"" if stems is None else stems[stem].tobytes())
            out["worker"].append(self.name)
            out["model_started"].append(started)
            out["model_seconds"].append(seconds)
        return _columns(out)

    def _separate(
        self, batch: dict[str, np.ndarray], index: int, errors: list[str]
    ) -> tuple[dict[str, np.ndarray] | None, float, float]:
        """The stems of one track, when and how long the model took; on failure the track's
        error is set (a track too long for the GPU's memory, say) and the worker goes on."""
        if errors[index]:
            return None, 0.0, 0.0
        shape = (int(batch["channels"][index]), int(batch["samples"][index]))
        audio = np.frombuffer(batch["audio"][index], dtype=np.float32).reshape(shape)
        started = time.time()
        try:
            stems = self.separator.separate(audio, int(batch["sample_rate"][index]))
        except Exception as failure:
            errors[index] = f"separation failed: {readable_error(failure)}"
            return None, started, time.time() - started
        seconds = time.time() - started
        if any(stems[stem].shape != audio.shape for stem in STEMS):
            errors[index] = f"the separator returned stems of another shape than {audio.shape}"
        elif not all(np.isfinite(stem).all() for stem in stems.values()):
            errors[index] = "the model produced NaN or infinite samples"
        if errors[index]:
            return None, started, seconds
        return (
            {stem: np.ascontiguousarray(stems[stem], np.float32) for stem in STEMS},
            started,
            seconds,
        )


def encode_batch(batch: dict[str, np.ndarray], config: JobConfig) -> dict[str, np.ndarray]:
    """Stage 3: encode and write the stems of each track, then emit its result row."""
    out: dict[str, list[Any]] = {k: list(v) for k, v in batch.items() if k not in STEMS}
    out["finished_at"] = []
    for index in range(len(batch["track_id"])):
        if not out["error"][index]:
            try:
                _write_stems(batch, index, config)
            except Exception as failure:  # after the retries inside write_bytes
                out["error"][index] = f"writing stems failed: {readable_error(failure)}"
        out["finished_at"].append(time.time())
    return _columns(out)


def _write_stems(batch: dict[str, np.ndarray], index: int, config: JobConfig) -> None:
    shape = (int(batch["channels"][index]), int(batch["samples"][index]))
    rate = int(batch["sample_rate"][index])
    for stem in STEMS:
        audio = np.frombuffer(batch[stem][index], dtype=np.float32).reshape(shape)
        buffer = io.BytesIO()
        write_audio(buffer, audio, rate, format=config.stem_format)
        fs, path = open_location(str(batch[f"{stem}_uri"][index]), config.storage_options)
        write_bytes(fs, path, buffer.getvalue())


def _manifest_row(row: dict[str, Any], config: JobConfig) -> dict[str, Any]:
    ok = not row["error"]
    rate = int(row["sample_rate"])
    return {
        "run_id": config.run_id,
        **{name: row[name] for name in _TRACK_COLUMNS},
        "source_size": int(row["source_size"]),
        "status": "ok" if ok else "error",
        "error": None if ok else str(row["error"]),
        "duration_s": int(row["samples"]) / rate if rate else None,
        "sample_rate": rate or None,
        "channels": int(row["channels"]) or None,
        **{name: str(row[name]) if ok else None for name in _URI_COLUMNS},
        "model_id": config.model_id,
        "options_hash": config.options_hash,
        "started_at": datetime.fromtimestamp(float(row["started_at"]), UTC),
        "finished_at": datetime.fromtimestamp(float(row["finished_at"]), UTC),
        "worker": str(row["worker"]),
        "model_seconds": float(row["model_seconds"]),
    }


def _account(result: JobResult, row: dict[str, Any]) -> None:
    """Add one result row to the run's counts and its worker's timing."""
    if row["error"]:
        result.error += 1
        result.errors.append((str(row["track_id"]), str(row["error"])))
        return
    result.count_ok(
        str(row["worker"]),
        audio_s=int(row["samples"]) / int(row["sample_rate"]),
        started=float(row["model_started"]),
        busy_s=float(row["model_seconds"]),
    )


def _columns(values: dict[str, list[Any]]) -> dict[str, np.ndarray]:
    """Lists to numpy columns; bytes and text stay object arrays (Arrow binary and strings)."""
    columns = {}
    for key, items in values.items():
        if any(isinstance(item, bytes | str) or item is None for item in items):
            array = np.empty(len(items), dtype=object)
            array[:] = items
            columns[key] = array
        else:
            columns[key] = np.asarray(items)
    return columns


def readable_error(error: BaseException) -> str:
    """An error as one line a person can act on."""
    if isinstance(error, FileNotFoundError):
        return f"file not found ({error})"
    if isinstance(error, PermissionError):
        return f"permission denied ({error})"
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, AudioError) else f"{type(error).__name__}: {text}"
