"""What the flows share: the task that records a run's summary, and the refusal of memory://.

``separate_catalog`` and ``evaluate_catalog`` both end by writing their summary to
``DST/runs/<run_id>.json`` (:func:`pipeline.storage.runs.write_summary`), and both hand their
locations to Ray workers, which are other processes: a ``memory://`` file system, which lives
inside one process, cannot reach them.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.storage.errors import CatalogError
from pipeline.storage.journal import Journal
from pipeline.storage.runs import write_summary


@task(name="write-summary", cache_policy=NO_CACHE)
def record_run(
    summary: dict[str, Any], storage_options: dict[str, Any] | None, journal: Journal | None = None
) -> str:
    """Write the run's summary to ``<its destination>/runs/<run_id>.json`` (or to ``journal``
    while the destination does not take it); returns where it went."""
    return write_summary(summary, storage_options, journal)


def refuse_memory_locations(*locations: str) -> None:
    """Raise :class:`CatalogError` for the first of ``locations`` on ``memory://``: Ray workers
    would each see an empty file system of their own."""
    for location in locations:
        if str(location).startswith("memory://"):
            raise CatalogError(
                f"{location}: memory:// lives inside one process and Ray workers are other "
                "processes; use a local folder or object storage"
            )
