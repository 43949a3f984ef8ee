"""Prefect flow ``evaluate_catalog``: score methods' estimates against a reference catalog with
museval, one Ray task per track and method, and report the SiSEC numbers.

The tasks are thin wrappers over :mod:`pipeline.evaluation`, without Prefect retries: storage
requests retry their transient errors themselves, Ray re-runs a task whose worker died, and a
rerun scores only what is missing (see :mod:`pipeline.storage.location` for why one layer).
Runs on Prefect's ephemeral API when no server is configured, and on a local Ray unless
``ray_address`` (or ``METASEP_RAY_ADDRESS``, or ``RAY_ADDRESS``) names one (or a parent flow already connected one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import record_run, refuse_memory_locations
from flows.ray_session import connect_ray, disconnect_ray
from model import STEMS
from pipeline.evaluation.job import (
    EVALUATION_SCHEMA,
    EvaluationConfig,
    EvaluationResult,
    run_evaluation,
)
from pipeline.evaluation.plan import EvaluationPlan, plan_evaluation
from pipeline.evaluation.report import (
    build_summary,
    final_rows,
    format_summary,
    write_reports,
)
from pipeline.evaluation.sources import (
    EstimateTrack,
    Method,
    list_estimates,
    parse_methods,
    resolve_methods,
)
from pipeline.settings import settings_for_run
from pipeline.storage.errors import CatalogError
from pipeline.storage.location import open_location
from pipeline.storage.manifest import latest_ok_rows, new_run_id, read_manifests
from pipeline.storage.references import ReferenceTrack, list_references


@task(name="list-references", cache_policy=NO_CACHE)
def list_reference_tracks(
    references: str, split: str, limit: int | None, storage_options: dict[str, Any] | None
) -> list[ReferenceTrack]:
    tracks = list_references(references, split, storage_options)[:limit]
    get_run_logger().info("%s: %d reference tracks", references, len(tracks))
    return tracks


@task(name="list-estimates", cache_policy=NO_CACHE)
def list_method_estimates(
    method: Method, targets: tuple[str, ...], storage_options: dict[str, Any] | None
) -> dict[str, EstimateTrack]:
    found = list_estimates(method, targets, storage_options)
    if method.kind != "mixture":
        get_run_logger().info(
            "%s (%s): estimates of %d tracks", method.name, method.kind, len(found)
        )
    return found


@task(name="plan-evaluation", cache_policy=NO_CACHE)
def plan_run(
    references: list[ReferenceTrack],
    methods: list[Method],
    estimates: dict[str, dict[str, EstimateTrack]],
    targets: tuple[str, ...],
    destination: str,
    split: str,
    storage_options: dict[str, Any] | None,
) -> EvaluationPlan:
    fs, root = open_location(destination, storage_options)
    done = latest_ok_rows(read_manifests(fs, root, EVALUATION_SCHEMA), ("method", "track"))
    plan = plan_evaluation(references, methods, estimates, targets, done, destination, split)
    get_run_logger().info(
        "%d pairs: %d to score, %d already scored, %d cannot be scored",
        len(plan.pairs),
        len(plan.todo),
        len(plan.skipped),
        len(plan.failing),
    )
    return plan


@task(name="score-tracks", cache_policy=NO_CACHE)
def score_tracks(
    plan: EvaluationPlan, config: EvaluationConfig, ray_address: str | None
) -> EvaluationResult:
    if plan.todo:
        import ray

        connect_ray(ray_address)
        cpus = ray.cluster_resources().get("CPU", 1.0)
        workers = config.workers or max(1, math.floor(cpus / config.cpus_per_task))
        config = EvaluationConfig(**{**config.__dict__, "workers": workers})
        get_run_logger().info("scoring %d pairs with %d worker(s)", len(plan.todo), workers)
    return run_evaluation(plan.todo, plan.failing, config)


@task(name="write-reports", cache_policy=NO_CACHE)
def report_run(
    plan: EvaluationPlan,
    run_id: str,
    methods: list[str],
    destination: str,
    storage_options: dict[str, Any] | None,
):
    fs, root = open_location(destination, storage_options)
    rows = final_rows(read_manifests(fs, root, EVALUATION_SCHEMA), plan, run_id)
    summary, outputs = write_reports(destination, rows, methods, storage_options)
    return rows, summary, outputs


@flow(name="evaluate-catalog", log_prints=True)
def evaluate_catalog(
    references: str,
    estimates: Mapping[str, str] | Sequence[str] | str,
    destination: str,
    workers: int | None = None,
    ray_address: str | None = None,
    storage_options: dict[str, Any] | None = None,
    split: str = "test",
    targets: Sequence[str] = STEMS,
    with_mixture: bool = False,
    limit: int | None = None,
    cpus_per_task: float = 1.0,
    run_id: str | None = None,
    flush_rows: int = 64,
    flush_seconds: float = 10.0,
) -> dict[str, Any]:
    """Score every method's estimates of every track of ``references/split`` into
    ``destination``; pairs already scored from the same files are not scored again.

    ``estimates``: a mapping name -> location, or a list of locations (``NAME=LOCATION`` or a
    bare location named after its last part); each is a ``separate_catalog`` destination or a
    folder in museval's layout. ``with_mixture`` adds the mixture baseline. ``workers`` defaults
    to one per CPU of the cluster. Returns the run summary (also in ``DST/runs/<run_id>.json``),
    whose ``scores`` are the rows of ``DST/summary.parquet``.
    """
    settings = settings_for_run(
        get_run_logger(), ray_address=ray_address, storage_options=storage_options
    )
    ray_address, storage_options = settings.ray_address, settings.options()
    targets = tuple(targets)
    unknown = sorted(set(targets) - set(STEMS))
    if unknown or not targets:
        raise CatalogError(f"targets must be among {', '.join(STEMS)}; got {', '.join(unknown)}")
    refuse_memory_locations(destination)
    started_at = datetime.now(UTC)
    run_id = run_id or new_run_id()
    methods = resolve_methods(parse_methods(estimates), with_mixture, storage_options)
    tracks = list_reference_tracks(references, split, limit, storage_options)
    found = {m.name: list_method_estimates(m, targets, storage_options) for m in methods}
    plan = plan_run(tracks, methods, found, targets, destination, split, storage_options)
    config = EvaluationConfig(
        destination=destination,
        run_id=run_id,
        workers=workers or 0,
        cpus_per_task=cpus_per_task,
        storage_options=storage_options,
        flush_rows=flush_rows,
        flush_seconds=flush_seconds,
    )
    try:
        result = score_tracks(plan, config, ray_address)
    finally:
        disconnect_ray()
    names = [m.name for m in methods]
    rows, scores, outputs = report_run(plan, run_id, names, destination, storage_options)
    summary = build_summary(
        run_id=run_id,
        references=references,
        methods={m.name: m.location or "reference mixture" for m in methods},
        destination=destination,
        plan=plan,
        result=result,
        rows=rows,
        summary=scores,
        outputs=outputs,
        started_at=started_at,
        finished_at=datetime.now(UTC),
    )
    summary["summary_uri"] = record_run(summary, storage_options)
    _publish_artifact(summary)
    get_run_logger().info("%s", format_summary(summary).splitlines()[0])
    return summary


def _publish_artifact(summary: dict[str, Any]) -> None:
    """A table artifact in Prefect's UI: the SiSEC numbers per method and target."""
    rows = [
        {
            "method": score["method"],
            "target": score["target"],
            **{
                f"{m} median": _rounded(score.get(f"{m}_median"))
                for m in ("SDR", "SIR", "ISR", "SAR")
            },
            "SDR mean": _rounded(score.get("SDR_mean")),
            "tracks": score["tracks"],
            "failed tracks": score.get("errors", 0),
        }
        for score in summary["scores"]
    ]
    pairs = summary["pairs"]
    create_table_artifact(
        table=rows or [{"method": "-", "target": "-", "tracks": 0}],
        key="evaluate-catalog",
        description=(
            f"run {summary['run_id']}: museval BSSEval v4 (median over frames, then over tracks); "
            f"{pairs['ok']} pairs scored, {pairs['skipped']} reused, {summary['failing_now']} "
            f"failing; details in {summary['outputs']['summary']}"
        ),
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
