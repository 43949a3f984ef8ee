"""Listening-check picture of a synthetic track: the mixture's spectrogram with the notes of
``notes.parquet`` drawn over it, above the stems' levels.

    python tests/synth_listening.py OUT/index.parquet TRACK_NAME picture.png [DPI]

Pitched notes are lines at their fundamental frequency, drum hits ticks along the top. Sections
from the index are marked on both panels, with the stems that play in each, so one can see at a
glance that the notes sit on the sound and every stem sounds where the plan says and nowhere else.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import numpy as np
import pyarrow.parquet as pq
from matplotlib import mlab
from matplotlib.collections import LineCollection

from model import STEMS
from pipeline.audio import read_audio

matplotlib.use("Agg")
import matplotlib.pyplot as plt

FRAME_SECONDS = 0.05
COLOURS = {"drums": "tab:red", "bass": "tab:blue", "other": "tab:green", "vocals": "tab:purple"}


def stem_levels(audio: np.ndarray, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """RMS level in dBFS of consecutive 50 ms frames of (channels, samples) audio."""
    frame = round(FRAME_SECONDS * rate)
    count = audio.shape[1] // frame
    frames = audio[:, : count * frame].reshape(audio.shape[0], count, frame)
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=(0, 2)))
    return (np.arange(count) + 0.5) * FRAME_SECONDS, 20 * np.log10(np.maximum(rms, 1e-6))


def note_lines(notes: list[dict]) -> LineCollection:
    """Pitched notes as lines at their fundamental frequency, drum hits as ticks at the top."""
    segments, colours = [], []
    for note in notes:
        if note["drum"] is None:
            hertz = 440.0 * 2 ** ((note["pitch"] - 69) / 12)
            segments.append([(note["onset"], hertz), (note["offset"], hertz)])
        else:
            segments.append([(note["onset"], 5000), (note["onset"], 7500)])
        colours.append(COLOURS[note["stem"]])
    return LineCollection(segments, colors=colours, linewidths=1.2)


def plot_track(
    track_dir: Path, row: dict, picture: Path, notes: list[dict] | None = None, dpi: int = 80
) -> Path:
    """Write ``picture``: spectrogram of ``track_dir``/mixture.wav with ``notes`` (rows of
    notes.parquet) over it, the stem levels below, and the sections on both."""
    mixture, rate = read_audio(track_dir / "mixture.wav")
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(14, 8), sharex=True)
    power, freqs, times = mlab.specgram(mixture.mean(axis=0), NFFT=4096, Fs=rate, noverlap=3072)
    keep = (freqs >= 30) & (freqs <= 8000)
    top.pcolormesh(
        times, freqs[keep], 10 * np.log10(power[keep] + 1e-13), cmap="gray_r", vmin=-85, vmax=-25
    )
    top.set_yscale("log")
    top.set_ylim(30, 8000)
    top.set_ylabel("Hz")
    top.add_collection(note_lines(notes or []))
    top.set_title(
        f"{row['name']}: {row['style']}, {row['tempo']:.0f} bpm {row['meter']}, {row['key']}; "
        f"other={row['other_roles']} {row['other_programs']}, vocals={row['vocals_programs']}, "
        f"{row['soundfont']}"
    )
    for stem in STEMS:
        audio, _ = read_audio(track_dir / f"{stem}.wav")
        times, levels = stem_levels(audio, rate)
        bottom.plot(times, levels, label=stem, color=COLOURS[stem], linewidth=1)
    bottom.set_ylim(-90, 0)
    bottom.set_ylabel("RMS dBFS (50 ms)")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="lower right", ncol=4)
    for number, section in enumerate(row["sections"]):
        for axis in (top, bottom):
            axis.axvline(section["start"], color="black", linewidth=1)
        if number % 2:
            bottom.axvspan(section["start"], section["end"], color="0.92", zorder=0)
        playing = "+".join(stem[0].upper() for stem in section["stems"])
        bottom.text(
            section["start"] + 0.1, -6, f"{section['name']}\n{playing}", va="top", fontsize=9
        )
    figure.tight_layout()
    figure.savefig(picture, dpi=dpi)
    plt.close(figure)
    return picture


def main(index_path: str, name: str, picture: str, dpi: str = "80") -> None:
    index = Path(index_path)
    rows = [row for row in pq.read_table(index).to_pylist() if row["name"] == name]
    if not rows:
        raise SystemExit(f"{name} is not in {index}")
    notes = pq.read_table(
        index.parent / "notes.parquet",
        filters=[("split", "==", rows[0]["split"]), ("name", "==", name)],
    ).to_pylist()
    plot_track(index.parent / rows[0]["path"], rows[0], Path(picture), notes, int(dpi))


if __name__ == "__main__":
    main(*sys.argv[1:])
