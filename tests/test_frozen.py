"""The frozen inference network computes what the model computes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from model import MultiTasNet, TasNetConfig
from model.frozen import _MOMENT_PIECE, _MOMENT_WIDTH, FrozenTasNet, _moments, frames_multiple

SMALL = dict(N=32, B=16, H=16, layers=2, stack=1, num_mels=16)


def mixes(config: TasNetConfig, batch: int, frames: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    top = torch.randn(batch, 1, frames * config.W * 2 ** (config.stages - 1), generator=generator)
    return [top[..., :: 2 ** (config.stages - 1 - i)].contiguous() for i in range(config.stages)]


def randomised(config: TasNetConfig) -> MultiTasNet:
    """A model whose every parameter is random (PReLU slopes and GroupNorm affines included,
    which initialise to constants that would hide a wrong fold)."""
    torch.manual_seed(7)
    model = MultiTasNet(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "spectrogram" not in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"independent_params": True},
        {"kernel": 5, "residual_bias": True, "stages": 2},
        {"E_1": None, "layers": 3},
    ],
    ids=["generated", "independent", "kernel5-bias-2stages", "no-embedding"],
)
def test_frozen_network_equals_the_model(changes):
    config = TasNetConfig(**{**SMALL, **changes})
    model = randomised(config)
    inputs = mixes(config, batch=2, frames=300)
    with torch.inference_mode():
        expected = model.separate(inputs)
    frozen = FrozenTasNet(model)
    got = frozen.separate(inputs)
    for ours, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5 * theirs.abs().max().item())
    torch.testing.assert_close(frozen.separate_last(inputs), got[-1], rtol=0, atol=1e-6)


def test_short_input_takes_the_convolution_path_and_still_agrees():
    """Inputs shorter than a dilated kernel's reach use conv1d instead of shifted products."""
    config = TasNetConfig(**{**SMALL, "layers": 6})
    model = randomised(config)
    inputs = mixes(config, batch=1, frames=30)  # dilation 32 reaches past 30 frames
    with torch.inference_mode():
        expected = model.separate(inputs)[-1]
    got = FrozenTasNet(model).separate_last(inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5 * expected.abs().max().item())


def test_bfloat16_network_stays_close_to_float32():
    """Matrix products in bfloat16, statistics and the mel branch in float32: the last stage
    stays within 30 dB of the float32 output (a bfloat16 mel input alone costs ~40 dB)."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no bfloat16 matrix products on this CPU")
    config = TasNetConfig(**SMALL)
    model = randomised(config)
    inputs = mixes(config, batch=2, frames=400)
    exact = FrozenTasNet(model).separate_last(inputs).double()
    low = FrozenTasNet(model, torch.bfloat16).separate_last(inputs).double()
    sdr = 10 * torch.log10(exact.square().sum() / (exact - low).square().sum())
    assert sdr > 30


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moments_read_in_pieces_equal_whole_tensor_moments(dtype):
    """Rows and time both span several pieces, the last ones partial (the piecewise sums must
    cover every element exactly once)."""
    rows = _MOMENT_PIECE // _MOMENT_WIDTH + 6
    frames = 2 * _MOMENT_WIDTH + 1234
    generator = torch.Generator().manual_seed(5)
    x = (torch.randn(2, rows // 2, frames, generator=generator) * 3 + 0.5).to(dtype)
    mean, variance = _moments(x)
    variance_expected, mean_expected = torch.var_mean(x.double(), dim=-1, correction=0)
    assert mean.shape == variance.shape == (2, rows // 2)
    torch.testing.assert_close(mean, mean_expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(variance, variance_expected, rtol=1e-5, atol=0)


def test_window_alignment_covers_encoder_stride_and_mel_hop():
    model = MultiTasNet(TasNetConfig(**SMALL))
    multiple = frames_multiple(model)
    assert multiple % model.config.W == 0
    for index, stage in enumerate(model.stages):
        assert (multiple * 2**index) % stage.encoder.spectrogram.hop == 0


@pytest.mark.slow
def test_fused_blocks_compile_once_and_compute_what_the_eager_blocks_compute():
    """The TCN blocks through torch.compile (inductor; C++ here, Triton on a GPU): one graph for
    every block, stage, batch size and length, and the same stems as the hand-written blocks
    (float32 statistics instead of float64: far above 60 dB)."""
    from torch._dynamo.utils import counters

    config = TasNetConfig(**{**SMALL, "layers": 3, "residual_bias": True})
    model = randomised(config)
    eager, fused = FrozenTasNet(model), FrozenTasNet(model, fused=True)
    graphs = counters["stats"]["unique_graphs"]
    for batch, frames in [(2, 300), (3, 170), (1, 60)]:
        inputs = mixes(config, batch, frames)
        expected = eager.separate_last(inputs).double()
        got = fused.separate_last(inputs).double()
        assert fused.fused
        sdr = 10 * torch.log10(expected.square().sum() / (expected - got).square().sum())
        assert sdr > 60, (batch, frames, sdr)
    assert counters["stats"]["unique_graphs"] - graphs <= 2  # batch 1 may specialise once


def test_fused_blocks_fall_back_to_eager_where_the_compiler_cannot_run(tmp_path):
    """A machine without a working C compiler: the first forward warns once and separates with
    the hand-written blocks (same output), instead of failing."""
    script = """
import warnings, torch
from model import MultiTasNet, TasNetConfig
from model.frozen import FrozenTasNet
torch.manual_seed(0)
model = MultiTasNet(TasNetConfig(N=32, B=16, H=16, layers=2, stack=1, num_mels=16)).eval()
inputs = [torch.randn(1, 1, 4000 * 2 ** i) for i in range(3)]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fused = FrozenTasNet(model, fused=True)
    got = fused.separate_last(inputs)
expected = FrozenTasNet(model).separate_last(inputs)
messages = [str(w.message) for w in caught if "fused TCN blocks" in str(w.message)]
print(len(messages), fused.fused, torch.equal(got, expected))
"""
    env = {
        **os.environ,
        "CC": str(tmp_path / "no-cc"),
        "CXX": str(tmp_path / "no-cxx"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
    }
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["1", "False", "True"], run.stdout + run.stderr[-2000:]
