"""``metasep separate FILE... -o OUT`` and ``metasep bench`` on a small random model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from model import STEMS, MultiTasNet, TasNetConfig, save_checkpoint
from pipeline.audio import read_audio, write_audio
from pipeline.bench.signals import bench_audio
from pipeline.cli import main
from pipeline.separator import Separator

SMALL = TasNetConfig(N=32, B=16, H=16, layers=4, stack=1, num_mels=16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "small"
    return str(save_checkpoint(MultiTasNet(SMALL), path))


@pytest.fixture(scope="module")
def songs(tmp_path_factory) -> dict[str, object]:
    """A stereo 44.1 kHz WAV and a mono 22.05 kHz FLAC."""
    folder = tmp_path_factory.mktemp("songs")
    stereo, mono = folder / "song one.wav", folder / "two.flac"
    write_audio(stereo, bench_audio(2.0), 44100, format="wav")
    write_audio(mono, bench_audio(1.5, 22050, seed=1)[:1], 22050)
    return {"stereo": stereo, "mono": mono}


def separate(*args: object) -> int:
    return main(["separate", *map(str, args)])


def test_layout_is_out_track_stem_with_each_input_shape(checkpoint, songs, tmp_path):
    out = tmp_path / "out"
    assert separate(songs["stereo"], songs["mono"], "-o", out, "--checkpoint", checkpoint) == 0
    assert sorted(p.name for p in out.iterdir()) == ["song one", "two"]
    for track, source in (("song one", songs["stereo"]), ("two", songs["mono"])):
        info = sf.info(source)
        assert sorted(p.name for p in (out / track).iterdir()) == sorted(f"{s}.flac" for s in STEMS)
        for stem in STEMS:
            written = sf.info(out / track / f"{stem}.flac")
            assert (written.samplerate, written.channels, written.frames) == (
                info.samplerate,
                info.channels,
                info.frames,
            )


def test_two_stems_karaoke_and_remix_are_mixes_of_the_four_stems(checkpoint, songs, tmp_path):
    options = ["--checkpoint", checkpoint, "--format", "wav"]
    assert separate(songs["stereo"], "-o", tmp_path / "four", *options) == 0
    extra = ["--two-stems", "vocals", "--karaoke", "--remix", "vocals=1.5,drums=0.25,bass=0"]
    assert separate(songs["stereo"], "-o", tmp_path / "mixes", *options, *extra) == 0
    four = outputs(tmp_path / "four" / "song one")
    mixes = outputs(tmp_path / "mixes" / "song one")
    assert sorted(four) == sorted(STEMS)
    assert sorted(mixes) == ["karaoke", "no_vocals", "remix", "vocals"]
    backing = four["drums"] + four["bass"] + four["other"]
    np.testing.assert_allclose(mixes["vocals"], four["vocals"], atol=1e-6)
    np.testing.assert_allclose(mixes["no_vocals"], backing, atol=1e-5)
    np.testing.assert_allclose(mixes["karaoke"], backing, atol=1e-5)
    remix = 1.5 * four["vocals"] + 0.25 * four["drums"] + four["other"]
    np.testing.assert_allclose(mixes["remix"], remix, atol=1e-5)


def test_mp3_stems_are_sample_aligned_with_the_flac_ones_and_unwritable_audio_fails_first(
    checkpoint, songs, tmp_path, capsys
):
    six = tmp_path / "six.wav"  # MP3 holds one or two channels at 8 to 48 kHz
    write_audio(six, np.tile(bench_audio(1.0, 96000), (3, 1)), 96000, format="wav")
    options = ["--checkpoint", checkpoint]
    assert separate(songs["stereo"], "-o", tmp_path / "flac", *options) == 0
    assert separate(songs["stereo"], six, "-o", tmp_path / "mp3", *options, "--format", "mp3") == 1
    error = capsys.readouterr().err
    assert f"{six}: mp3 files cannot hold 6 channel(s) at 96000 Hz" in error
    assert sorted(p.name for p in (tmp_path / "mp3").iterdir()) == ["song one"]
    for stem in STEMS:
        lossless = read_audio(tmp_path / "flac" / "song one" / f"{stem}.flac")[0]
        lossy, rate = read_audio(tmp_path / "mp3" / "song one" / f"{stem}.mp3")
        assert rate == 44100 and lossy.shape == lossless.shape  # gapless: no encoder delay
        error_db = 10 * np.log10(np.sum((lossy - lossless) ** 2) / np.sum(lossless**2))
        assert error_db < -20, stem  # 320 kbps; a one-sample shift would be near 0 dB


def test_bad_files_get_one_error_line_each_and_the_rest_is_separated(
    checkpoint, songs, tmp_path, capsys
):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.wav").write_bytes(b"")
    sf.write(bad / "zero.wav", np.zeros((0, 2), np.float32), 44100)
    (bad / "text.mp3").write_text("not audio\n" * 50)
    (bad / "folder.flac").mkdir()
    inputs = [bad / "empty.wav", songs["mono"], bad / "zero.wav", bad / "text.mp3"]
    inputs += [bad / "folder.flac", bad / "missing.ogg"]
    out = tmp_path / "out"
    assert separate(*inputs, "-o", out, "--checkpoint", checkpoint) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 5 and "Traceback" not in captured.err
    for path in inputs:
        if path != songs["mono"]:
            assert sum(str(path) in line for line in errors) == 1, path
    assert "separated 1 of 6 file(s)" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["two"]


def test_conflicting_options_are_a_usage_error(checkpoint, songs, tmp_path, capsys):
    args = [songs["mono"], "-o", tmp_path, "--checkpoint", checkpoint]
    assert separate(*args, "--two-stems", "vocals", "--stems", "drums") == 2
    assert "cannot be combined" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow  # three timed separations and the reference path
def test_bench_reports_speed_memory_and_agreement(checkpoint, capsys, tmp_path):
    command = ["bench", "--config", checkpoint, "--seconds", "3", "--segment", "1"]
    profiles = tmp_path / "profiles"
    assert main([*command, "--context", "0.5", "--json", "--profile", str(profiles)]) == 0
    figures = json.loads(capsys.readouterr().out)
    for key in ("reference_xrt", "engine_xrt", "ratio", "peak_rss_mb", "agreement_db"):
        assert np.isfinite(figures[key]) and figures[key] > 0, key
    assert figures["ratio"] == pytest.approx(figures["engine_xrt"] / figures["reference_xrt"])
    assert figures["reference_chunks"] == 1 and figures["device"] == "cpu"
    # 1 s windows of a small random model: far from the single pass, but related to it.
    assert 5 < figures["agreement_db"] < 100
    assert figures["agreement_db"] == min(figures[f"agreement_{s}_db"] for s in STEMS)
    # Where the time goes: every phase of the file path, then in memory and the network alone.
    phases = {key[6:-2] for key in figures if key.startswith("phase_")}
    assert phases == {"decode", "resample_in", "network", "resample_out", "encode"}
    assert all(figures[f"phase_{name}_s"] >= 0 for name in phases)
    assert figures["phase_network_s"] > 0 and figures["phase_encode_s"] > 0
    for key in ("memory_xrt", "network_xrt"):
        assert np.isfinite(figures[key]) and figures[key] > 0, key
    # --profile: the host's and the operators' view of the file run and the in-memory run.
    assert sorted(p.name for p in profiles.iterdir()) == [
        "host-file.txt",
        "host-memory.txt",
        "operators-file.txt",
        "operators-memory.txt",
    ]
    assert "separate_file" in (profiles / "host-file.txt").read_text()
    assert "_forward" in (profiles / "host-memory.txt").read_text()
    assert "aten::" in (profiles / "operators-memory.txt").read_text()
    assert main([*command, "--engine-only"]) == 0
    printed = capsys.readouterr().out
    assert "engine:" in printed and "peak RSS" in printed and "reference:" not in printed


def test_bench_throughput_mode_runs_several_tracks_through_the_model_stage(checkpoint, capsys):
    command = ["bench", "--config", checkpoint, "--seconds", "2", "--tracks", "3", "--json"]
    assert main(command) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["tracks"] == 3 and figures["tracks_per_call"] == 1  # one per call on a CPU
    assert figures["throughput_xrt"] == pytest.approx(3 * 2 / figures["throughput_seconds"])
    assert "gpu_busy_fraction" not in figures  # CUDA events only
    assert figures["host_cpu_seconds"] > 0 and figures["host_cores"] >= 1
    assert figures["host_cores_busy"] == pytest.approx(
        figures["host_cpu_seconds"] / figures["throughput_seconds"]
    )
    assert main([*command, "--tracks-per-call", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["tracks_per_call"] == 2
    assert main([*command, "--tracks-per-call", "1", "--calls", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["calls_at_once"] == 2
    assert main(["bench", "--config", checkpoint, "--calls", "2"]) == 2
    assert main(["bench", "--config", checkpoint, "--tracks", "0"]) == 2
    assert main(["bench", "--config", checkpoint, "--tracks-per-call", "2"]) == 2
    assert main([*command, "--profile", "profiles"]) == 2


def test_bench_counts_the_ops_dispatched_outside_the_network(checkpoint, capsys):
    command = ["bench", "--config", checkpoint, "--seconds", "20", "--count-ops", "--json"]
    assert main(command) == 0
    figures = json.loads(capsys.readouterr().out)
    phases = {key[15:]: figures[key] for key in figures if key.startswith("ops_per_minute_")}
    assert {"resample_in", "resample_out", "other"} <= set(phases) and "network" not in phases
    assert all(count > 0 for count in phases.values())
    assert figures["ops_per_minute"] == pytest.approx(sum(phases.values()))
    assert main([*command[:-1]]) == 0
    assert "per minute of audio outside the network" in capsys.readouterr().out
    assert main([*command, "--tracks", "2"]) == 2


@pytest.mark.slow  # a fresh Python process
def test_bench_memory_of_a_fresh_process_is_its_own():
    """The timed paths run in spawned processes; their peak must not include the parent's."""
    from pipeline.bench.process import in_fresh_process, peak_rss_mb

    held = np.ones(600 * 2**20 // 8)  # 600 MiB touched by this (the parent) process
    assert peak_rss_mb() > 600
    del held
    assert in_fresh_process(peak_rss_mb) < 400


def outputs(folder) -> dict[str, np.ndarray]:
    return {path.stem: read_audio(path)[0] for path in folder.iterdir()}


@pytest.mark.slow  # a fresh Python process
def test_a_missing_audio_file_is_no_such_file_at_once_without_prefect_or_ray(tmp_path):
    """A path that looks like one audio file is a file, even when it does not exist: the answer
    comes from the file path (no flow, no cluster)."""
    probe = (
        "import sys; from pipeline.cli import main; "
        f"code = main(['separate', {str(tmp_path / 'typo.wav')!r}, '-o', {str(tmp_path)!r}]); "
        "print('loaded', 'prefect' in sys.modules, 'ray' in sys.modules); sys.exit(code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 1, result.stderr
    assert "typo.wav: no such file" in result.stderr
    assert "loaded False False" in result.stdout


def test_a_loud_file_is_scaled_not_clipped_and_the_command_says_so_on_its_own_line(
    checkpoint, tmp_path
):
    """The warning comes while the files' progress bar is drawn: it gets a line of its own."""
    song = tmp_path / "loud.wav"
    sf.write(song, 300 * bench_audio(2.0).T, 44100, subtype="FLOAT")  # far over full scale
    write_audio(tmp_path / "quiet.wav", bench_audio(1.0), 44100, format="wav")
    files = [str(song), str(tmp_path / "quiet.wav")]
    command = [sys.executable, "-m", "pipeline.cli", "separate", *files, "-o", str(tmp_path)]
    done = subprocess.run([*command, "--checkpoint", checkpoint], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    shown = [line.rsplit("\r", 1)[-1] for line in done.stderr.split("\n")]
    warned = [line for line in shown if "outputs would clip; written scaled" in line]
    assert warned and all(
        line.startswith("WARNING pipeline.separator.outputs: ") for line in warned
    )
    peaks = [np.abs(read_audio(tmp_path / "loud" / f"{stem}.flac")[0]).max() for stem in STEMS]
    assert max(peaks) == pytest.approx(0.99, abs=1e-5)


def test_files_separated_together_equal_one_at_a_time_and_a_bad_one_fails_alone(
    checkpoint, tmp_path, capsys, monkeypatch
):
    """``--tracks-per-call 3`` hands the engine three files per call (on a GPU, the default of
    eight fills its forward passes): the excerpt of each is as one at a time gives it, and an
    unreadable file in the group is that file's error only."""
    first, second, empty = tmp_path / "a.wav", tmp_path / "b.wav", tmp_path / "empty.wav"
    write_audio(first, bench_audio(2.0, seed=0), 44100, format="wav")
    write_audio(second, bench_audio(2.0, seed=2), 44100, format="wav")
    empty.write_bytes(b"")
    groups: list[int] = []
    separate_files = Separator.separate_files

    def counted(self, jobs, *args, **kwargs):
        groups.append(len(jobs))
        return separate_files(self, jobs, *args, **kwargs)

    monkeypatch.setattr(Separator, "separate_files", counted)
    options = ["--checkpoint", checkpoint, "--format", "wav", "--batch-size", "4"]
    options += ["--start", "0.25", "--duration", "1"]
    stems = {}
    for per_call in (1, 3):
        out = tmp_path / f"out{per_call}"
        code = separate(first, empty, second, "-o", out, *options, "--tracks-per-call", per_call)
        captured = capsys.readouterr()
        assert code == 1
        errors = [line for line in captured.err.splitlines() if "error:" in line]
        assert len(errors) == 1 and str(empty) in errors[0]
        assert "separated 2 of 3 file(s), 2.0 s of audio in " in captured.out  # two excerpts
        assert sorted(p.name for p in out.iterdir()) == ["a", "b"]
        stems[per_call] = {track: outputs(out / track) for track in ("a", "b")}
    assert groups == [1, 1, 1, 3]
    for track in ("a", "b"):
        for stem in STEMS:
            alone, together = stems[1][track][stem], stems[3][track][stem]
            assert alone.shape == together.shape == (2, 44100)
            np.testing.assert_allclose(together, alone, rtol=0, atol=1e-6, err_msg=track)
    assert not np.allclose(stems[3]["a"]["drums"], stems[3]["b"]["drums"])
