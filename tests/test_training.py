"""Training: data sampling, optimiser and schedule, exact resume, and Ray Train data parallelism."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from model import STEMS, MultiTasNet, TasNetConfig, load_checkpoint
from pipeline.audio import resample
from pipeline.cli import main
from pipeline.separator import Separator
from pipeline.training.config import RunConfig, TrainConfig
from pipeline.training.data import CropSampler, find_tracks, prepare_tracks
from pipeline.training.loop import Job, Trainer
from pipeline.training.optim import Ranger, sgdr_learning_rate
from pipeline.training.train import prepare_job, train_local

TINY_MODEL = TasNetConfig(N=32, B=16, H=16, layers=2, stack=1, num_mels=16)
TINY_TRAINING = TrainConfig(
    batch_size=4,
    crop_seconds=1.0,
    steps=4,
    validate_every=2,
    log_every=1,
    stats_examples=4,
    valid_tracks=1,
)
TINY = RunConfig(TINY_MODEL, TINY_TRAINING)


@pytest.fixture(scope="module")
def stage_tracks(tone_catalog, tmp_path_factory):
    sources = find_tracks(str(tone_catalog), "train")
    return prepare_tracks(
        sources, TINY_MODEL.stage_rates(), tmp_path_factory.mktemp("cache"), progress=False
    )


def dominant_track(stem: np.ndarray, rate: int, harmonic: float) -> int:
    """Which tone-catalog track a stem crop comes from (each track has its own base pitch)."""
    spectrum = np.abs(np.fft.rfft(stem))
    frequency = np.argmax(spectrum) * rate / len(stem)
    return round(frequency / harmonic / 100.0) - 1


def test_catalog_discovery_and_cache(tone_catalog, stage_tracks):
    assert [t.name for t in stage_tracks] == [f"track {k}" for k in range(4)]
    for track in stage_tracks:
        lengths = [s.shape[-1] for s in track.stages]
        assert lengths == [lengths[0] * 2**i for i in range(3)]
        assert track.stages[0].shape[:2] == (4, 2)
        mono_mix = np.asarray(track.stages[2]).sum(0).mean(0)
        assert mono_mix.std() == pytest.approx(1.0, rel=1e-3)  # normalised as the release does


def test_crops_have_stage_lengths_and_mix_is_sum(stage_tracks):
    sampler = CropSampler(stage_tracks, TINY_TRAINING, 8000, 20, seed=0)
    mixes, separated, masks = sampler.batch(4)
    for i, (mix, stems, mask) in enumerate(zip(mixes, separated, masks, strict=True)):
        assert stems.shape == (4, 4, 1, 8000 * 2**i) and mix.shape == (4, 1, 8000 * 2**i)
        assert mask.shape == (4, 4, 1)
        torch.testing.assert_close(mix, stems.sum(1))


def test_silent_stems_are_zero_and_masked_in_every_stage(stage_tracks):
    config = dataclasses.replace(TINY_TRAINING, shuffle_p=0.0)
    sampler = CropSampler(stage_tracks, config, 8000, 20, seed=1)
    seen_silent = seen_voiced = False
    for _ in range(10):
        _, separated, masks = sampler.batch(4)
        for stems, mask in zip(separated, masks, strict=True):
            silent = mask[:, 3, 0] == 0
            assert torch.all(stems[silent, 3] == 0)
            assert torch.all(stems[~silent, 3].abs().amax(-1) > 0)
            assert torch.equal(mask, masks[0])  # the same stems are masked at every rate
        seen_silent |= bool(silent.any())
        seen_voiced |= bool((~silent).any())
    assert seen_silent and seen_voiced  # vocals are silent in the first two seconds


@pytest.mark.parametrize(("shuffle_p", "expect_mixed"), [(0.0, False), (0.5, True)])
def test_shuffling_takes_stems_from_different_tracks(stage_tracks, shuffle_p, expect_mixed):
    config = dataclasses.replace(TINY_TRAINING, shuffle_p=shuffle_p)
    sampler = CropSampler(stage_tracks, config, 8000, 20, seed=2)
    mixed_examples = 0
    for _ in range(6):
        _, separated, masks = sampler.batch(4)
        top = separated[-1][:, :, 0].numpy()
        for example, mask in zip(top, masks[-1][:, :, 0], strict=True):
            harmonics = (1.0, 0.5, 2.0)  # drums, bass, other (vocals may be silent)
            origin = {
                dominant_track(example[s], 32000, h) for s, h in enumerate(harmonics) if mask[s]
            }
            mixed_examples += len(origin) > 1
    assert (mixed_examples > 0) == expect_mixed


def test_random_gain_and_channel_vary_examples(stage_tracks):
    config = dataclasses.replace(TINY_TRAINING, shuffle_p=0.0, gain_range=(1.0, 1.0))
    sampler = CropSampler(stage_tracks, config, 8000, 20, seed=3)
    ratios = set()
    for _ in range(8):
        _, separated, _ = sampler.batch(4)
        # bass peaks: the right channel is 0.7 x the left, so two values per track appear
        ratios.update(np.round(separated[-1][:, 1, 0].abs().amax(-1).numpy(), 2))
    assert len(ratios) >= 2


def test_ranger_is_radam_plus_lookahead():
    torch.manual_seed(0)
    weights = torch.randn(5, requires_grad=True)
    reference = weights.detach().clone().requires_grad_(True)
    ranger = Ranger([weights], lr=0.1, weight_decay=0.01, k=3, alpha=0.5)
    radam = torch.optim.RAdam(
        [reference],
        lr=0.1,
        betas=(0.95, 0.999),
        eps=1e-5,
        weight_decay=0.01,
        decoupled_weight_decay=True,
    )
    start = weights.detach().clone()
    for step in range(1, 4):
        for p, opt in ((weights, ranger), (reference, radam)):
            opt.zero_grad()
            (p**2).sum().backward()
            opt.step()
        if step < 3:
            torch.testing.assert_close(weights, reference)
    # at step k the fast weights are pulled halfway back to the slow ones (the start)
    torch.testing.assert_close(weights.detach(), start + 0.5 * (reference.detach() - start))


def test_sgdr_restarts_with_decayed_peak():
    assert sgdr_learning_rate(0, 1e-3, 100, 0.85) == pytest.approx(1e-3)
    assert sgdr_learning_rate(50, 1e-3, 100, 0.85) == pytest.approx(0.5e-3)
    assert sgdr_learning_rate(99, 1e-3, 100, 0.85) < 1e-5
    assert sgdr_learning_rate(100, 1e-3, 100, 0.85) == pytest.approx(0.85e-3)


@pytest.mark.slow  # two runs of several steps and validations each
def test_resume_continues_exactly(tone_catalog, tmp_path):
    cache = tmp_path / "cache"
    straight = prepare_job(
        str(tone_catalog), tmp_path / "straight", TINY, cache_dir=cache, progress=False
    )
    train_local(straight, "cpu")
    half = dataclasses.replace(TINY, training=dataclasses.replace(TINY_TRAINING, steps=2))
    first = prepare_job(
        str(tone_catalog), tmp_path / "resumed", half, cache_dir=cache, progress=False
    )
    train_local(first, "cpu")
    second = prepare_job(
        str(tone_catalog), tmp_path / "resumed", TINY, resume=True, cache_dir=cache, progress=False
    )
    train_local(second, "cpu")
    states = [
        torch.load(tmp_path / run / "state.pt", weights_only=True)
        for run in ("straight", "resumed")
    ]
    assert states[0]["step"] == states[1]["step"] == 4
    assert states[0]["samplers"] == states[1]["samplers"]  # the data stream continued exactly
    # Weights agree to float32 rounding: SIMD reductions may sum in another order when the resumed
    # tensors sit at other addresses, so bit-identity is not guaranteed (differences seen: 1e-13).
    a = load_checkpoint(tmp_path / "straight" / "last.safetensors").state_dict()
    b = load_checkpoint(tmp_path / "resumed" / "last.safetensors").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7, msg=key)
    lines = [
        json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4]


def test_existing_run_needs_resume(tone_catalog, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "state.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="--resume"):
        prepare_job(
            str(tone_catalog), tmp_path / "run", TINY, cache_dir=tmp_path / "c", progress=False
        )


def _si_snr_db(estimate: np.ndarray, target: np.ndarray) -> float:
    """Scale-invariant SNR of one signal, written out in numpy (the yardstick)."""
    projection = (estimate @ target) / (target @ target) * target
    return 10 * np.log10((projection @ projection) / ((estimate - projection) ** 2).sum())


def test_validation_scores_what_the_engine_separates(stage_tracks, tmp_path):
    """best.safetensors is chosen on the engine's separation of the stereo mix, not on the
    release's chunked inference; validating leaves the model as it was, in training mode."""
    track = stage_tracks[3]
    job = Job(tmp_path, TINY, stage_tracks[:3], [track], data="tones", progress=False)
    trainer = Trainer(job)
    weights = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    metrics = trainer.validate()
    assert metrics["inference"] == "engine" and metrics["tracks"] == 1
    stems = np.asarray(track.stages[-1], dtype=np.float32)  # (4, 2, samples) at the top rate
    rate = TINY_MODEL.stage_rates()[-1]
    estimates = Separator(trainer.model, device="cpu").separate(stems.sum(0), rate)
    for index, stem in enumerate(STEMS):
        expected = np.mean(
            [_si_snr_db(estimates[stem][c].astype(np.float64), stems[index, c]) for c in (0, 1)]
        )
        assert metrics["si_snr"][stem] == pytest.approx(expected, abs=1e-3)
    assert metrics["objective"] == pytest.approx(np.mean(list(metrics["si_snr"].values())))
    assert trainer.model.training
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, weights[name]), name


