"""The model reproduces the authors' implementation on ../shared/reference (see its README)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model import MultiTasNet, TasNetConfig, load_checkpoint

CONFIGS = ["small-generated", "small-independent"]
TOLERANCE = 1e-4


def stage_inputs(pcm16: np.ndarray, seconds: int, stages: int = 3) -> list[torch.Tensor]:
    """Per-stage inputs as the reference README describes: decimate, cut, divide by the std."""
    audio = pcm16.astype(np.float32) / 32768
    inputs = []
    for i in range(stages):
        x = audio[:: 2 ** (stages - 1 - i)][: 8000 * seconds * 2**i]
        inputs.append(torch.from_numpy(x / x.std()).view(1, 1, -1))
    return inputs


def assert_close_to_reference(ours: torch.Tensor, ref: np.ndarray) -> None:
    scale = np.abs(ref).max()
    error = np.abs(ours.numpy() - ref).max()
    assert error <= TOLERANCE * scale, f"max error {error:.3g} over max |ref| {scale:.3g}"


@pytest.fixture(scope="module", params=CONFIGS)
def case(request, reference_dir):
    folder = reference_dir / request.param
    vectors = np.load(folder / "vectors.npz")
    meta = json.loads((folder / "meta.json").read_text())
    return load_checkpoint(folder / "checkpoint.pt"), vectors, meta


def test_state_dict_names_and_shapes_equal_release(case):
    model, _, meta = case
    ours = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert ours == meta["state_dict"]
    assert model.parameter_count() == meta["parameters"]


def test_short_inference_matches_reference(case):
    model, vectors, _ = case
    inputs = [
        x[..., : 8000 * 2 * 2**i] for i, x in enumerate(stage_inputs(vectors["input_pcm16"], 18))
    ]
    outputs = model.inference(inputs, n_chunks=1)
    for i, output in enumerate(outputs):
        assert output.shape == vectors[f"short_chunks1_stage{i}"].shape
        assert_close_to_reference(output, vectors[f"short_chunks1_stage{i}"])


@pytest.mark.slow  # 18 s of audio through each configuration (the short case stays in test-fast)
@pytest.mark.parametrize("n_chunks", [1, 3])
def test_long_inference_matches_reference(case, n_chunks):
    model, vectors, _ = case
    outputs = model.inference(stage_inputs(vectors["input_pcm16"], 18), n_chunks=n_chunks)
    for i, output in enumerate(outputs):
        name = f"long_chunks{n_chunks}_stage{i}"
        assert output.shape[-1] == 8000 * 18 * 2**i
        assert_close_to_reference(output[..., vectors[f"{name}_index"]], vectors[f"{name}_values"])
        energy = output.double().pow(2).sum(-1).numpy()
        np.testing.assert_allclose(energy, vectors[f"{name}_energy"], rtol=TOLERANCE)


def test_training_loss_and_stats_match_reference(case):
    model, vectors, _ = case
    top = torch.from_numpy(vectors["train_separated_top"])
    separated = [top[..., :: 2 ** (2 - i)].contiguous() for i in range(3)]
    mixes = [s.sum(1) for s in separated]
    masks = [(s != 0).any(-1).float() for s in separated]
    model.train()
    try:
        loss, stats = model(mixes, separated, masks)
    finally:
        model.eval()
    assert loss.shape == (1,) and stats.shape == (1, 15)
    np.testing.assert_allclose(loss.detach().numpy(), vectors["train_loss"], rtol=TOLERANCE)
    ref_stats = vectors["train_stats"]
    np.testing.assert_allclose(
        stats.detach().numpy(), ref_stats, rtol=TOLERANCE, atol=TOLERANCE * np.abs(ref_stats).max()
    )


@pytest.mark.parametrize(("independent", "count"), [(False, 45_545_602), (True, 34_687_396)])
def test_paper_configuration_size(independent, count):
    model = MultiTasNet(TasNetConfig(independent_params=independent))
    assert model.parameter_count() == count


def test_paper_configuration_names_follow_release(reference_dir):
    """Every key of the paper-size model has the release's name pattern and the expected shapes."""
    model = MultiTasNet(TasNetConfig())
    state = model.state_dict()
    small = json.loads((reference_dir / "small-generated" / "meta.json").read_text())["state_dict"]
    assert set(state) >= set(small)  # the paper model only adds deeper TCN blocks
    assert len(state) == len(small) + 3 * (18 - 6) * (
        len([k for k in small if ".tcn.0." in k]) // 3
    )
    # Stage 2 (N = 4 * 440) reads its own latent plus stage 1's masked latent (N + N/2 channels).
    assert list(state["stages.2.mask.in_conv.kernel.weight"].shape) == [160 * (1760 + 880), 5]
    assert list(state["stages.0.encoder.filters.2.weight"].shape) == [110, 1, 80]
