"""Prefect flow ``separate_catalog``: list a catalog, plan against its manifests, separate the
rest on Ray, record the run.

The tasks are thin wrappers over :mod:`pipeline.catalog`. None of them has Prefect retries:
transient storage errors are retried, per request, inside them
(:func:`pipeline.storage.location.retry_storage`), dead or stalled Ray workers are replaced by
the job, and a re-run resumes where a failed one stopped. The run holds the destination's lease
from its first write to its summary, so that two runs never separate into one destination at
once, and it writes its summary on every way out (a failure, the time limit, Ctrl-C), to the
destination or, while that does not take it, to the local journal. Runs on Prefect's ephemeral
API when no server is configured, and on a local Ray unless ``ray_address`` (or
``METASEP_RAY_ADDRESS``, or ``RAY_ADDRESS``) names one. Parameters left ``None`` come from
:mod:`pipeline.settings`, i.e. the ``METASEP_*`` environment of the process that runs the flow.
"""

from __future__ import annotations

import dataclasses
import math
import time
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import record_run, refuse_memory_locations
from flows.ray_session import connect_ray, disconnect_ray
from model import CheckpointError, load_checkpoint
from pipeline.catalog.housekeeping import read_done, survey_stems
from pipeline.catalog.job import INTERRUPTED, JobConfig, JobResult, run_job, tracks_per_call
from pipeline.catalog.listing import TRACK_SCHEMA, list_catalog
from pipeline.catalog.plan import Plan, catalog_options_hash, plan_tracks
from pipeline.catalog.preflight import check_destination, check_source, room_problem
from pipeline.catalog.summary import build_summary, format_summary
from pipeline.catalog.watchdog import stall_timeout_for
from pipeline.separator import SeparationOptions, identify
from pipeline.settings import Settings, settings_for_run
from pipeline.storage.errors import CatalogError
from pipeline.storage.journal import Journal
from pipeline.storage.lease import acquire_lease
from pipeline.storage.location import open_location
from pipeline.storage.manifest import new_run_id
from pipeline.weights import resolve_weights


@task(name="list-catalog", cache_policy=NO_CACHE)
def list_tracks(source: str, destination: str, storage_options: dict[str, Any] | None) -> pa.Table:
    tracks = list_catalog(source, storage_options, exclude=destination)
    get_run_logger().info("%s: %d audio files", source, tracks.num_rows)
    return tracks


@task(name="load-model", cache_policy=NO_CACHE)
def load_model(checkpoint: str, options: SeparationOptions) -> tuple[Any, str, str]:
    """The model the workers will hold (from the driver's ``checkpoint`` file), its id and the
    separator's options hash."""
    try:
        model = load_checkpoint(checkpoint)
    except CheckpointError as error:
        raise CatalogError(str(error)) from None
    try:
        model_id, options_hash = identify(model, options)
    except ValueError as error:
        raise CatalogError(str(error).splitlines()[0]) from None
    return model, model_id, options_hash


@task(name="plan-run", cache_policy=NO_CACHE)
def plan_run(
    tracks: pa.Table,
    destination: str,
    storage_options: dict[str, Any] | None,
    model_id: str,
    options_hash: str,
    stem_format: str,
) -> Plan:
    """The plan, after one listing of the stems the destination holds (partial files of killed
    writers removed) and its manifests (unreadable parts moved aside)."""
    fs, root = open_location(destination, storage_options)
    stems, partials = survey_stems(fs, root)
    done, quarantined = read_done(fs, root)
    plan = plan_tracks(tracks, done, model_id, options_hash, stems, stem_format)
    plan = dataclasses.replace(plan, partials_removed=partials, quarantined=quarantined)
    get_run_logger().info(
        "%d to separate, %d already done%s",
        plan.planned,
        plan.skipped,
        f", {plan.lost} of them again: their stems are gone" if plan.lost else "",
    )
    return plan


