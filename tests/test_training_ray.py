"""Ray Train data parallelism: 2 CPU workers (DDP over gloo) on a real local Ray cluster."""

from __future__ import annotations

import json

import pytest

from model import TasNetConfig
from pipeline.cli import main
from pipeline.training.config import RunConfig, TrainConfig


@pytest.fixture
def ray_local():
    import ray

    # address="local": always a new cluster, never one another test left running
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def test_two_workers_learn_and_hold_identical_weights(tone_catalog, tmp_path, ray_local):
    training = TrainConfig(
        batch_size=4,
        crop_seconds=0.5,
        steps=24,
        validate_every=24,
        log_every=8,
        stats_examples=4,
        valid_tracks=1,
        learning_rate=3e-3,
    )
    config_file = tmp_path / "config.json"
    model = TasNetConfig(N=32, B=16, H=16, layers=2, stack=1, num_mels=16)
    config_file.write_text(json.dumps(RunConfig(model, training).to_dict()))
    out = tmp_path / "run"
    paths = {"--out": out, "--config": config_file, "--cache-dir": tmp_path / "cache"}
    options = [str(part) for pair in paths.items() for part in pair]
    code = main(["train", str(tone_catalog), "--workers", "2", *options])
    assert code == 0
    ranks = [json.loads((out / "workers" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 24
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]  # means over steps 1-8, 9-16, 17-24
    assert len(losses) == 3 and losses[-1] < losses[0]
    validations = [r for r in records if "valid" in r]
    assert [r["step"] for r in validations] == [0, 24]
    assert validations[-1]["valid"]["objective"] > validations[0]["valid"]["objective"] + 3.0
    assert (out / "best.safetensors").exists() and (out / "state.pt").exists()
