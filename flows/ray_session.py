"""The Ray connection of a flow: join the cluster named, or start a local Ray and stop it after.

A flow that finds Ray already connected in its process (a parent flow such as ``benchmark``, a
notebook, a test) uses that connection and leaves it up; only a Ray the flow started itself is
shut down when it ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.settings import load_settings

_STARTED_BY_FLOW = False


def connect_ray(ray_address: str | None) -> bool:
    """Join the cluster at ``ray_address`` (else the settings': ``METASEP_RAY_ADDRESS``, then
    ``RAY_ADDRESS``), else start a local Ray (unless one is already up in this process).
    Returns whether the flow started a local Ray."""
    import ray

    global _STARTED_BY_FLOW
    if not ray.is_initialized():
        address = load_settings(ray_address=ray_address).ray_address
        _init(address)
        _STARTED_BY_FLOW = address is None
    return _STARTED_BY_FLOW


def disconnect_ray() -> None:
    """Stop the local Ray the flow started (a cluster it joined, or a Ray it found, stays)."""
    import ray

    global _STARTED_BY_FLOW
    if _STARTED_BY_FLOW:
        ray.shutdown()
        _STARTED_BY_FLOW = False


@contextmanager
def ray_held(ray_address: str | None) -> Iterator[None]:
    """Keep one Ray connection across several flows (each then finds it and leaves it up);
    disconnect at the end only if it was not there before."""
    import ray

    if ray.is_initialized():
        yield
        return
    _init(load_settings(ray_address=ray_address).ray_address)
    try:
        yield
    finally:
        ray.shutdown()


def _init(address: str | None) -> None:
    """Connect to ``address``, or start a Ray of our own: "local", because with no address
    ``ray.init`` joins whatever cluster ``ray start`` last recorded on this machine, someone
    else's perhaps."""
    import ray

    ray.init(address=address or "local", include_dashboard=False, configure_logging=False)