@task(name="separate-tracks", cache_policy=NO_CACHE)
def separate_tracks(
    todo: pa.Table, model: Any, config: JobConfig, ray_address: str | None, journal: Journal
) -> JobResult:
    import ray

    started_here = connect_ray(ray_address)
    config = _size_workers(ray, config, strict=started_here)
    get_run_logger().info(
        "separating %d tracks on %d worker(s) (%g GPU, %g CPU, %s network threads each)",
        todo.num_rows,
        config.workers,
        config.gpus_per_worker,
        config.cpus_per_worker,
        config.network_threads or "as many",
    )
    return run_job(todo, ray.put(model), config, journal)


@flow(name="separate-catalog", log_prints=True)
def separate_catalog(
    source: str,
    destination: str,
    options: SeparationOptions | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float | None = None,
    ray_address: str | None = None,
    storage_options: dict[str, Any] | None = None,
    fail_on_error: bool = False,
    run_id: str | None = None,
    flush_rows: int = 256,
    flush_seconds: float = 10.0,
    stall_timeout: float | None = None,
    timeout: float | None = None,
    wait: bool = False,
) -> dict[str, Any]:
    """Separate every audio file under ``source`` not yet done into ``destination``.

    Returns the run summary (also written to ``destination/runs/<run_id>.json``). ``options``
    (checkpoint, precision, windows, batching, stem format) go whole to every worker's
    ``Separator``; left ``None``, they are the settings' (``METASEP_*``). ``workers`` defaults
    to one per GPU (``gpus_per_worker`` > 0) or to the CPUs left after one for decoding and
    upload. ``stall_timeout`` (seconds without progress before a track is given up; default by
    device) and ``timeout`` (seconds for the whole run) bound the run; ``wait`` waits for a
    destination another run holds instead of refusing it. Other parameters left ``None`` take
    their value from the settings too; ``storage_options`` are merged over
    ``METASEP_STORAGE_OPTIONS`` and should hold no credentials, since Prefect records flow
    parameters.
    """
    started_at, started = datetime.now(UTC), time.time()
    settings = settings_for_run(
        get_run_logger(),
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
        ray_address=ray_address,
        storage_options=storage_options,
        stall_timeout=stall_timeout,
        timeout=timeout,
    )
    options = options or settings.separation()
    storage_options = settings.options()
    refuse_memory_locations(source, destination)
    check_destination(destination, storage_options)
    check_source(source, storage_options)
    checkpoint = checkpoint_file(options.checkpoint, settings)
    run_id = run_id or new_run_id()
    fs, root = open_location(destination, storage_options)
    journal = Journal(settings.cache_dir / "journal", fs, root)
    plan, result = Plan(TRACK_SCHEMA.empty_table(), 0, 0), JobResult()
    model_id = options_hash = ""
    with acquire_lease(fs, root, run_id, wait):
        try:
            _publish(journal)
            tracks = list_tracks(source, destination, storage_options)
            model, model_id, separator_hash = load_model(checkpoint, options)
            options_hash = catalog_options_hash(separator_hash, options.stem_format)
            plan = plan_run(
                tracks, destination, storage_options, model_id, options_hash, options.stem_format
            )
            config = JobConfig(
                destination=destination,
                run_id=run_id,
                model_id=model_id,
                options_hash=options_hash,
                options=options,
                workers=settings.workers or 0,
                gpus_per_worker=settings.gpus_per_worker,
                cpus_per_worker=settings.cpus_per_worker,
                storage_options=storage_options,
                fail_on_error=fail_on_error,
                flush_rows=flush_rows,
                flush_seconds=flush_seconds,
                stall_timeout=stall_timeout_for(
                    "cuda" if settings.gpus_per_worker > 0 else "cpu", settings.stall_timeout
                ),
                deadline=started + settings.timeout if settings.timeout else None,
            )
            next_tracks = plan.todo.slice(0, (settings.workers or 1) * tracks_per_call(config))
            result.stopped = room_problem(destination, storage_options, next_tracks)
            if plan.planned and not result.stopped:
                result = separate_tracks(plan.todo, model, config, settings.ray_address, journal)
            if result.stopped == INTERRUPTED:
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            result.stopped = INTERRUPTED
            raise
        finally:
            disconnect_ray()
            summary = build_summary(
                run_id=run_id,
                source=source,
                destination=destination,
                plan=plan,
                result=result,
                model_id=model_id,
                options_hash=options_hash,
                started_at=started_at,
                finished_at=datetime.now(UTC),
                storage_options=storage_options,
            )
            summary["summary_uri"] = record_run(summary, storage_options, journal)
    _publish_artifact(summary)
    return summary


