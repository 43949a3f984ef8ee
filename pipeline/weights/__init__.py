"""Named weights: the registry (:mod:`.registry`), the resumable download (:mod:`.download`) and
the cache that checks and converts them once (:mod:`.store`)."""

from pipeline.weights.registry import REGISTRY, WeightsEntry, weights_entry
from pipeline.weights.store import (
    WeightsError,
    cached_file,
    fetch_weights,
    resolve_weights,
    source_url,
    weights_table,
)

__all__ = [
    "REGISTRY",
    "WeightsEntry",
    "WeightsError",
    "cached_file",
    "fetch_weights",
    "resolve_weights",
    "source_url",
    "weights_entry",
    "weights_table",
]
