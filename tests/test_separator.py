"""The separation engine on a small random model: shapes, scaling, windows, silence, files."""

from __future__ import annotations

import itertools
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from model import STEMS, MultiTasNet, TasNetConfig
from pipeline.audio import AudioError, read_audio, write_audio
from pipeline.bench.engine import bench_model
from pipeline.bench.probes import Probe, last_stage, stage_mixes, stem_agreement
from pipeline.bench.signals import bench_audio
from pipeline.runtime import ONE_ARENA_ENV, keep_freed_memory
from pipeline.separator import Separator, plan_windows
from pipeline.separator.options import cpu_has_fast_bfloat16
from pipeline.separator.threads import ReadAhead

SMALL = TasNetConfig(N=32, B=16, H=16, layers=4, stack=1, num_mels=16)


@pytest.fixture(scope="module")
def model() -> MultiTasNet:
    torch.manual_seed(0)
    return MultiTasNet(SMALL).eval()


@pytest.fixture(scope="module")
def separator(model) -> Separator:
    return Separator(
        model, device="cpu", segment=1.0, context=0.25, batch_size=3, precision="float32"
    )


@pytest.mark.parametrize(
    ("rate", "channels", "frames"),
    [(44100, 2, 44100 * 3 + 17), (8000, 1, 8000 * 2 + 3), (48000, 3, 48000 * 2), (32000, 2, 999)],
)
def test_stems_keep_length_rate_and_channels_and_least_squares_fit_the_mix(
    separator, rate, channels, frames
):
    audio = bench_audio(frames / rate, rate)[:, :frames]
    audio = np.concatenate([audio, audio[:1] * 0.5])[:channels]
    stems = separator.separate(audio, rate)
    assert list(stems) == list(STEMS)
    assert all(s.shape == audio.shape and s.dtype == np.float32 for s in stems.values())
    # The least-squares scaling leaves a residual orthogonal to every stem, per channel.
    stacked = np.stack(list(stems.values())).astype(np.float64)  # (4, channels, frames)
    residual = audio - stacked.sum(0)
    for channel in range(channels):
        products = stacked[:, channel] @ residual[channel]
        norms = np.linalg.norm(stacked[:, channel], axis=1) * np.linalg.norm(residual[channel])
        assert np.all(np.abs(products) <= 1e-3 * norms + 1e-9)
        assert np.sum(residual[channel] ** 2) < np.sum(audio[channel] ** 2)


def test_windows_agree_with_the_single_pass_within_30_db(model):
    """Last-stage output of 10 s windows (6 s segments) vs the whole 12 s track at once. The
    mask network's GroupNorms take statistics over a whole window, so windows must be long."""
    audio = bench_audio(12.0)
    probe = Probe("cpu")
    separator = Separator(
        model, "cpu", segment=6.0, context=2.0, precision="float32", observer=probe
    )
    mixes = stage_mixes(separator, audio, 44100)
    with torch.inference_mode():
        single = model.separate([torch.from_numpy(m[:, None]) for m in mixes])[-1]
    windowed = last_stage(separator, probe, audio, 44100)
    assert len(separator.windows(mixes[0].shape[1])) == 2
    agreement = stem_agreement(single[:, :, 0].numpy(), windowed)
    assert min(agreement.values()) > 30, agreement


def test_auto_precision_is_resolved_for_the_device_and_hashed_as_asked(model):
    """auto is bfloat16 on a CPU with AMX or AVX-512 BF16 (as on a GPU) and float32 elsewhere;
    the options hash keeps what was asked, so a catalog planned with auto stays auto."""
    auto = Separator(model, "cpu", segment=1.0, context=0.25)
    assert auto.precision == ("bfloat16" if cpu_has_fast_bfloat16() else "float32")
    assert auto.options.precision == "auto"
    pinned = Separator(model, "cpu", "float32", segment=1.0, context=0.25)
    assert pinned.options_hash != auto.options_hash and pinned.model_id == auto.model_id


