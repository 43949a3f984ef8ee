"""metasep benchmark: checkpoints and the mixture baseline scored with museval on a synth catalog."""

from __future__ import annotations

import museval
import numpy as np
import pandas as pd
import pytest

from model import STEMS, MultiTasNet, TasNetConfig, save_checkpoint
from pipeline.audio import read_audio
from pipeline.cli import main


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    root = tmp_path_factory.mktemp("refs")
    assert (
        main(
            [
                "synth",
                str(root),
                "--tracks",
                "2",
                "--seconds",
                "4",
                "--seed",
                "5",
                "--split",
                "test",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    return root


def test_benchmark_scores_checkpoint_and_mixture_baseline(references, tmp_path, capsys):
    checkpoint = save_checkpoint(
        MultiTasNet(TasNetConfig(N=32, B=16, H=16, layers=2, stack=1, num_mels=16)),
        tmp_path / "tiny",
    )
    out = tmp_path / "scores"
    assert (
        main(
            ["benchmark", str(references), "--checkpoint", f"tiny={checkpoint}", "--out", str(out)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| tiny |" in printed and "| mixture |" in printed
    frames = pd.read_parquet(out / "frames.parquet")
    assert set(frames.method) == {"tiny", "mixture"} and set(frames.target) == set(STEMS)
    assert frames.track.nunique() == 2 and set(frames.frame) == {0, 1, 2, 3}
    # The mixture baseline equals museval run directly on the same files.
    track = sorted(p for p in (references / "test").iterdir())[0]
    refs = np.stack([read_audio(track / f"{s}.wav")[0].T for s in STEMS])
    mixture = read_audio(track / "mixture.wav")[0].T
    sdr, _, _, _ = museval.evaluate(refs, np.stack([mixture] * 4))
    ours = frames[(frames.method == "mixture") & (frames.track == track.name)]
    for index, stem in enumerate(STEMS):
        np.testing.assert_allclose(
            ours[ours.target == stem].sort_values("frame").SDR, sdr[index], rtol=1e-6
        )
    summary = pd.read_parquet(out / "summary.parquet")
    assert set(summary.columns) >= {"method", "target", "SDR_median", "SDR_mean", "tracks"}


def test_benchmark_rejects_bad_arguments(references, tmp_path, capsys):
    assert main(["benchmark", str(references), "--checkpoint", "no-equals-sign"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert main(["benchmark", str(tmp_path), "--checkpoint", "a=b"]) == 2
    assert "no track folders" in capsys.readouterr().err
