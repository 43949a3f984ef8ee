"""Prefect flow ``benchmark``: the project's end-to-end quality number in one run.

Render a test split with ``metasep synth`` (or take a reference catalog), separate its mixtures
with each checkpoint through ``separate_catalog``, score every checkpoint and the mixture baseline
with ``evaluate_catalog``, and return the comparison. Both subflows share one Ray connection; all
of them are incremental, so a second run with the same arguments separates and scores nothing.

``DST/references/seed<K>-<S>s/`` (when rendered), ``DST/separated/<name>/`` (one catalog
destination per checkpoint) and ``DST/evaluation/`` (the scores) hold everything.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.evaluate import evaluate_catalog
from flows.ray_session import ray_held
from flows.separate import separate_catalog
from pipeline.evaluation.sources import parse_methods
from pipeline.settings import settings_for_run
from pipeline.storage.errors import CatalogError
from pipeline.storage.location import open_location, write_bytes
from pipeline.storage.references import MIXTURE, list_references


@task(name="render-references", cache_policy=NO_CACHE)
def render_references(destination: str, tracks: int, seconds: float, seed: int, split: str) -> str:
    """``DST/references/seed<K>-<S>s``: ``tracks`` synth tracks of the split, rendered once."""
    from pipeline.synth import SynthError, find_synthesizer, write_dataset
    from pipeline.synth.dataset import track_name

    root = Path(destination) / "references" / f"seed{seed}-{seconds:g}s"
    names = [track_name(split, seed, index) for index in range(tracks)]
    if all((root / split / name / f"{MIXTURE}.wav").exists() for name in names):
        get_run_logger().info("references: %d tracks already in %s", tracks, root)
        return str(root)
    try:
        write_dataset(
            root, split, tracks, seconds, seed, find_synthesizer(), len(os.sched_getaffinity(0))
        )
    except SynthError as error:
        raise CatalogError(str(error)) from None
    return str(root)


@task(name="choose-mixtures", cache_policy=NO_CACHE)
def mixtures_source(
    references: str,
    split: str,
    tracks: int | None,
    destination: str,
    storage_options: dict[str, Any] | None,
) -> str:
    """What ``separate_catalog`` should list: a glob over every track's mixture, or, when only the
    first ``tracks`` are wanted, a list of their URIs written to ``DST/mixtures.txt``."""
    listed = list_references(references, split, storage_options)
    chosen = [t.files[MIXTURE] for t in listed[:tracks] if MIXTURE in t.files]
    if not chosen:
        raise CatalogError(f"{references}: no track has a {MIXTURE}.wav to separate")
    if tracks is None or tracks >= len(listed):
        folder = posixpath.dirname(listed[0].location)
        return posixpath.join(folder, "*", posixpath.basename(chosen[0]))
    fs, root = open_location(destination, storage_options)
    path = posixpath.join(root, "mixtures.txt")
    write_bytes(fs, path, ("\n".join(chosen) + "\n").encode())
    return path if "://" not in destination else fs.unstrip_protocol(path)


@flow(name="benchmark", log_prints=True)
def benchmark(
    destination: str,
    checkpoints: Mapping[str, str] | None = None,
    references: str | None = None,
    tracks: int | None = 4,
    seconds: float = 30.0,
    seed: int = 3,
    split: str = "test",
    workers: int | None = None,
    separate_workers: int | None = None,
    ray_address: str | None = None,
    storage_options: dict[str, Any] | None = None,
    with_mixture: bool = True,
) -> dict[str, Any]:
    """Separate a reference catalog with each checkpoint (name -> path or ``default``) and score
    them all, with the mixture baseline, into ``destination``.

    Without ``references``, ``tracks`` tracks of ``seconds`` s are rendered with ``seed`` (3: the
    default model's held-out test seed). ``workers`` scoring tasks run at once (default: one per
    CPU); ``separate_workers`` model workers separate (default: ``separate_catalog``'s). Returns ``{"references", "separations": {name: run
    summary}, "evaluation": evaluation summary}``.
    """
    checkpoints = dict(checkpoints or {"default": "default"})
    parse_methods(checkpoints)  # names that can be method names, before any work
    # Storage options for this flow's own I/O; the subflows get them as given and resolve them
    # the same way, so that credentials from the environment never become recorded parameters.
    # The separation options hold none: each subflow records them whole, its checkpoint set.
    settings = settings_for_run(
        get_run_logger(), ray_address=ray_address, storage_options=storage_options
    )
    options, separation = settings.options(), settings.separation()
    if references is None:
        if "://" in destination:
            raise CatalogError("rendering references needs a local destination (or give REFS)")
        references = render_references(destination, tracks or 4, seconds, seed, split)
    source = mixtures_source(references, split, tracks, destination, options)
    separated = {name: posixpath.join(destination, "separated", name) for name in checkpoints}
    with ray_held(ray_address):
        separations = {
            name: separate_catalog(
                source,
                separated[name],
                options=separation.model_copy(update={"checkpoint": checkpoint}),
                workers=separate_workers,
                ray_address=ray_address,
                storage_options=storage_options,
            )
            for name, checkpoint in checkpoints.items()
        }
        evaluation = evaluate_catalog(
            references,
            separated,
            posixpath.join(destination, "evaluation"),
            workers=workers,
            ray_address=ray_address,
            storage_options=storage_options,
            split=split,
            with_mixture=with_mixture,
            limit=tracks,
        )
    return {"references": references, "separations": separations, "evaluation": evaluation}