@pytest.mark.skipif(not cpu_has_fast_bfloat16(), reason="this CPU has no bfloat16 matrix hardware")
def test_auto_on_a_bfloat16_cpu_agrees_with_the_float32_single_pass():
    """The paper's model (random weights, as `metasep bench` runs it) in bfloat16, what auto
    runs on this CPU, against its float32 single pass: above the 30 dB the engine promises."""
    audio = bench_audio(8.0)
    model, _ = bench_model("paper")
    probe = Probe("cpu")
    separator = Separator(model, "cpu", observer=probe)
    assert separator.precision == "bfloat16"
    mixes = stage_mixes(separator, audio, 44100)
    with torch.inference_mode():
        single = model.separate([torch.from_numpy(m[:, None]) for m in mixes])[-1]
    windowed = last_stage(separator, probe, audio, 44100)
    agreement = stem_agreement(single[:, :, 0].numpy(), windowed)
    assert min(agreement.values()) > 30, agreement


def test_batching_does_not_change_the_output(model):
    audio = bench_audio(3.0)
    outputs = []
    for batch_size in (1, 3):
        probe = Probe("cpu")
        separator = Separator(
            model, "cpu", "float32", 1.0, 0.25, batch_size=batch_size, observer=probe
        )
        outputs.append(last_stage(separator, probe, audio, 44100))
    np.testing.assert_allclose(*outputs, atol=1e-5)


@pytest.mark.parametrize("level", [0.0, 0.25, -1.0])
def test_silent_and_dc_input_give_silent_finite_stems(separator, level):
    audio = np.full((2, 44100), level, dtype=np.float32)
    stems = separator.separate(audio, 44100)
    for stem in stems.values():
        assert np.isfinite(stem).all()
        assert np.abs(stem).max() < 1e-4


def test_unusable_arrays_are_refused_with_a_reason(separator):
    with pytest.raises(AudioError, match="zero-length"):
        separator.separate(np.zeros((2, 0), np.float32), 44100)
    with pytest.raises(AudioError, match="NaN"):
        separator.separate(np.full((1, 100), np.nan, np.float32), 44100)
    with pytest.raises(AudioError, match="channels, samples"):
        separator.separate(np.zeros(100, np.float32), 44100)


@pytest.mark.parametrize("frames, rate", [(55125, 22050), (309701, 44100)])
def test_file_separation_streams_to_the_same_stems(separator, tmp_path, frames, rate):
    """Every sample: 309,701 frames end on a short last block, which the spool must not keep
    in a buffer that the encoders, reading the file by position, would not see."""
    audio = bench_audio(frames / rate + 0.01, rate)[:, :frames]
    write_audio(tmp_path / "song.wav", audio, rate, format="wav")
    paths = separator.separate_file(tmp_path / "song.wav", tmp_path / "out", format="wav")
    expected = separator.separate(audio, rate)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"{stem}.wav" for stem in STEMS
    )
    for stem, path in paths.items():
        written, written_rate = read_audio(path)
        assert written_rate == rate and written.shape == expected[stem].shape == audio.shape
        np.testing.assert_allclose(written, expected[stem], atol=1e-5)


def test_callback_counts_every_window_and_can_stop_a_file(separator, tmp_path):
    audio = bench_audio(2.5, 22050)
    write_audio(tmp_path / "song.wav", audio, 22050, format="wav")
    calls: list[tuple[int, int]] = []
    separator.separate(audio, 22050, callback=lambda done, total: calls.append((done, total)))
    plan = separator.windows(len(stage_mixes(separator, audio, 22050)[0][0]))
    total = len(plan) * audio.shape[0]
    assert total > separator.batch_size  # several forward passes
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert [done for done, _ in calls] == sorted({done for done, _ in calls})

    class Stop(Exception):
        pass

    def stop_after_first_pass(done: int, total: int) -> None:
        if done:
            raise Stop

    with pytest.raises(Stop):
        separator.separate_file(
            tmp_path / "song.wav", tmp_path / "out", callback=stop_after_first_pass
        )
    assert not list((tmp_path / "out").glob("*.flac"))  # no stem that looks complete


