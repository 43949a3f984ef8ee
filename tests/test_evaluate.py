"""Catalog evaluation on real parts: museval itself as the yardstick, the session's local Ray,
Prefect's test harness, S3 through a moto server on 127.0.0.1."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from evaluation_helpers import (
    RATE,
    assert_frames_equal_museval,
    assert_summary_equals_evalstore,
    museval_frames,
    write_estimates,
    write_references,
)

from model import STEMS
from pipeline.cli import main
from pipeline.evaluation.sources import parse_methods, reference_name

FRAME_COLUMNS = ["method", "track", "target", "frame", "time", "SDR", "SIR", "ISR", "SAR"]


def test_scores_equal_museval_and_a_rerun_scores_only_what_changed(
    tmp_path, prefect_api, ray_local, capsys
):
    from prefect.client.orchestration import get_client

    references = write_references(
        tmp_path / "refs", ["song a", "song b"], seconds=2, silent={"song b": "vocals"}
    )
    estimates = write_estimates(references, tmp_path / "leaky")
    out = tmp_path / "scores"
    command = ["evaluate", str(references), str(estimates), str(out), "--mixture-baseline"]

    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "2 tracks x 2 methods (leaky, mixture) = 4 pairs; 0 already scored, 4 planned: 4 ok" in (
        printed
    )
    assert "| leaky | drums |" in printed and "| mixture | vocals |" in printed
    frames = pd.read_parquet(out / "frames.parquet")
    assert list(frames.columns) == FRAME_COLUMNS and len(frames) == 2 * 2 * 4 * 2
    for method, name in (("leaky", "song a"), ("leaky", "song b"), ("mixture", "song a")):
        refs = {t: references / "test" / name / f"{t}.wav" for t in STEMS}
        if method == "mixture":
            files = dict.fromkeys(STEMS, references / "test" / name / "mixture.wav")
        else:
            files = {t: estimates / name / f"{t}.wav" for t in STEMS}
        ours = frames[(frames.method == method) & (frames.track == name)]
        assert_frames_equal_museval(ours, museval_frames(refs, files))
    summary = pd.read_parquet(out / "summary.parquet")
    for method in ("leaky", "mixture"):
        assert_summary_equals_evalstore(summary, out / "museval" / method)
    vocals = summary.set_index(["method", "target"]).loc[("leaky", "vocals")]
    assert vocals.tracks == 1  # song b's vocals are silent: NaN, left out
    sdr = summary.set_index(["method", "target"]).SDR_median
    assert (sdr.loc["leaky"] > sdr.loc["mixture"]).all()  # less leakage than the mixture
    assert (out / "boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with get_client(sync_client=True) as client:
        artifacts = [a for a in client.read_latest_artifacts() if a.key == "evaluate-catalog"]
    assert artifacts and {row["method"] for row in json.loads(artifacts[0].data)} >= {"leaky"}

    assert main(command) == 0
    assert "4 already scored, 0 planned" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_parquet(out / "frames.parquet"), frames)

    bass = estimates / "song a" / "bass.wav"
    sf.write(bass, 0.5 * sf.read(bass, dtype="float32")[0], RATE, subtype="FLOAT")
    assert main(command) == 0
    assert "3 already scored, 1 planned: 1 ok, 0 failed" in capsys.readouterr().out
    changed = pd.read_parquet(out / "frames.parquet")
    assert len(changed) == len(frames)
    rows = (changed.method == "leaky") & (changed.track == "song a") & (changed.target == "bass")
    assert not np.allclose(changed[rows].SDR, frames[rows].SDR)  # the new file was scored


def test_bad_files_give_one_error_row_each_and_the_run_goes_on(tmp_path, prefect_api, ray_local):
    from flows.evaluate import evaluate_catalog

    names = ["good", "corrupt reference", "no vocals estimate", "three channels", "nan estimate"]
    names += ["at 22050 Hz", "no bass reference"]
    references = write_references(tmp_path / "refs", names, seconds=2)
    estimates = write_estimates(references, tmp_path / "est")
    (references / "test" / "corrupt reference" / "vocals.wav").write_bytes(b"RIFF" + bytes(999))
    (references / "test" / "no bass reference" / "bass.wav").unlink()
    (estimates / "no vocals estimate" / "vocals.wav").unlink()
    sf.write(estimates / "three channels" / "drums.wav", np.zeros((RATE * 2, 3)), RATE)
    nan = sf.read(estimates / "nan estimate" / "other.wav", dtype="float32")[0]
    nan[100] = np.nan
    sf.write(estimates / "nan estimate" / "other.wav", nan, RATE, subtype="FLOAT")
    for stem in STEMS:  # another rate, and 20 ms longer: resampled and trimmed, with warnings
        path = estimates / "at 22050 Hz" / f"{stem}.wav"
        audio = sf.read(path, dtype="float32")[0][::2]
        sf.write(path, np.concatenate([audio, audio[:441]]), 22050, subtype="FLOAT")

    summary = evaluate_catalog(str(references), {"est": str(estimates)}, str(tmp_path / "out"))
    assert summary["pairs"]["ok"] == 2 and summary["pairs"]["error"] == 5
    tracks = pd.read_parquet(tmp_path / "out" / "tracks.parquet").set_index("track")
    assert set(tracks.index) == set(names)
    errors = tracks.error.to_dict()
    assert "vocals.wav" in errors["corrupt reference"]
    assert "no estimate of vocals" in errors["no vocals estimate"]
    assert "3 channels" in errors["three channels"]
    assert "NaN" in errors["nan estimate"] and "other.wav" in errors["nan estimate"]
    assert "has no bass.wav" in errors["no bass reference"]
    for name, error in errors.items():
        ok = name in ("good", "at 22050 Hz")
        assert (tracks.status[name] == "ok") == ok and pd.isna(error) == ok
        assert ok or ("\n" not in error and "Traceback" not in error)
    warnings = tracks.warnings["at 22050 Hz"]
    assert "resampled to 44100 Hz" in warnings and "trimmed" in warnings
    frames = pd.read_parquet(tmp_path / "out" / "frames.parquet")
    assert set(frames.track) == {"good", "at 22050 Hz"}


def test_s3_references_and_destination(s3_bucket, tmp_path, prefect_api, ray_local):
    from flows.evaluate import evaluate_catalog

    fs, bucket, options = s3_bucket
    references = write_references(tmp_path / "refs", ["remote song"], seconds=2)
    estimates = write_estimates(references, tmp_path / "est")
    fs.put(str(references / "test"), f"{bucket}/refs/test", recursive=True)
    destination = f"s3://{bucket}/evaluation"

    summary = evaluate_catalog(
        f"s3://{bucket}/refs", [f"local={estimates}"], destination, storage_options=options
    )
    assert summary["pairs"]["ok"] == 1 and summary["outputs"]["frames"].startswith("s3://")
    with fs.open(f"{bucket}/evaluation/frames.parquet", "rb") as file:
        frames = pd.read_parquet(file)
    refs = {t: references / "test" / "remote song" / f"{t}.wav" for t in STEMS}
    files = {t: estimates / "remote song" / f"{t}.wav" for t in STEMS}
    assert_frames_equal_museval(frames, museval_frames(refs, files))
    stored = json.loads(fs.cat_file(f"{bucket}/evaluation/museval/local/test/remote song.json"))
    assert {target["name"] for target in stored["targets"]} == set(STEMS)
    again = evaluate_catalog(
        f"s3://{bucket}/refs", [f"local={estimates}"], destination, storage_options=options
    )
    assert again["pairs"]["skipped"] == 1 and again["pairs"]["planned"] == 0


def test_method_names_and_track_names():
    assert parse_methods(["out/separated/meta-tasnet", "b=s3://x/y"]) == [
        ("meta-tasnet", "out/separated/meta-tasnet"),
        ("b", "s3://x/y"),
    ]
    assert parse_methods({"x": "/a"}) == [("x", "/a")]
    with pytest.raises(ValueError, match="two estimate sources are named y"):
        parse_methods(["a/y", "b/y"])
    with pytest.raises(ValueError, match="method name"):
        parse_methods(["../=x"])
    assert reference_name("test/Song A/mixture.wav") == "Song A"
    assert reference_name("albums/Song B.flac") == "Song B"
    assert reference_name("Artist - Song.stem.mp4") == "Artist - Song"


def test_evaluate_command_refuses_bad_arguments(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "at least one estimate source" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), "x", "out", "--workers", "0"]) == 2
    assert "--workers must be 1 or more" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", str(tmp_path), "x", "out", "--targets", "drums,piano"])


@pytest.mark.slow  # museval on a decoded MUSDB18 track
def test_musdb_stem_mp4_references_score_like_museval(tmp_path):
    """A MUSDB18 .stem.mp4 catalog (listed through musdb, its streams decoded one by one to
    temporary files): the mixture baseline of one track, scored by the task function itself,
    equals museval on the streams as stempeg decodes them."""
    import museval
    import stempeg

    from pipeline.evaluation.job import score_pair
    from pipeline.evaluation.plan import plan_evaluation
    from pipeline.evaluation.sources import Method
    from pipeline.storage.references import list_references

    t = np.arange(RATE) / RATE
    stems = np.stack(
        [np.stack([0.2 * np.sin(2 * np.pi * f * t)] * 2, 1) for f in (110.0, 55.0, 440.0, 660.0)]
    )
    (tmp_path / "musdb" / "test").mkdir(parents=True)
    stempeg.write_stems(
        str(tmp_path / "musdb" / "test" / "Artist - Song.stem.mp4"),
        np.concatenate([stems.sum(0, keepdims=True), stems]),
        sample_rate=RATE,
        writer=stempeg.StreamsWriter(codec="aac", bitrate=256000),
    )
    (track,) = list_references(str(tmp_path / "musdb"), "test")
    assert track.name == "Artist - Song"
    plan = plan_evaluation(
        [track], [Method("mixture", "", "mixture")], {}, STEMS, {}, str(tmp_path / "out"), "test"
    )
    row = score_pair(plan.todo[0])
    assert row["status"] == "ok", row["error"]
    decoded, _ = stempeg.read_stems(track.files["stem.mp4"], dtype=np.float32, always_3d=True)
    sdr, _, _, _ = museval.evaluate(decoded[1:], np.stack([decoded[0]] * 4))
    frames = pd.DataFrame(row["frames"])
    for index, stem in enumerate(STEMS):
        ours = frames[frames.target == stem].sort_values("frame").SDR.to_numpy()
        np.testing.assert_allclose(ours, sdr[index], rtol=1e-5, atol=1e-5)
    assert json.loads(
        (tmp_path / "out" / "museval" / "mixture" / "test" / "Artist - Song.json").read_text()
    )