def checkpoint_file(checkpoint: str, settings: Settings) -> str:
    """The file behind the run's checkpoint (a file, or named weights fetched here, on the
    driver, with the run's settings: cache, mirror, storage options); workers get the model
    through Ray, never the file."""
    try:
        return str(resolve_weights(checkpoint, settings))
    except CheckpointError as error:
        raise CatalogError(str(error)) from None


def _publish(journal: Journal) -> None:
    """What earlier runs on this machine could not write to the destination, written now (a
    warning, not a failure, when the store still does not take it)."""
    try:
        journal.publish()
    except Exception as error:
        get_run_logger().warning("journal of %s not published yet: %s", journal.folder, error)


def _size_workers(ray, config: JobConfig, strict: bool) -> JobConfig:
    """Fill in the default number of workers and check that the cluster can hold them (a local
    Ray cannot grow: asking for more would wait forever, so ``strict`` refuses).

    A local cluster started for the run is this machine, all of it the run's: there each CPU
    worker's network also takes its share of the CPUs that no worker holds (the one left for
    decoding and upload; its decoding and encoding threads are light next to the network), so
    that on two cores the one worker computes on both (22% faster, measured)."""
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    workers = config.workers
    if not workers:
        if config.gpus_per_worker > 0:
            workers = max(1, math.floor(gpus / config.gpus_per_worker))
        else:
            workers = max(1, math.floor((cpus - 1) / config.cpus_per_worker))
    needed_cpus = workers * config.cpus_per_worker
    needed_gpus = workers * config.gpus_per_worker
    if needed_cpus > cpus or needed_gpus > gpus:
        message = (
            f"{workers} worker(s) with {config.cpus_per_worker:g} CPU and "
            f"{config.gpus_per_worker:g} GPU each need "
            f"{needed_cpus:g} CPUs and {needed_gpus:g} GPUs; the cluster has {cpus:g} and {gpus:g}"
        )
        if strict:
            raise CatalogError(message)
        get_run_logger().warning("%s (waiting for the cluster to grow)", message)
    threads = config.network_threads
    if strict and config.gpus_per_worker == 0 and not threads:
        threads = max(1, math.floor(cpus / workers))
    return dataclasses.replace(config, workers=workers, network_threads=threads)


def _publish_artifact(summary: dict[str, Any]) -> None:
    """A table artifact in Prefect's UI: the counts and the throughput of the run."""
    tracks = summary["tracks"]
    rows = [{"measure": f"tracks {name}", "value": count} for name, count in tracks.items()]
    rows += [
        {"measure": "tracks flagged (manifest column flags)", "value": summary["flagged_count"]},
        {"measure": "audio seconds", "value": summary["audio_seconds"]},
        {"measure": "job wall seconds", "value": summary["job_seconds"]},
        {"measure": "audio seconds per second", "value": summary["audio_seconds_per_second"]},
    ]
    rows += [
        {"measure": f"worker {name} busy fraction", "value": worker["busy_fraction"]}
        for name, worker in summary["workers"].items()
    ]
    create_table_artifact(
        table=rows,
        key="separate-catalog",
        description=f"run {summary['run_id']}: stems in {summary['stems']}",
    )
    get_run_logger().info("%s", format_summary(summary).splitlines()[0])
