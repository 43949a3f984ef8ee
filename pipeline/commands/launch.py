"""Starting Prefect flows from the command line: the one module of ``pipeline`` that imports
``flows``.

Imports point ``flows -> pipeline -> model``, but a command that runs a flow is an entry point
and sits above both. Rather than move the CLI out of ``pipeline``, the commands call the three
functions here, and only these import a flow. The import waits until a flow is started for a
second reason too: Prefect reads its settings when it is imported, so :func:`prepare_prefect`
must run first (and commands that start no flow never pay for importing Prefect).
"""

from __future__ import annotations

import logging
import os
from typing import Any


def prepare_prefect() -> None:
    """Settings for a command that runs a flow; call it before the flow's module is imported.
    Gives the ephemeral API more than its default 20 s to start on a busy machine, turns off its
    analytics, and keeps the per-request lines of its HTTP client out of the command's output."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    logging.getLogger("httpx").setLevel(logging.WARNING)


def separate_catalog(source: str, destination: str, **parameters: Any) -> dict[str, Any]:
    """Run the ``separate-catalog`` flow (:func:`flows.separate.separate_catalog`)."""
    prepare_prefect()
    from flows.separate import separate_catalog as flow

    return flow(source, destination, **parameters)


def evaluate_catalog(
    references: str, estimates: list[str], destination: str, **parameters: Any
) -> dict[str, Any]:
    """Run the ``evaluate-catalog`` flow (:func:`flows.evaluate.evaluate_catalog`)."""
    prepare_prefect()
    from flows.evaluate import evaluate_catalog as flow

    return flow(references, estimates, destination, **parameters)


def benchmark(destination: str, checkpoints: dict[str, str], **parameters: Any) -> dict[str, Any]:
    """Run the ``benchmark`` flow (:func:`flows.benchmark.benchmark`)."""
    prepare_prefect()
    from flows.benchmark import benchmark as flow

    return flow(destination, checkpoints, **parameters)
