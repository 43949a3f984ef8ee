"""TorchResampler: streaming, length and output agree with soxr's HQ stream; no aliasing."""

from __future__ import annotations

import numpy as np
import pytest
import soxr
import torch

import pipeline.audio
from pipeline.audio import TorchResampler
from pipeline.bench.signals import bench_audio

ENGINE_PAIRS = [(44100, 8000), (44100, 16000), (44100, 32000), (32000, 44100)]
LENGTH_PAIRS = [
    (source, target)
    for source in (44100, 48000, 22050, 96000, 8000)
    for target in (8000, 16000, 32000)
    if source != target
] + [(8000, 44100), (16000, 48000), (32000, 44100), (32000, 48000)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small convolutions: a second thread costs more in barriers than it saves (a loaded
    machine's test run took twice as long)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ours(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """The whole signal through one TorchResampler."""
    resampler = TorchResampler(from_rate, to_rate, audio.shape[0])
    return resampler.push(torch.from_numpy(audio), last=True).numpy()


def soxr_stream(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """The engine's CPU path: soxr's HQ stream, flushed."""
    stream = soxr.ResampleStream(from_rate, to_rate, audio.shape[0], dtype="float32", quality="HQ")
    return (
        stream.resample_chunk(np.ascontiguousarray(audio.T), last=True)
        .reshape(-1, audio.shape[0])
        .T
    )


def sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    reference, estimate = reference.astype(np.float64), estimate.astype(np.float64)
    return float(10 * np.log10((reference**2).sum() / ((reference - estimate) ** 2).sum()))


@pytest.mark.parametrize("from_rate,to_rate", [*ENGINE_PAIRS, (48000, 16000), (8000, 32000)])
def test_streaming_gives_the_samples_of_the_whole_signal(from_rate, to_rate):
    rng = np.random.default_rng(from_rate + to_rate)
    audio = rng.standard_normal((2, from_rate // 2 + 123)).astype(np.float32)
    whole = ours(audio, from_rate, to_rate)
    resampler = TorchResampler(from_rate, to_rate, 2)
    cuts = np.sort(rng.integers(0, audio.shape[1], 12))
    cuts[3] = cuts[2]  # an empty block in the middle
    pieces = [torch.from_numpy(part) for part in np.split(audio, cuts, axis=1)]
    parts = [resampler.push(piece) for piece in pieces]
    parts.append(resampler.push(torch.zeros(2, 0), last=True))
    assert all(part.dtype == torch.float32 and part.shape[0] == 2 for part in parts)
    streamed = torch.cat(parts, 1).numpy()
    assert streamed.shape == whole.shape
    assert np.abs(streamed - whole).max() <= 1e-6


@pytest.mark.parametrize("from_rate,to_rate", LENGTH_PAIRS)
def test_total_length_is_soxrs(from_rate, to_rate):
    lengths = [0, 1, 2, 3, 7, 55, 56, 441, 1001, 12345]
    for length in lengths:
        audio = np.zeros((1, length), np.float32)
        expected = soxr_stream(audio, from_rate, to_rate).shape[1]
        resampler = TorchResampler(from_rate, to_rate, 1)
        half = torch.from_numpy(audio[:, : length // 2])
        got = resampler.push(half).shape[1]
        got += resampler.push(torch.from_numpy(audio[:, length // 2 :]), last=True).shape[1]
        assert got == expected, (from_rate, to_rate, length)


@pytest.mark.parametrize("from_rate,to_rate", ENGINE_PAIRS)
def test_agrees_with_soxr_on_music(from_rate, to_rate):
    music = bench_audio(3.0, from_rate, seed=1)
    reference = soxr_stream(music, from_rate, to_rate)
    estimate = ours(music, from_rate, to_rate)
    assert estimate.shape == reference.shape
    assert sdr(reference, estimate) >= 60


def tone_level(from_rate: int, to_rate: int, frequency: float, seconds: float = 2.0) -> float:
    """dB of a full-scale tone's resampled output (middle part) relative to the input tone."""
    t = np.arange(int(from_rate * seconds)) / from_rate
    tone = np.sin(2 * np.pi * frequency * t).astype(np.float32)[None]
    out = ours(tone, from_rate, to_rate)[0]
    middle = out[out.size // 4 : -out.size // 4].astype(np.float64)
    return float(10 * np.log10((middle**2).mean() / 0.5))


@pytest.mark.parametrize("from_rate,to_rate", ENGINE_PAIRS[:3])
def test_a_tone_above_the_output_nyquist_does_not_alias(from_rate, to_rate):
    nyquist = to_rate / 2
    assert tone_level(from_rate, to_rate, 0.8 * nyquist) > -0.01  # in the passband: kept
    assert tone_level(from_rate, to_rate, 1.02 * nyquist) < -120  # soxr HQ: about -135 dB


def test_upsampling_makes_no_images():
    """A 15 kHz tone at 32 kHz must not come back with its image at 17 kHz at 44.1 kHz."""
    t = np.arange(64000) / 32000
    tone = np.sin(2 * np.pi * 15000 * t).astype(np.float32)[None]
    out = ours(tone, 32000, 44100)[0, 22050:-22050].astype(np.float64)
    spectrum = np.abs(np.fft.rfft(out * np.blackman(out.size))) ** 2
    frequencies = np.fft.rfftfreq(out.size, 1 / 44100)
    image = spectrum[np.abs(frequencies - 17000) < 300].sum()
    kept = spectrum[np.abs(frequencies - 15000) < 300].sum()
    assert 10 * np.log10(image / kept) < -120  # soxr HQ: about -145 dB


def test_several_leading_dimensions_are_channels():
    """(stems, stereo, n) blocks: each of the 8 channels resampled on its own."""
    rng = np.random.default_rng(3)
    stems = rng.standard_normal((4, 2, 5000)).astype(np.float32)
    resampler = TorchResampler(32000, 44100, 8)
    out = torch.cat(
        [
            resampler.push(torch.from_numpy(stems[..., :3000])),
            resampler.push(torch.from_numpy(stems[..., 3000:]), last=True),
        ],
        -1,
    ).numpy()
    assert out.shape[:2] == (4, 2)
    for stem in range(4):
        np.testing.assert_allclose(out[stem], ours(stems[stem], 32000, 44100), atol=1e-6)


def test_empty_blocks():
    resampler = TorchResampler(44100, 16000, 2)
    assert resampler.push(torch.zeros(2, 0)).shape == (2, 0)
    assert resampler.push(torch.zeros(2, 0), last=True).shape == (2, 0)
    block = torch.ones(2, 100)
    first = resampler.push(block)
    assert first.shape == (2, 0)  # the filter waits for its right context
    assert resampler.push(torch.zeros(2, 0), last=True).shape == (2, int(100 * 16000 / 44100 + 0.5))


def test_after_last_the_next_signal_starts_afresh():
    music = torch.from_numpy(bench_audio(0.5, 44100, seed=4))
    resampler = TorchResampler(44100, 32000, 2)
    first = resampler.push(music, last=True)
    assert torch.equal(resampler.push(music, last=True), first)


def tf32(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to TF32 (10-bit mantissa, to nearest even), as tensor cores read float32."""
    bits = x.view(torch.int32)
    return ((bits + 0xFFF + ((bits >> 13) & 1)) & -(1 << 13)).view(torch.float32)


def test_exact_where_convolutions_round_to_tf32(monkeypatch):
    """cuDNN convolves float32 in TF32 by default: on CUDA the resampler splits the operands so
    that the result is float32's all the same. Here the CPU's conv1d rounds like tensor cores."""
    music = torch.from_numpy(bench_audio(1.0, 44100, seed=2))
    exact = TorchResampler(44100, 16000, 2).push(music, last=True)
    conv1d = torch.nn.functional.conv1d
    monkeypatch.setattr(
        torch.nn.functional, "conv1d", lambda x, w, **kw: conv1d(tf32(x), tf32(w), **kw)
    )
    rounded = TorchResampler(44100, 16000, 2).push(music, last=True)
    assert sdr(exact.numpy(), rounded.numpy()) < 90  # the emulation bites
    monkeypatch.setattr(pipeline.audio, "_convolves_in_tf32", lambda device: True)
    split = TorchResampler(44100, 16000, 2).push(music, last=True)
    assert sdr(exact.numpy(), split.numpy()) > 110
    assert (split - exact).abs().max() <= 1e-5


def test_a_ratio_too_irregular_for_a_table_is_refused():
    with pytest.raises(ValueError, match="44101 Hz to 8000 Hz"):
        TorchResampler(44101, 8000, 2)


def test_same_rate_returns_the_input():
    block = torch.randn(2, 10)
    assert TorchResampler(16000, 16000, 2).push(block) is block