@pytest.mark.parametrize("length", [1, 400, 401, 10_000, 123_457])
def test_window_plan_tiles_the_track_with_equal_aligned_windows(length):
    segment, context, align = 2000, 500, 20
    length = -(-length // align) * align
    plan = plan_windows(length, segment, context, align)
    assert plan[0].start == 0 and plan[-1].stop == length
    assert all(a.stop == b.start for a, b in itertools.pairwise(plan))
    assert len({w.end - w.begin for w in plan}) == 1
    for window in plan:
        assert 0 <= window.begin <= window.start < window.stop <= window.end <= length
        # Context on both sides, as much as the track allows (edge windows slide inwards).
        assert window.start - window.begin >= min(context, window.start)
        assert window.end - window.stop >= min(context, length - window.stop)
        assert all(v % align == 0 for v in window)


def test_keeping_freed_memory_makes_freed_activations_reusable_without_fresh_pages():
    """After the entry points' allocator tuning, a freed 128 MB tensor's memory is reused:
    allocating it again touches no new pages (glibc would otherwise unmap it and fault in zeroed
    pages)."""
    if not keep_freed_memory():
        pytest.skip("the allocator is not glibc's")

    def page_faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    torch.ones(2**25)
    faults = []
    for _ in range(3):  # the least of three: other threads' faults count in RUSAGE_SELF too
        before = page_faults()
        torch.ones(2**25)  # 32768 pages of 4 KiB
        faults.append(page_faults() - before)
    assert min(faults) < 1000


_SEPARATE_IN_A_THREAD = """
import resource
from concurrent.futures import ThreadPoolExecutor
import torch
from model import MultiTasNet, TasNetConfig
from pipeline.bench.signals import bench_audio
from pipeline.runtime import keep_freed_memory
from pipeline.separator import Separator

keep_freed_memory()  # first, as the command line's entry point does
torch.manual_seed(0)
model = MultiTasNet(TasNetConfig(N=32, B=16, H=16, layers=4, stack=1, num_mels=16)).eval()
separator = Separator(model, device="cpu", segment=4.0, context=1.0, batch_size=4, precision="float32")
audio = bench_audio(20.0)

def fresh_pages():
    separator.separate(audio, 44100)
    faults = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        separator.separate(audio, 44100)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(faults)

with ThreadPoolExecutor(1) as thread:
    print(thread.submit(fresh_pages).result())
"""


@pytest.mark.slow  # a fresh Python process
def test_a_separation_in_a_thread_reuses_freed_memory_too():
    """A server separates in a worker thread: once the process has tuned its allocator, that
    thread allocates from the arena that keeps freed memory (with an arena of its own, glibc
    unmapped its emptied heaps: 10,000 to 26,000 fresh pages a run, measured)."""
    if not keep_freed_memory():
        pytest.skip("the allocator is not glibc's")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", _SEPARATE_IN_A_THREAD],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
        check=True,
    )
    assert int(done.stdout.split()[-1]) < 1000


_ARENAS = """
import ctypes, sys, threading
import numpy as np

held, ready = [], threading.Barrier(5)

def allocate():
    held.append(np.ones(2**20))  # 8 MB from this thread's arena
    ready.wait()
    ready.wait()

threads = [threading.Thread(target=allocate) for _ in range(4)]
for thread in threads:
    thread.start()
ready.wait()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
report = libc.fopen(sys.argv[1].encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(report))
libc.fclose(ctypes.c_void_p(report))
ready.wait()
"""


def test_a_process_started_with_one_arena_allocates_from_one_arena_in_every_thread(tmp_path):
    """A catalog worker separates in a thread Ray started before the worker could tune the
    allocator (10,000 fresh pages per call measured there); the worker's environment
    (``ONE_ARENA_ENV``) makes every thread of the process allocate from the one arena where
    ``keep_freed_memory`` keeps freed memory."""
    if not keep_freed_memory():
        pytest.skip("the allocator is not glibc's")
    arenas = {}
    for name, extra in (("default", {}), ("one arena", ONE_ARENA_ENV)):
        environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        report = tmp_path / f"{name}.xml"
        subprocess.run(
            [sys.executable, "-c", _ARENAS, str(report)],
            env={**environment, **extra},
            timeout=60,
            check=True,
        )
        arenas[name] = report.read_text().count("<heap nr=")
    assert arenas["one arena"] == 1 < arenas["default"], arenas


