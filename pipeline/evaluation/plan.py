"""Planning an evaluation: every (method, reference track) pair, and which of them to score.

A pair is skipped when its most recent ``ok`` row in the destination's manifests was scored from
the same reference files, the same estimate files and with the same scoring settings; a pair that
cannot be scored at all (no estimates for the track, a reference file missing) is planned as an
error without a task, so that it is reported in every run until it is fixed.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

from pipeline.evaluation.sources import EstimateTrack, Method
from pipeline.scoring import SCORER_VERSION, SISEC_RATE
from pipeline.storage.paths import sanitized_key
from pipeline.storage.references import MIXTURE, ReferenceTrack

SCORING = (
    f"museval {version('museval')} BSSEval v4, {SISEC_RATE} Hz, 1 s windows and hops; "
    f"metasep scorer {SCORER_VERSION}"
)


@dataclass(frozen=True)
class Pair:
    """One method's estimates of one reference track: the unit that a Ray task scores."""

    method: str
    reference: ReferenceTrack
    estimate: EstimateTrack | None  # None: the mixture baseline (read with the references)
    targets: tuple[str, ...]
    reference_version: str
    estimate_version: str
    scoring: str
    json_uri: str  # museval's per-track JSON: DST/museval/<method>/<split>/<track>.json
    problem: str = ""  # set when the pair cannot be scored; it becomes its error row

    @property
    def track(self) -> str:
        return self.reference.name

    @property
    def key(self) -> tuple[str, str]:
        return (self.method, self.reference.name)

    @property
    def estimate_location(self) -> str:
        if self.estimate is None:
            return self.reference.files.get(MIXTURE, self.reference.location)
        return self.estimate.location


@dataclass
class EvaluationPlan:
    """Every pair of the evaluation, split into those to score and those already scored."""

    pairs: list[Pair]
    todo: list[Pair] = field(default_factory=list)  # to score on Ray
    failing: list[Pair] = field(default_factory=list)  # cannot be scored: error rows
    skipped: list[Pair] = field(default_factory=list)  # scored before from the same files
    unmatched: dict[str, int] = field(default_factory=dict)  # method: estimate tracks unused


def scoring_settings(targets: tuple[str, ...]) -> str:
    """What decides the numbers besides the files: museval's version, its settings, the targets."""
    return f"{SCORING}; targets {','.join(targets)}"


def json_location(destination: str, method: str, split: str, track: str) -> str:
    """museval's per-track JSON of ``track`` (``museval.MethodStore().add_eval_dir`` reads
    ``DST/museval/<method>``); track names are sanitised, never leaving the folder."""
    name = sanitized_key(track).replace("/", "_")
    subset = sanitized_key(split).replace("/", "_")
    return posixpath.join(destination.rstrip("/"), "museval", method, subset, f"{name}.json")


def plan_evaluation(
    references: list[ReferenceTrack],
    methods: list[Method],
    estimates: dict[str, dict[str, EstimateTrack]],
    targets: tuple[str, ...],
    done: dict[tuple[str, str], dict[str, Any]],
    destination: str,
    split: str,
) -> EvaluationPlan:
    """Pair every method with every reference track and decide what each pair needs.

    ``estimates`` maps a method name to its estimates by track name; ``done`` maps (method,
    track) to the latest ``ok`` manifest row; ``destination`` is the evaluation's URL.
    """
    scoring = scoring_settings(targets)
    plan = EvaluationPlan(pairs=[])
    names = {reference.name for reference in references}
    for method in methods:
        found = estimates.get(method.name, {})
        plan.unmatched[method.name] = len(set(found) - names)
        for reference in references:
            json_uri = json_location(destination, method.name, split, reference.name)
            pair = _pair(method, reference, found.get(reference.name), targets, scoring, json_uri)
            plan.pairs.append(pair)
            row = done.get(pair.key)
            if pair.problem:
                plan.failing.append(pair)
            elif row and _same_inputs(row, pair):
                plan.skipped.append(pair)
            else:
                plan.todo.append(pair)
    return plan


def _pair(
    method: Method,
    reference: ReferenceTrack,
    estimate: EstimateTrack | None,
    targets: tuple[str, ...],
    scoring: str,
    json_uri: str,
) -> Pair:
    baseline = method.kind == "mixture"
    needed = (*targets, MIXTURE) if baseline else targets
    problem = ""
    missing_references = reference.missing(needed)
    if missing_references:
        problem = f"reference {reference.location} has no {_files(missing_references)}"
    elif not baseline and estimate is None:
        problem = f"no estimates of track {reference.name!r} in {method.location}"
    elif estimate is not None and estimate.problem:
        problem = estimate.problem
    elif estimate is not None:
        missing = [t for t in targets if t not in estimate.files]
        if missing:
            problem = f"no estimate of {', '.join(missing)} in {estimate.location}"
    if baseline:
        estimate_version = reference.version((MIXTURE,))
    else:
        estimate_version = estimate.version if estimate else ""
    return Pair(
        method=method.name,
        reference=reference,
        estimate=None if baseline else estimate,
        targets=targets,
        reference_version=reference.version(targets),
        estimate_version=estimate_version,
        scoring=scoring,
        json_uri=json_uri,
        problem=problem,
    )


def _same_inputs(row: dict[str, Any], pair: Pair) -> bool:
    return (
        row["reference_version"] == pair.reference_version
        and row["estimate_version"] == pair.estimate_version
        and row["scoring"] == pair.scoring
    )


def _files(names: list[str]) -> str:
    return ", ".join(f"{name}.wav" for name in names)
