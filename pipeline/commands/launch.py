"""Starting Prefect flows from the command line: the one module of ``pipeline`` that imports
``flows``.

Imports point ``flows -> pipeline -> model``, but a command that runs a flow is an entry point
and sits above both. Moving the whole CLI above ``flows`` would move the ``metasep`` entry point
(``pipeline.cli:main``, which the image and its tests name) for the sake of four commands out of
ten; instead those commands call the three functions here, and only these import a flow. The import waits until a flow is started for a
second reason too: Prefect reads its settings when it is imported, so :func:`prepare_prefect`
must run first (and commands that start no flow never pay for importing Prefect).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.commands import UsageError
from pipeline.settings import Settings, use_settings
from pipeline.storage.errors import CatalogError


def prepare_prefect() -> None:
    """Settings for a command that runs a flow; call it before the flow's module is imported.
    Gives the ephemeral API more than its default 20 s to start on a busy machine, turns off its
    analytics, and keeps the per-request lines of its HTTP client out of the command's output."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    logging.getLogger("httpx").setLevel(logging.WARNING)


@contextmanager
def _flow_run(settings: Settings) -> Iterator[None]:
    """Around a flow started by a command: Prefect prepared, ``settings`` in force, and a catalog
    the flow cannot use (a wrong SRC, say) reported as a usage error.

    The settings reach the flow through :func:`use_settings`, not as flow parameters: storage
    options may hold credentials, and Prefect records parameters.
    """
    prepare_prefect()
    try:
        with use_settings(settings):
            yield
    except CatalogError as error:
        raise UsageError(str(error)) from None


def cluster_parameters(settings: Settings) -> dict[str, Any]:
    """The settings of the cluster a catalog flow runs on, as its parameters (none of them a
    credential): workers and what each holds, and the Ray address."""
    names = ("workers", "gpus_per_worker", "cpus_per_worker", "ray_address")
    return {name: getattr(settings, name) for name in names}


def separate_catalog(
    settings: Settings, source: str, destination: str, **parameters: Any
) -> dict[str, Any]:
    """Run the ``separate-catalog`` flow (:func:`flows.separate.separate_catalog`)."""
    with _flow_run(settings):
        from flows.separate import separate_catalog as flow

        return flow(source, destination, **parameters)


def evaluate_catalog(
    settings: Settings, references: str, estimates: list[str], destination: str, **parameters: Any
) -> dict[str, Any]:
    """Run the ``evaluate-catalog`` flow (:func:`flows.evaluate.evaluate_catalog`)."""
    with _flow_run(settings):
        from flows.evaluate import evaluate_catalog as flow

        return flow(references, estimates, destination, **parameters)


def benchmark(
    settings: Settings, destination: str, checkpoints: dict[str, str], **parameters: Any
) -> dict[str, Any]:
    """Run the ``benchmark`` flow (:func:`flows.benchmark.benchmark`)."""
    with _flow_run(settings):
        from flows.benchmark import benchmark as flow

        return flow(destination, checkpoints, **parameters)
