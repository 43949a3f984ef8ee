"""metasep benchmark end to end: synth references, the shipped model through the catalog flow,
museval through the evaluation flow; the numbers equal museval run directly on the same files."""

from __future__ import annotations

import pandas as pd
from evaluation_helpers import (
    assert_frames_equal_museval,
    assert_summary_equals_evalstore,
    museval_frames,
)

from model import STEMS
from pipeline.cli import main
from pipeline.storage.location import open_location
from pipeline.storage.manifest import read_manifests


def test_benchmark_separates_and_scores_the_default_model(tmp_path, prefect_api, ray_local, capsys):
    out = tmp_path / "bench"
    command = ["benchmark", "--tracks", "2", "--seconds", "3", "--seed", "2", "--out", str(out)]
    assert main(command) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("median SDR in dB over 2 tracks") :]
    assert "| default |" in table and "| mixture |" in table
    frames = pd.read_parquet(out / "evaluation" / "frames.parquet")
    assert set(frames.method) == {"default", "mixture"} and set(frames.target) == set(STEMS)
    assert frames.track.nunique() == 2 and set(frames.frame) == {0, 1, 2}

    # the separated stems, found through the catalog's manifest, scored by museval directly
    references = out / "references" / "seed2-3s" / "test"
    fs, root = open_location(str(out / "separated" / "default"))
    for row in read_manifests(fs, root).to_pylist():
        track = row["track_id"].split("/")[0]
        refs = {t: references / track / f"{t}.wav" for t in STEMS}
        stems = {t: row[f"{t}_uri"] for t in STEMS}
        ours = frames[(frames.method == "default") & (frames.track == track)]
        assert_frames_equal_museval(ours, museval_frames(refs, stems))
    summary = pd.read_parquet(out / "evaluation" / "summary.parquet")
    for method in ("default", "mixture"):
        assert_summary_equals_evalstore(summary, out / "evaluation" / "museval" / method)
    sdr = summary.set_index(["method", "target"]).SDR_median
    assert sdr.notna().all()  # seed 2: every stem plays in at least one of the two tracks
    assert sdr.loc["default"].mean() > sdr.loc["mixture"].mean()  # the model separates

    assert main(command) == 0  # everything is done: nothing separated, nothing scored
    printed = capsys.readouterr().out
    assert "2 already done, 0 planned" in printed and "4 already scored, 0 planned" in printed


def test_benchmark_refuses_bad_arguments(tmp_path, capsys):
    assert main(["benchmark", "--checkpoint", "no-equals-sign"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert main(["benchmark", "--checkpoint", f"x={tmp_path / 'missing.safetensors'}"]) == 2
    assert "--checkpoint x=" in capsys.readouterr().err
    assert main(["benchmark", "--checkpoint", "mixture=default"]) == 2
    assert "is taken" in capsys.readouterr().err
