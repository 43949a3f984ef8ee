"""Model behaviour beyond the reference vectors: batching, configurations, validation."""

from __future__ import annotations

import pytest
import torch

from model import MultiTasNet, TasNetConfig

SMALL = TasNetConfig(N=32, B=16, H=16, layers=2, stack=1, num_mels=16)


def inputs(batch: int, base_samples: int, stages: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(0)
    top = torch.randn(batch, 1, base_samples * 2 ** (stages - 1))
    return [top[..., :: 2 ** (stages - 1 - i)].contiguous() for i in range(stages)]


def test_batched_inference_equals_one_example_at_a_time():
    """The engine batches channels and windows: examples must not influence each other."""
    model = MultiTasNet(SMALL).eval()
    mixes = inputs(batch=3, base_samples=4000)
    batched = model.inference(mixes, n_chunks=1)
    for b in range(3):
        single = model.inference([m[b : b + 1] for m in mixes], n_chunks=1)
        for ours, alone in zip(batched, single, strict=True):
            torch.testing.assert_close(ours[b : b + 1], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", [3, 5])
def test_outputs_keep_every_stage_length(kernel):
    model = MultiTasNet(TasNetConfig(**{**SMALL.to_dict(), "kernel": kernel})).eval()
    outputs = model.inference(inputs(batch=2, base_samples=2000), n_chunks=1)
    assert [tuple(o.shape) for o in outputs] == [(2, 4, 1, 2000 * 2**i) for i in range(3)]
    assert all(torch.isfinite(o).all() for o in outputs)


def test_silence_gives_finite_output():
    model = MultiTasNet(SMALL).eval()
    silent = [torch.zeros(1, 1, 2000 * 2**i) for i in range(3)]
    assert all(torch.isfinite(o).all() for o in model.inference(silent, n_chunks=1))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kernel": 4}, "kernel must be odd"),
        ({"N": 36}, "N must be a multiple of 8"),
        ({"sampling_rate": 11025}, "multiple of 8000"),
    ],
)
def test_invalid_configuration_is_rejected_with_reason(change, message):
    with pytest.raises(ValueError, match=message):
        TasNetConfig(**{**SMALL.to_dict(), **change})


@pytest.mark.slow  # tens of optimiser steps
def test_training_step_reduces_loss():
    """One optimiser step on a fixed batch lowers the objective: gradients reach every part."""
    model = MultiTasNet(SMALL).train()
    torch.manual_seed(1)
    top = torch.randn(2, 4, 1, 8000)
    separated = [top[..., :: 2 ** (2 - i)].contiguous() for i in range(3)]
    mixes = [s.sum(1) for s in separated]
    masks = [torch.ones(2, 4, 1) for _ in separated]
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    first, _ = model(mixes, separated, masks)
    first.sum().backward()
    # Frozen statistics, and the last TCN block's residual output, which feeds nothing (as in the
    # release: only its skip output is used), get no gradient; everything else does.
    last = SMALL.layers * SMALL.stack - 1
    unused = ("spectrogram.window", "spectrogram.mean", "spectrogram.std", f"tcn.{last}.res_out.")
    for name, parameter in model.named_parameters():
        assert (parameter.grad is None) == any(part in name for part in unused), name
    optimiser.step()
    second, _ = model(mixes, separated, masks)
    assert second.item() < first.item()
