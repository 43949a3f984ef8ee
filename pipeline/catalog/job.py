"""The Ray Data job: tracks stream through model workers, in memory independent of their length.

Each model worker is an actor (``workers`` of them, ``gpus_per_worker`` GPUs and
``cpus_per_worker`` CPUs each) that holds one :class:`~pipeline.separator.Separator`, built once.
It takes a few tracks per call (``tracks_per_call``; more on a GPU, so that windows of several
tracks fill each forward pass) and runs them through the engine's streaming file path, the same
code as ``metasep separate FILE``: each source is read from storage block by block, twice
(statistics, then windows), the unscaled stems go to a spool file on the worker's disk and are
encoded from there. No track, decoded or separated, ever sits in memory or in Ray's object store,
so a two-hour concert costs what a song costs. Decoding and encoding run in the worker's host
threads while the device computes asynchronously.

Outputs are written under temporary names and renamed (local disks) or uploaded whole (object
stores) before the driver records the track's manifest row. Ray restarts dead workers and retries
their calls elsewhere; a track is redone from its start, and its row is written once whatever Ray
retried.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import posixpath
import socket
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm

from model import STEMS
from pipeline.catalog.listing import CatalogTrack
from pipeline.runtime import ONE_ARENA_ENV, keep_freed_memory
from pipeline.separator import SeparatedFile, SeparationOptions
from pipeline.settings import load_settings
from pipeline.storage.errors import readable_error
from pipeline.storage.location import full_url, open_location, open_source, upload_file
from pipeline.storage.manifest import ManifestWriter
from pipeline.storage.paths import stem_paths
from pipeline.storage.runs import RunTally

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
    options: SeparationOptions = field(default_factory=SeparationOptions)
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    network_threads: int = 0  # torch threads of a worker's network (0: the CPUs it holds)
    storage_options: dict[str, Any] | None = None
    fail_on_error: bool = False
    flush_rows: int = 256
    flush_seconds: float = 10.0


@dataclass
class JobResult(RunTally):
    """What the job did (:class:`pipeline.storage.runs.RunTally`: counts, audio, per-worker model-busy
    time), whether it stopped at a failure, the failures and the manifest files written."""

    stopped_early: bool = False
    errors: list[tuple[str, str]] = field(default_factory=list)  # (track_id, message)
    rescaled: list[tuple[str, float]] = field(default_factory=list)  # (track_id, gain_db)
    manifest_parts: list[str] = field(default_factory=list)


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
        paths = stem_paths(destination, track.output_key, config.options.stem_format)
        row = {name: getattr(track, name) for name in _TRACK_COLUMNS}
        row.update({f"{stem}_uri": full_url(fs, path) for stem, path in paths.items()})
        rows.append(row)
    return rows


def _build_dataset(ray, rows: list[dict[str, Any]], model_ref: Any, config: JobConfig):
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver shows one bar in tracks
    dataset = ray.data.from_items(rows, override_num_blocks=min(len(rows), 5000))
    return dataset.map_batches(
        SeparateWorker,
        batch_size=tracks_per_call(config),
        compute=ray.data.ActorPoolStrategy(size=config.workers),
        num_cpus=config.cpus_per_worker,
        num_gpus=config.gpus_per_worker,
        fn_constructor_kwargs={"model": model_ref, "config": config},
        # Ray Data calls the worker from a thread of its own: one arena keeps freed memory there
        runtime_env={"env_vars": ONE_ARENA_ENV},
    )  # Ray Data restarts dead actors and retries their tasks (max_restarts=-1) by default


def tracks_per_call(config: JobConfig) -> int:
    """Tracks a worker separates together: as the options say, else the engine's default for
    the workers' device (several on a GPU, one on a CPU)."""
    return config.options.tracks_on("cuda" if config.gpus_per_worker > 0 else "cpu")