def test_tracks_separated_together_get_the_stems_they_get_alone(separator):
    """Windows of several tracks share forward passes; each track's stems are unchanged, and a
    bad track is that track's error only."""
    tracks = [
        (bench_audio(2.5, 44100), 44100),
        (np.zeros((2, 0), np.float32), 44100),
        (bench_audio(0.4, 22050)[:1], 22050),  # shorter than a window: a batch of its own size
        (bench_audio(3.1, 48000, seed=2), 48000),
    ]
    together = separator.separate_many(tracks)
    assert isinstance(together[1], AudioError)
    for (audio, rate), stems in zip(tracks, together, strict=True):
        if isinstance(stems, Exception):
            continue
        alone = separator.separate(audio, rate)
        for stem in STEMS:
            np.testing.assert_allclose(stems[stem], alone[stem], atol=1e-6)


def test_an_excerpt_covers_exactly_its_span_and_matches_the_whole_file(tmp_path):
    """The excerpt's stems equal the whole file's over its span as closely as two whole-file
    separations with different window plans agree (trained weights: a random model's
    least-squares weights swing with the span)."""
    separator = Separator("default", "cpu", segment=2.0, context=0.5, precision="float32")
    rate = 22050
    audio = bench_audio(9.0, rate)
    write_audio(tmp_path / "song.wav", audio, rate, format="wav")
    start, duration = 3.25, 2.5
    excerpt = separator.separate_file(
        tmp_path / "song.wav", tmp_path / "part", format="wav", start=start, duration=duration
    )
    first, count = round(start * rate), round(duration * rate)

    def span(stems: dict[str, np.ndarray]) -> np.ndarray:
        return np.stack([stems[stem][:, first : first + count] for stem in STEMS], 1)

    whole = span(separator.separate(audio, rate))
    shifted = span(
        Separator("default", "cpu", segment=2.5, context=0.5, precision="float32").separate(
            audio, rate
        )
    )
    part = np.stack([read_audio(excerpt[stem])[0] for stem in STEMS], 1)
    assert part.shape == whole.shape == (2, 4, count)
    window_agreement = min(stem_agreement(whole, shifted).values())
    assert min(stem_agreement(whole, part).values()) > window_agreement - 3


@pytest.mark.parametrize(
    ("start", "duration", "reason"), [(9.5, None, "past the end"), (1.0, 0.0, "duration")]
)
def test_an_excerpt_outside_the_file_is_refused_with_a_reason(
    separator, tmp_path, start, duration, reason
):
    write_audio(tmp_path / "song.wav", bench_audio(2.0, 22050), 22050, format="wav")
    with pytest.raises(AudioError, match=reason):
        separator.separate_file(
            tmp_path / "song.wav", tmp_path / "out", start=start, duration=duration
        )
    assert not (tmp_path / "out").exists()


def test_the_gpu_path_on_cpu_tensors_agrees_with_the_soxr_path():
    """resampler="torch" is what a GPU runs (every op on the device); here on CPU tensors. Its
    resampler agrees with soxr at 85-90 dB (tests/test_resampler.py); through the trained
    network, whose mel branch takes logarithms of near-silent bins, the stems still agree far
    above the engine's window agreement."""
    audio = bench_audio(6.0, 44100)
    soxr_path = Separator("default", "cpu", precision="float32").separate(audio, 44100)
    torch_path = Separator("default", "cpu", resampler="torch", precision="float32").separate(
        audio, 44100
    )
    stack = [np.stack([stems[stem] for stem in STEMS], 1) for stems in (soxr_path, torch_path)]
    assert min(stem_agreement(*stack).values()) > 40


