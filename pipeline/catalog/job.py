"""The Ray Data job of a catalog run: tracks stream through model workers, rows into manifests.

Each model worker is an actor (``workers`` of them, ``gpus_per_worker`` GPUs and
``cpus_per_worker`` CPUs each) that holds one separator, built once
(:class:`pipeline.catalog.worker.SeparateWorker`); it takes a few tracks per call (more on a GPU,
so that windows of several tracks fill each forward pass). No track, decoded or separated, ever
sits in memory or in Ray's object store, so a two-hour concert costs what a song costs.

The driver writes one manifest row per track, after its stems are in place, flushing parts as it
goes (to the local journal while the store does not take them). Ray restarts dead workers and
retries their calls elsewhere; a track is redone from its start, and its row is written once
whatever Ray retried. The watchdog (:mod:`pipeline.catalog.watchdog`) turns stalled tracks into
error rows and ends the run at its deadline; a full destination stops the run too, leaving the
rest for the next one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from model import STEMS
from pipeline.catalog.watchdog import RunBoard, Watchdog
from pipeline.catalog.worker import NOT_STARTED, SeparateWorker
from pipeline.runtime import ONE_ARENA_ENV
from pipeline.separator import SeparationOptions
from pipeline.storage.journal import Journal
from pipeline.storage.location import open_location
from pipeline.storage.manifest import ManifestWriter
from pipeline.storage.runs import RunTally

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted"
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
    stall_timeout: float = 900.0  # seconds without progress before a track is given up
    deadline: float | None = None  # time.time() at which the run stops (None: no limit)


@dataclass
class JobResult(RunTally):
    """What the job did (:class:`pipeline.storage.runs.RunTally`: counts, audio, per-worker
    model-busy time), why it stopped before the end (if it did), the failures and the manifest
    parts written (some maybe in the journal)."""

    stopped: str = ""  # why the run ended early: a failure, the time limit, a full destination
    errors: list[tuple[str, str]] = field(default_factory=list)  # (track_id, message)
    rescaled: list[tuple[str, float]] = field(default_factory=list)  # (track_id, gain_db)
    flagged: list[tuple[str, list[str]]] = field(default_factory=list)  # (track_id, its flags)
    manifest_parts: list[str] = field(default_factory=list)
    journaled: int = 0  # files of the destination waiting in the local journal at the end


def run_job(
    tracks: pa.Table, model_ref: Any, config: JobConfig, journal: Journal | None = None
) -> JobResult:
    """Separate ``tracks`` (listing rows) on the connected Ray cluster, writing stems and
    manifest rows.

    ``model_ref`` is a Ray object reference to the :class:`MultiTasNet` every worker loads, so
    that a checkpoint on the driver's disk reaches workers on any node. Manifest parts the
    destination does not take go to ``journal``."""
    import ray

    fs, destination = open_location(config.destination, config.storage_options)
    result = JobResult()
    if not tracks.num_rows:
        return result
    started = time.monotonic()
    board = _start_board(ray)
    writer = ManifestWriter(
        fs, destination, config.run_id, config.flush_rows, config.flush_seconds, journal=journal
    )
    rows = iter(())
    try:
        rows = iter(_build_dataset(ray, tracks, model_ref, board, config).iter_rows())
        with (
            Watchdog(board, config.stall_timeout, config.deadline) as watchdog,
            tqdm(total=tracks.num_rows, unit="track", desc="separating", dynamic_ncols=True) as bar,
        ):
            _collect(rows, writer, result, config, watchdog, bar)
    except KeyboardInterrupt:  # the caller writes the summary of what was done, then stops
        result.stopped = INTERRUPTED
    finally:
        getattr(rows, "close", lambda: None)()  # stops Ray Data's execution of the rest
        writer.close()  # rows collected so far are true (their stems exist) even if Ray failed
        ray.kill(board)
    result.wall_s = time.monotonic() - started
    result.manifest_parts = writer.parts
    result.journaled = writer.journaled
    return result


def _start_board(ray) -> Any:
    """The run's board, on the driver's node (which lives as long as the run does, where a
    worker's node may go)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(RunBoard).options(num_cpus=0, scheduling_strategy=here).remote()


def _collect(rows, writer: ManifestWriter, result: JobResult, config, watchdog, bar) -> None:
    """Write each track's row once, and stop where the run must."""
    written: set[str] = set()
    for row in rows:
        if watchdog.timed_out:
            result.stopped = "the time limit was reached"
        if row["outcome"] != NOT_STARTED and row["track_id"] not in written:
            written.add(row["track_id"])  # a retried call's duplicate: the first row stands
            writer.add(_manifest_row(row, config))
            _account(result, row)
            bar.update()
            bar.set_postfix(ok=result.ok, error=result.error)
            if row["problem"] == "disk full":
                result.stopped = f"the destination is full ({row['error']})"
            elif config.fail_on_error and row["error"]:
                result.stopped = "a track failed (--fail-on-error)"
        if result.stopped:
            return


def _build_dataset(ray, tracks: pa.Table, model_ref: Any, board: Any, config: JobConfig):
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver shows one bar in tracks
    blocks = min(tracks.num_rows, 5000)
    step = math.ceil(tracks.num_rows / blocks)
    parts = [tracks.slice(start, step) for start in range(0, tracks.num_rows, step)]
    return ray.data.from_arrow(parts).map_batches(
        SeparateWorker,
        batch_size=tracks_per_call(config),
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=config.workers),
        num_cpus=config.cpus_per_worker,
        num_gpus=config.gpus_per_worker,
        fn_constructor_kwargs={"model": model_ref, "config": config, "board": board},
        # Ray Data calls the worker from a thread of its own: one arena keeps freed memory there
        runtime_env={"env_vars": ONE_ARENA_ENV},
    )  # Ray Data restarts dead actors and retries their tasks (max_restarts=-1) by default


def tracks_per_call(config: JobConfig) -> int:
    """Tracks a worker separates together: as the options say, else the engine's default for
    the workers' device (several on a GPU, one on a CPU)."""
    return config.options.tracks_on("cuda" if config.gpus_per_worker > 0 else "cpu")


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
        "residual_db": float(row["residual_db"]) if ok else None,
        "flags": _flags(row) if ok else None,
        "tags": list(json.loads(str(row["tags"])).items()) if ok else None,
        **{name: str(row[name]) if ok else None for name in _URI_COLUMNS},
        "model_id": config.model_id,
        "options_hash": config.options_hash,
        "precision": str(row["precision"]),
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
    if float(row["gain_db"]) < 0:
        result.rescaled.append((str(row["track_id"]), float(row["gain_db"])))
    if _flags(row):
        result.flagged.append((str(row["track_id"]), _flags(row)))
    result.count_ok(
        str(row["worker"]),
        audio_s=int(row["samples"]) / int(row["sample_rate"]),
        started=float(row["started_at"]),
        busy_s=float(row["model_seconds"]),
        device_s=float(row["device_seconds"]) if float(row["device_seconds"]) >= 0 else None,
    )


def _flags(row: dict[str, Any]) -> list[str]:
    """A result row's quality flags, as the list the manifest keeps."""
    return [flag for flag in str(row["flags"]).split(",") if flag]