class SeparateWorker:
    """A Ray actor holding one :class:`Separator`, built once, called with a few tracks."""

    def __init__(self, model: Any, config: JobConfig) -> None:
        import ray
        import torch

        from pipeline.separator import ForwardTimer, Separator

        keep_freed_memory()  # the actor's process: allocator tuning at its start
        if isinstance(model, ray.ObjectRef):
            model = ray.get(model)
        device = torch.device(
            "cuda" if config.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        )
        if config.network_threads:  # else Ray's OMP_NUM_THREADS: the CPUs the worker holds
            torch.set_num_threads(config.network_threads)
        self.timer = ForwardTimer(device)
        spool = load_settings().spool_dir  # this machine's own setting, not the driver's
        self.separator = Separator.from_options(
            config.options, device, model=model, observer=self.timer, spool_dir=spool
        )
        if self.separator.model_id != config.model_id:
            raise RuntimeError(
                f"worker loaded model {self.separator.model_id}, the run planned {config.model_id}"
            )
        self.config = config
        node = ray.get_runtime_context().get_node_id()[:8]
        self.name = f"{socket.gethostname()}/{node}/{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["track_id"]))]
        with tempfile.TemporaryDirectory(prefix="metasep-stems-") as work:
            started = time.time()
            results = self._separate(rows, Path(work))
            ended = time.time()
        device_s = self.timer.take()
        audio_s = [r.frames / r.rate if isinstance(r, SeparatedFile) else 0.0 for r in results]
        share = [a / sum(audio_s) if sum(audio_s) else 1 / len(rows) for a in audio_s]
        out: dict[str, list[Any]] = {k: list(v) for k, v in batch.items()}
        columns = ("error", "channels", "samples", "sample_rate", "gain_db", "worker", "precision")
        timing = ("started_at", "finished_at", "model_started", "model_seconds", "device_seconds")
        for key in (*columns, *timing):
            out[key] = []
        for result, part in zip(results, share, strict=True):
            ok = isinstance(result, SeparatedFile)
            out["error"].append("" if ok else readable_error(result))
            out["channels"].append(result.channels if ok else 0)
            out["samples"].append(result.frames if ok else 0)
            out["sample_rate"].append(result.rate if ok else 0)
            out["gain_db"].append(gain_db(result.gains) if ok else 0.0)
            out["worker"].append(self.name)
            out["precision"].append(self.separator.precision)
            out["started_at"].append(started)
            out["finished_at"].append(ended)
            out["model_started"].append(started)
            out["model_seconds"].append((ended - started) * part)
            out["device_seconds"].append(device_s * part if device_s is not None else -1.0)
        return _columns(out)

    def _separate(self, rows: list[dict[str, Any]], work: Path) -> list[SeparatedFile | Exception]:
        """Read each row's source from storage, separate all together, put the stems in place;
        a track that fails anywhere is that track's error, the others go on."""
        config = self.config
        results: list[SeparatedFile | Exception | None] = [None] * len(rows)
        jobs, order, destinations = [], [], []
        with contextlib.ExitStack() as stack:
            for index, row in enumerate(rows):
                fs, path = open_location(str(row["drums_uri"]), config.storage_options)
                local = isinstance(fs, LocalFileSystem)
                try:
                    source = open_source(stack, str(row["source_uri"]), config.storage_options)
                except Exception as failure:  # the object could not even be opened
                    results[index] = failure
                    continue
                jobs.append((source, Path(posixpath.dirname(path)) if local else work / str(index)))
                order.append(index)
                destinations.append(None if local else fs)
            separated = self.separator.separate_files(jobs, format=config.options.stem_format)
        for index, result, fs in zip(order, separated, destinations, strict=True):
            results[index] = result
            if fs is None or not isinstance(result, SeparatedFile):
                continue
            try:
                for stem, local_path in result.paths.items():
                    _, remote = open_location(
                        str(rows[index][f"{stem}_uri"]), config.storage_options
                    )
                    upload_file(fs, local_path, remote)
            except Exception as failure:
                results[index] = RuntimeError(f"writing stems failed: {readable_error(failure)}")
        return results  # type: ignore[return-value]


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
        "gain_db": float(row["gain_db"]) if ok else None,
        **{name: str(row[name]) if ok else None for name in _URI_COLUMNS},
        "model_id": config.model_id,
        "options_hash": config.options_hash,
        "precision": str(row["precision"]),
        "started_at": datetime.fromtimestamp(float(row["started_at"]), UTC),
        "finished_at": datetime.fromtimestamp(float(row["finished_at"]), UTC),
        "worker": str(row["worker"]),
        "model_seconds": float(row["model_seconds"]),
    }


def gain_db(gains: dict[str, float]) -> float:
    """The level change of a track's stems, in dB: 0 unless they were scaled down to stay
    within full scale (all by the same gain; see the engine's encoders)."""
    return 20 * math.log10(min(gains.values(), default=1.0))


def _account(result: JobResult, row: dict[str, Any]) -> None:
    """Add one result row to the run's counts and its worker's timing."""
    if row["error"]:
        result.error += 1
        result.errors.append((str(row["track_id"]), str(row["error"])))
        return
    if float(row["gain_db"]) < 0:
        result.rescaled.append((str(row["track_id"]), float(row["gain_db"])))
    result.count_ok(
        str(row["worker"]),
        audio_s=int(row["samples"]) / int(row["sample_rate"]),
        started=float(row["model_started"]),
        busy_s=float(row["model_seconds"]),
        device_s=float(row["device_seconds"]) if float(row["device_seconds"]) >= 0 else None,
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
