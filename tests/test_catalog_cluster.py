"""Two-node Ray: a node holding a model worker is removed mid-run, and every track still ends up
exactly once in the manifest, with its stems in place."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from model import STEMS, MultiTasNet, TasNetConfig
from pipeline.audio import read_audio
from pipeline.catalog import JobConfig, list_catalog, run_job
from pipeline.storage.location import open_location
from pipeline.storage.manifest import read_manifests


@pytest.fixture
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=3) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def remove_a_busy_node(cluster, nodes, manifests, removed: list, job_done: threading.Event) -> None:
    """Once two rows are in the manifest, remove the node whose worker wrote the first.

    Waits as long as the job runs (start-up can take minutes on a loaded machine).
    """
    import pyarrow.parquet as pq

    while not job_done.is_set():
        parts = sorted(manifests.glob("run=*/part-*.parquet"))
        if len(parts) >= 2:
            worker = pq.read_table(parts[0]).column("worker")[0].as_py()
            node = next(n for n in nodes if n.node_id[:8] == worker.split("/")[1])
            cluster.remove_node(node)
            removed.extend([node.node_id[:8], time.time()])
            return
        time.sleep(0.05)


@pytest.mark.slow  # a two-node Ray cluster of its own
def test_node_removed_mid_run_every_track_exactly_once(two_node_cluster, tmp_path):
    import ray

    from pipeline.separator import Separator

    cluster, nodes = two_node_cluster
    source = tmp_path / "music"
    source.mkdir()
    t = np.arange(24000) / 16000
    for k in range(16):
        tone = 0.3 * np.sin(2 * np.pi * (100 + 30 * k) * t)
        sf.write(source / f"track {k:02d}.wav", np.stack([tone, 0.5 * tone], 1), 16000)
    torch.manual_seed(0)
    model = MultiTasNet(TasNetConfig(N=32, B=16, H=16, layers=2, stack=1, num_mels=16))
    separator = Separator(model, device="cpu")
    destination = str(tmp_path / "out")
    config = JobConfig(
        destination=destination,
        run_id="node-loss",
        model_id=separator.model_id,
        options_hash=separator.options_hash,
        workers=2,
        flush_rows=1,
    )
    removed: list = []
    job_done = threading.Event()
    manifests = tmp_path / "out" / "manifest"
    watcher = threading.Thread(
        target=remove_a_busy_node, args=(cluster, nodes, manifests, removed, job_done)
    )
    watcher.start()
    try:
        result = run_job(list_catalog(str(source)), ray.put(model), config)
    finally:
        job_done.set()
        watcher.join()

    assert removed, "no node was removed"
    fs, root = open_location(destination)
    rows = read_manifests(fs, root).to_pylist()
    assert sorted(row["track_id"] for row in rows) == [f"track {k:02d}.wav" for k in range(16)]
    assert all(row["status"] == "ok" for row in rows) and result.ok == 16
    node_id, removed_at = removed
    late = [row for row in rows if row["finished_at"].timestamp() > removed_at]
    assert late, "the run ended before the node was removed"
    assert any(node_id not in row["worker"] for row in late), "nothing separated after the loss"
    for row in rows:
        for stem in STEMS:
            audio, rate = read_audio(row[f"{stem}_uri"])
            assert rate == 16000 and audio.shape == (2, 24000)