def test_files_separated_together_fail_alone(separator, tmp_path):
    rate = 16000
    write_audio(tmp_path / "a.wav", bench_audio(2.0, rate), rate, format="wav")
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really")
    write_audio(tmp_path / "b.flac", bench_audio(1.5, rate, seed=4)[:1], rate)
    jobs = [
        (tmp_path / name, tmp_path / "out" / name) for name in ("a.wav", "broken.wav", "b.flac")
    ]
    results = separator.separate_files(jobs, format="wav")
    assert isinstance(results[1], AudioError) and not (tmp_path / "out" / "broken.wav").exists()
    for (source, folder), result in zip(jobs, results, strict=True):
        if isinstance(result, Exception):
            continue
        assert sorted(p.name for p in folder.iterdir()) == sorted(f"{s}.wav" for s in STEMS)
        expected = separator.separate(*read_audio(source))
        assert (result.rate, result.channels, result.frames) == (rate, *expected["drums"].shape)
        for stem, path in result.paths.items():
            np.testing.assert_allclose(read_audio(path)[0], expected[stem], atol=1e-5)


def test_calls_from_several_threads_take_turns_on_the_network_and_get_their_own_stems(
    model, tmp_path
):
    """A server or an actor taking several calls at once shares one separator: the calls'
    forward passes take turns (one compiled graph, one device queue), their host work overlaps,
    and every track gets the stems it gets alone."""
    separator = Separator(
        model, device="cpu", segment=1.0, context=0.25, batch_size=4, precision="float32"
    )
    rate = 22050
    jobs = []
    for k in range(4):
        write_audio(tmp_path / f"{k}.wav", bench_audio(3.0, rate, seed=k), rate, format="wav")
        jobs.append((tmp_path / f"{k}.wav", tmp_path / "out" / str(k)))
    network, active, most = separator.network.separate_last, [0], [0]

    def watched(inputs):
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.01)  # a forward pass long enough for another thread to arrive
        try:
            return network(inputs)
        finally:
            active[0] -= 1

    separator.network.separate_last = watched
    with ThreadPoolExecutor(2) as callers:
        groups = list(callers.map(separator.separate_files, [jobs[:2], jobs[2:]]))
    assert most[0] == 1
    for (source, _), result in zip(jobs, groups[0] + groups[1], strict=True):
        expected = separator.separate(*read_audio(source))
        for stem, path in result.paths.items():
            np.testing.assert_allclose(read_audio(path)[0], expected[stem], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_the_whole_gpu_configuration_on_cpu_tensors_agrees_with_the_cpu_path():
    """What CUDA runs by default, the torch resampler and the TCN blocks compiled by
    torch.compile (here by inductor's C++ backend), against the CPU's soxr and hand-written
    blocks: as close as the resampler alone allows."""
    audio = bench_audio(6.0, 44100)
    cpu_path = Separator("default", "cpu", precision="float32").separate(audio, 44100)
    gpu_config = Separator(
        "default", "cpu", resampler="torch", kernels="fused", precision="float32"
    )
    gpu_path = gpu_config.separate(audio, 44100)
    assert gpu_config.network.fused
    stack = [np.stack([stems[stem] for stem in STEMS], 1) for stems in (cpu_path, gpu_path)]
    assert min(stem_agreement(*stack).values()) > 40


def test_a_track_whose_file_cannot_be_written_leaves_no_outputs_and_fails_alone(
    separator, tmp_path
):
    """Each output file is encoded in its own thread; if one of a track's files fails, the
    track's other files are not left behind looking complete."""
    rate = 16000
    jobs = []
    for name in ("a", "b"):
        write_audio(tmp_path / f"{name}.wav", bench_audio(2.0, rate), rate, format="wav")
        jobs.append((tmp_path / f"{name}.wav", tmp_path / "out" / name))
    (tmp_path / "out" / "b" / "bass.wav").mkdir(parents=True)  # a folder where a file goes
    results = separator.separate_files(jobs, format="wav")
    assert isinstance(results[1], OSError)
    assert [p.name for p in (tmp_path / "out" / "b").iterdir()] == ["bass.wav"]
    assert sorted(p.name for p in results[0].paths.values()) == sorted(f"{s}.wav" for s in STEMS)
    assert all(path.is_file() for path in results[0].paths.values())


def test_reading_ahead_keeps_one_block_in_flight_and_stops_when_closed():
    reads: list[int] = []

    def blocks():
        for index in range(10):
            time.sleep(0.01)
            reads.append(index)
            yield np.full(4, index, dtype=np.float32)

    source = blocks()
    ahead = ReadAhead(source)
    assert next(ahead)[0] == 0 and next(ahead)[0] == 1
    ahead.close()  # waits for the read in flight, and closes the source
    count = len(reads)
    time.sleep(0.1)
    assert count == len(reads) and 2 <= count <= 3  # blocks 0 and 1, at most one read ahead
    assert source.gi_frame is None  # closed by its owner, not left to the garbage collector
    with ReadAhead(blocks()) as ahead:
        assert [block[0] for block in ahead] == list(range(10))


def test_a_network_that_gives_non_finite_values_fails_each_track_with_a_reason(tmp_path):
    """The least squares run where the coefficients are needed (for files, in the encoding
    threads): non-finite sums still fail the track with one clear error, no NaN file is left,
    and an in-memory separation raises the same error."""
    torch.manual_seed(0)
    broken = MultiTasNet(SMALL).eval()
    with torch.no_grad():
        next(broken.stages[-1].decoder.parameters()).fill_(float("nan"))  # the last stage's
    separator = Separator(broken, device="cpu", segment=1.0, context=0.25, precision="float32")
    rate = 16000
    jobs = []
    for name in ("a", "b"):
        write_audio(tmp_path / f"{name}.wav", bench_audio(1.5, rate), rate, format="wav")
        jobs.append((tmp_path / f"{name}.wav", tmp_path / "out" / name))
    results = separator.separate_files(jobs, format="flac")
    assert all(isinstance(r, FloatingPointError) and "non-finite" in str(r) for r in results)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.flac"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        separator.separate(bench_audio(1.5, rate), rate)


def test_flac_outputs_that_would_clip_are_written_scaled_and_the_stems_by_one_gain(
    separator, tmp_path
):
    """24-bit FLAC holds samples within full scale. A track whose outputs would go over is
    written again, scaled: its stems by one gain, so that they keep their balance and still add
    up to the (scaled) mixture; a remix by its own. A track within full scale is untouched."""
    rate = 16000
    outputs = {stem: tuple(float(i == k) for i in range(4)) for k, stem in enumerate(STEMS)}
    outputs["remix"] = (0.0, 0.0, 0.5, 4.0)

    def expected(audio: np.ndarray) -> dict[str, np.ndarray]:
        stems = np.stack(list(separator.separate(audio, rate).values()))
        return {name: np.einsum("s,sct->ct", np.float32(w), stems) for name, w in outputs.items()}

    quiet = bench_audio(2.0, rate)
    quiet_mixes = expected(quiet)
    # The network hears the mixture normalised: louder input, proportionally louder stems.
    loud = quiet * np.float32(3 / max(np.abs(quiet_mixes[stem]).max() for stem in STEMS))
    loud_mixes = expected(loud)
    jobs = []
    for name, audio in (("quiet", quiet), ("loud", loud)):
        write_audio(tmp_path / f"{name}.wav", audio, rate, format="wav")  # float keeps any level
        jobs.append((tmp_path / f"{name}.wav", tmp_path / "out" / name))
    quiet_result, loud_result = separator.separate_files(jobs, outputs, format="flac")

    assert max(np.abs(mix).max() for mix in quiet_mixes.values()) < 1  # nothing to scale
    assert quiet_result.gains == dict.fromkeys(outputs, 1.0)
    for name, path in quiet_result.paths.items():
        np.testing.assert_allclose(read_audio(path)[0], quiet_mixes[name], atol=1e-5)

    stem_peak = max(np.abs(loud_mixes[stem]).max() for stem in STEMS)
    remix_peak = np.abs(loud_mixes["remix"]).max()
    assert stem_peak > 1 and remix_peak > 1 and abs(remix_peak / stem_peak - 1) > 0.01
    expected_gains = {**dict.fromkeys(STEMS, 0.99 / stem_peak), "remix": 0.99 / remix_peak}
    assert loud_result.gains == pytest.approx(expected_gains, rel=1e-5)
    written = {name: read_audio(path)[0] for name, path in loud_result.paths.items()}
    for name, audio in written.items():
        np.testing.assert_allclose(audio, loud_mixes[name] * expected_gains[name], atol=1e-5)
    assert max(np.abs(written[stem]).max() for stem in STEMS) == pytest.approx(0.99, abs=1e-5)
    assert np.abs(written["remix"]).max() == pytest.approx(0.99, abs=1e-5)
    assert sorted(p.name for p in (tmp_path / "out" / "loud").iterdir()) == sorted(
        f"{name}.flac" for name in outputs
    )  # the first, clipped writes are gone


def test_no_engine_thread_outlives_its_call_even_without_the_garbage_collector(tmp_path):
    """Every thread a call starts (first passes, reading ahead, resampling, spool writers,
    encoders) is stopped by the call itself, whether it ends, fails or is stopped early: with
    the garbage collector off, none is left running afterwards."""
    import gc
    import threading

    from tqdm._monitor import TMonitor

    torch.manual_seed(0)
    model = MultiTasNet(SMALL).eval()
    separator = Separator(model, "cpu", "float32", segment=1.0, context=0.25, batch_size=3)
    rate = 16000
    for name in ("a", "b"):
        write_audio(tmp_path / f"{name}.wav", bench_audio(3.0, rate), rate, format="wav")
    (tmp_path / "broken.wav").write_bytes(b"RIFF not audio")

    class Stop(Exception):
        pass

    def stop_early(done: int, total: int) -> None:
        if done:
            raise Stop

    gc.disable()
    try:
        before = set(threading.enumerate())
        with pytest.raises(Stop):
            separator.separate_file(tmp_path / "a.wav", tmp_path / "early", callback=stop_early)
        jobs = [(tmp_path / f"{n}.wav", tmp_path / "out" / n) for n in ("a", "broken", "b")]
        assert isinstance(separator.separate_files(jobs)[1], Exception)
        with pytest.raises(Stop):
            separator.separate(bench_audio(3.0, rate), rate, callback=stop_early)
        ours = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        left = [t.name for t in ours if not isinstance(t, TMonitor)]  # tqdm's, process-wide
    finally:
        gc.enable()
    assert left == []


_STRESS = """
import gc, random, sys, tempfile
from pathlib import Path
import numpy as np
import torch
from model import MultiTasNet, TasNetConfig
from pipeline.audio import write_audio
from pipeline.bench.signals import bench_audio
from pipeline.separator import Separator

gc.set_threshold(20, 2, 2)  # collections all the time: abandoned objects are finalised anywhere
torch.manual_seed(0)
model = MultiTasNet(TasNetConfig(N=16, B=8, H=8, layers=2, stack=1, num_mels=8)).eval()
separator = Separator(model, "cpu", "float32", segment=0.5, context=0.125, batch_size=3)
work = Path(tempfile.mkdtemp())
rate = 8000
sources = []
for k in range(4):
    sources.append(work / f"{k}.wav")
    write_audio(sources[-1], bench_audio(1.0 + 0.3 * k, rate, seed=k), rate, format="wav")
(work / "broken.wav").write_bytes(b"RIFF not audio")
random.seed(1)

class Stop(Exception):
    pass

def stop_at(when):
    def callback(done, total):
        if done >= when:
            raise Stop
    return callback

for round in range(int(sys.argv[1])):
    jobs = [(path, work / "out" / f"{round}-{path.stem}") for path in sources]
    results = separator.separate_files([*jobs, (work / "broken.wav", work / "out" / "b")])
    assert sum(not isinstance(r, Exception) for r in results) == 4, results
    try:
        separator.separate_file(sources[round % 4], work / "early", callback=stop_at(random.randint(1, 6)))
    except Stop:
        pass
    separator.separate_many([(bench_audio(0.7, rate, seed=round), rate), (np.zeros((1, 0), np.float32), rate)])
print("done", flush=True)
"""


@pytest.mark.slow  # a fresh Python process, 40 rounds
def test_the_multi_track_path_survives_early_stops_and_constant_collections():
    """Every thread the engine starts is stopped by its owner: 40 rounds of separations of
    several files (one broken), early stops from the callback and arrays, with the garbage
    collector running all the time, end within the deadline (a pool left to the collector once
    deadlocked the whole process)."""
    done = subprocess.run(
        [sys.executable, "-c", _STRESS, "40"], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr[-3000:]
