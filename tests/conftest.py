"""Shared fixtures: the reference vectors made by the authors' implementation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("METASEP_REFERENCE_DIR", REPO.parent / "shared" / "reference"))


# A test that starts Prefect or a Ray cluster is an integration test: `make test-fast` (pytest -m
# "not slow") leaves it to `make test`. Slow tests that use none of these are marked by hand.
_INTEGRATION_FIXTURES = {"prefect_api", "ray_cluster_address", "ray_local"}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if _INTEGRATION_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"reference vectors not found at {REFERENCE_DIR} (set METASEP_REFERENCE_DIR)")
    return REFERENCE_DIR


def write_tone_catalog(root: Path, tracks: int = 4, valid: int = 1, seconds: float = 4.0) -> Path:
    """A small MUSDB18-HQ-layout catalog of tones: each track's stems have their own pitch
    (so a stem's track can be told from its spectrum) and vocals are silent for the first two seconds."""
    import numpy as np
    import soundfile as sf

    rate = 44100
    t = np.arange(int(rate * seconds)) / rate
    for split, count in (("train", tracks), ("valid", valid)):
        for k in range(count):
            folder = root / split / f"track {k}"
            folder.mkdir(parents=True, exist_ok=True)
            base = 100.0 * (k + 1) + (0 if split == "train" else 50)
            stems = {
                "drums": 0.3 * np.sin(2 * np.pi * base * 1.0 * t) * np.exp(-((t * 2) % 1) * 8),
                "bass": 0.3 * np.sin(2 * np.pi * base * 0.5 * t),
                "other": 0.2 * np.sin(2 * np.pi * base * 2.0 * t),
                "vocals": 0.2 * np.sin(2 * np.pi * base * 3.0 * t) * (t >= 2.0),
            }
            for name, x in stems.items():
                sf.write(folder / f"{name}.wav", np.stack([x, 0.7 * x], 1), rate, subtype="FLOAT")
    return root


@pytest.fixture(scope="session")
def tone_catalog(tmp_path_factory) -> Path:
    return write_tone_catalog(tmp_path_factory.mktemp("tones"))


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server mode) on 127.0.0.1; yields the fsspec storage options that
    reach it. Each test makes its own bucket."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "eu-west-1"},
    }
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the S3 server: (s3fs filesystem, bucket name, storage options)."""
    import re

    import s3fs

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-")
    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir(name)
    return fs, name, s3_server


@pytest.fixture(scope="session")
def prefect_api():
    """Prefect's test harness (a real API server on 127.0.0.1), shared by the flow tests."""
    # Importing prefect.main configures Prefect's console logging; done here, its handlers write
    # to the session's output, not to the captured output of the first test that runs a flow
    # (closed when that test ends, which would break every later flow's logging).
    import prefect.main  # noqa: F401
    from prefect.testing.utilities import prefect_test_harness

    previous = os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    with prefect_test_harness(server_startup_timeout=120):
        yield
    if previous is None:
        os.environ.pop("PREFECT_SERVER_ANALYTICS_ENABLED")


@pytest.fixture(scope="session")
def ray_cluster_address():
    """One local Ray cluster (2 CPUs, its own processes) for the whole session; tests that need
    a cluster of another shape start their own and this one stays up for the next test."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    yield cluster.address
    import ray

    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def ray_local(ray_cluster_address):
    """This process connected to the session's Ray cluster; yields its address."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster_address, configure_logging=False)
    yield ray_cluster_address
