"""Checkpoint I/O: the own format round-trips, and unsafe or broken files are refused."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from model import CheckpointError, MultiTasNet, TasNetConfig, load_checkpoint, save_checkpoint
from model.checkpoint import load_checkpoint_with_metadata
from pipeline.cli import main

TINY = TasNetConfig(N=32, B=16, H=16, layers=2, stack=1, num_mels=16, stages=2)


def tiny_inputs(seconds: float = 0.5) -> list[torch.Tensor]:
    torch.manual_seed(3)
    base = torch.randn(1, 1, int(8000 * seconds))
    return [torch.nn.functional.interpolate(base, scale_factor=2**i) for i in range(TINY.stages)]


def release_file(path, model: MultiTasNet, **extra) -> None:
    """Write ``model`` as the release's train.py does (state_dict + argparse.Namespace)."""
    args = argparse.Namespace(**model.config.to_dict(), batch_size=4, train_data="data/train")
    args.stages_num = args.stages
    del args.stages
    torch.save(
        {"epoch": 3, "steps": 120, "state_dict": model.state_dict(), "args": args, **extra}, path
    )


def test_own_format_round_trip_gives_identical_output(tmp_path):
    model = MultiTasNet(TINY).eval()
    path = save_checkpoint(model, tmp_path / "tiny", {"steps": 5, "data": "synth"})
    assert path.suffix == ".safetensors"
    loaded, metadata = load_checkpoint_with_metadata(path)
    assert loaded.config == TINY and not loaded.training
    assert metadata == {"data": "synth", "steps": 5}
    inputs = tiny_inputs()
    for ours, theirs in zip(model.inference(inputs, 1), loaded.inference(inputs, 1), strict=True):
        assert torch.equal(ours, theirs)


def test_release_format_loads_with_its_configuration(tmp_path):
    model = MultiTasNet(TINY).eval()
    release_file(tmp_path / "best_model.pt", model)
    loaded, metadata = load_checkpoint_with_metadata(tmp_path / "best_model.pt")
    assert loaded.config == TINY
    assert metadata["steps"] == 120 and metadata["training_options"]["batch_size"] == 4
    inputs = tiny_inputs()
    assert torch.equal(model.inference(inputs, 1)[-1], loaded.inference(inputs, 1)[-1])


def test_convert_command_writes_equivalent_own_format(tmp_path, capsys):
    model = MultiTasNet(TINY).eval()
    release_file(tmp_path / "best_model.pt", model)
    assert main(["convert", str(tmp_path / "best_model.pt"), str(tmp_path / "own")]) == 0
    converted = load_checkpoint(tmp_path / "own.safetensors")
    inputs = tiny_inputs()
    assert torch.equal(model.inference(inputs, 1)[-1], converted.inference(inputs, 1)[-1])
    assert "own.safetensors" in capsys.readouterr().out


class _Payload:
    """Unpickling this runs os.mkdir(marker): what a malicious checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    release_file(tmp_path / "evil.pt", MultiTasNet(TINY), extra=_Payload(str(marker)))
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_convert_refuses_malicious_file_with_one_line_error(tmp_path, capsys):
    marker = tmp_path / "pwned"
    release_file(tmp_path / "evil.pt", MultiTasNet(TINY), extra=_Payload(str(marker)))
    assert main(["convert", str(tmp_path / "evil.pt"), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "refused" in error and "Traceback" not in error
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x00" * 64])
def test_garbage_files_give_checkpoint_error(tmp_path, content):
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "bad.pt")


def test_weights_of_another_architecture_are_refused(tmp_path):
    release_file(tmp_path / "m.pt", MultiTasNet(TINY))
    payload = torch.load(tmp_path / "m.pt", weights_only=False)
    payload["args"].N = 64  # config says 64, weights are for 32
    torch.save(payload, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "m.pt")


def test_missing_checkpoint_is_a_clear_error():
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint("definitely-not-here")


def test_shipped_default_model_loads_with_its_card():
    from pipeline.training.config import DEFAULT

    model, metadata = load_checkpoint_with_metadata("default")
    assert model.config == DEFAULT.model and not model.training
    assert metadata["steps"] == DEFAULT.training.steps
    assert metadata["data"].startswith("metasep synth")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_saved_checkpoint_follows_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        path = save_checkpoint(MultiTasNet(TINY), tmp_path / "m")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644