@pytest.mark.slow  # the whole command: catalog, cache, training, checkpoints
def test_train_command_writes_checkpoints_and_metrics(tone_catalog, tmp_path, capsys):
    config_file = tmp_path / "tiny.json"
    config_file.write_text(json.dumps(TINY.to_dict()))
    out = tmp_path / "run"
    code = main(
        [
            "train",
            str(tone_catalog),
            "--out",
            str(out),
            "--config",
            str(config_file),
            "--steps",
            "2",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert code == 0
    model = load_checkpoint(out / "best.safetensors")
    assert isinstance(model, MultiTasNet) and model.config == TINY_MODEL
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "valid" in records[0]  # the untrained baseline
    assert {"loss", "lr", "si_snr"} <= set(records[1]) and "valid" in records[-1]
    assert "best.safetensors" in capsys.readouterr().out


def test_bad_catalog_is_a_usage_error(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing"), "--out", str(tmp_path / "run")]) == 2
    assert "no such catalog" in capsys.readouterr().err


@pytest.mark.slow  # encodes and decodes AAC streams with ffmpeg
def test_musdb_stem_mp4_catalog_is_read_through_musdb(tmp_path):
    stempeg = pytest.importorskip("stempeg")
    rate, seconds = 44100, 2
    t = np.arange(rate * seconds) / rate
    for name, base in (("Artist A - Song", 110.0), ("Artist B - Tune", 150.0)):
        stems = np.stack(
            [np.stack([0.2 * np.sin(2 * np.pi * base * h * t)] * 2, 1) for h in (1, 0.5, 2, 3)]
        )
        data = np.concatenate([stems.sum(0, keepdims=True), stems])  # mixture first, as MUSDB18
        (tmp_path / "musdb" / "train").mkdir(parents=True, exist_ok=True)
        stempeg.write_stems(
            str(tmp_path / "musdb" / "train" / f"{name}.stem.mp4"),
            data,
            sample_rate=rate,
            writer=stempeg.StreamsWriter(codec="aac", bitrate=256000),
        )
    sources = find_tracks(str(tmp_path / "musdb"), "train")
    assert [s.name for s in sources] == ["Artist A - Song", "Artist B - Tune"]
    tracks = prepare_tracks(sources, TINY_MODEL.stage_rates(), tmp_path / "cache", progress=False)
    top = np.asarray(tracks[0].stages[2])
    assert top.shape[:2] == (4, 2) and abs(top.shape[-1] - 32000 * seconds) < 32000 * 0.1
    spectrum = np.abs(np.fft.rfft(top[1, 0]))  # bass of track A: 55 Hz
    assert abs(np.argmax(spectrum) * 32000 / top.shape[-1] - 55.0) < 2.0


@pytest.mark.parametrize("channels", [2, 1])
def test_cache_is_the_whole_track_resampled_and_normalised(tmp_path, channels):
    """The cache is written from blocks (a 13 s track spans several), and equals resampling each
    whole stem once and dividing by the deviation of each stage's mono mix; mono stems are used
    for both channels."""
    rng = np.random.default_rng(0)
    rate, frames = 44100, 44100 * 13
    folder = tmp_path / "refs" / "train" / "long"
    folder.mkdir(parents=True)
    stems = {}
    for k, stem in enumerate(("drums", "bass", "other", "vocals")):
        audio = 0.1 * (k + 1) * rng.standard_normal((channels, frames))
        sf.write(folder / f"{stem}.wav", audio.T, rate, subtype="FLOAT")
        stems[stem] = np.repeat(audio, 3 - channels, axis=0)
    sources = find_tracks(str(tmp_path / "refs"), "train")
    (track,) = prepare_tracks(sources, [8000, 16000, 32000], tmp_path / "cache", progress=False)
    whole = np.concatenate([stems[s] for s in ("drums", "bass", "other", "vocals")])
    staged = [resample(whole.astype(np.float32), rate, r) for r in (8000, 16000, 32000)]
    base = min(s.shape[-1] // 2**i for i, s in enumerate(staged))
    for i, audio in enumerate(staged):
        audio = audio[:, : base * 2**i].reshape(4, 2, -1)
        expected = audio / audio.sum(0).mean(0).std()
        np.testing.assert_allclose(track.stages[i], expected, rtol=1e-4, atol=1e-6)
