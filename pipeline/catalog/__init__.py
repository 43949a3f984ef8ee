"""Catalog separation at scale: list a catalog in object storage, plan against its Parquet
manifests, separate the rest with Ray Data across model-holding workers, record the run.

The Prefect flow that strings these together is ``flows/separate.py``; ``metasep separate SRC DST``
runs it when SRC is a folder, prefix, glob or manifest of URIs.
"""

from pipeline.catalog.job import JobConfig, JobResult, run_job
from pipeline.catalog.listing import TRACK_SCHEMA, is_catalog_source, list_catalog
from pipeline.catalog.plan import Plan, plan_tracks

__all__ = [
    "TRACK_SCHEMA",
    "JobConfig",
    "JobResult",
    "Plan",
    "is_catalog_source",
    "list_catalog",
    "plan_tracks",
    "run_job",
]
