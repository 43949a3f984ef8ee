"""Rendering MIDI with the FluidSynth command-line synthesizer and a General MIDI SoundFont.

FluidSynth renders faster than real time, offline and deterministically: with its output in
32-bit float there is neither dither nor clipping, so the same MIDI file always gives the same
samples. The synthesizer's reverb and chorus are optional (``effects``).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 44100
SYNTH_PACKAGE = "fluidsynth"
SOUNDFONT_PACKAGE = "fluid-soundfont-gm"
# Where Debian/Ubuntu (fluid-soundfont-gm), Fedora and Arch put the FluidR3 General MIDI SoundFont.
DEFAULT_SOUNDFONTS = (
    Path("/usr/share/sounds/sf2/FluidR3_GM.sf2"),
    Path("/usr/share/soundfonts/FluidR3_GM.sf2"),
    Path("/usr/share/soundfonts/default.sf2"),
)
GAIN = 0.5  # FluidSynth's master gain; float output cannot clip, the track is levelled later


class SynthError(RuntimeError):
    """The synthesizer or SoundFont is missing or unusable; the message says what to install."""


@dataclass(frozen=True)
class Synthesizer:
    """A FluidSynth executable with a SoundFont, rendering at 44.1 kHz stereo."""

    executable: str
    soundfont: Path
    effects: bool = False

    def render(self, midi: Path, samples: int) -> np.ndarray:
        """Render ``midi`` into float32 (2, samples), cut or zero-padded to exactly ``samples``."""
        raw = midi.with_suffix(".raw")
        switch = "1" if self.effects else "0"
        command = [
            self.executable, "-n", "-i", "-q",
            "-g", str(GAIN), "-r", str(SAMPLE_RATE), "-R", switch, "-C", switch,
            "-o", "synth.dynamic-sample-loading=1",
            "-T", "raw", "-O", "float", "-E", "little", "-F", str(raw),
            str(self.soundfont), str(midi),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not raw.is_file():
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise SynthError(
                f"fluidsynth failed on {midi.name} (exit {result.returncode})"
                + (f": {detail[-1]}" if detail else "")
            )
        frames = np.fromfile(raw, dtype="<f4")
        raw.unlink()
        audio = frames[: frames.size - frames.size % 2].reshape(-1, 2).T[:, :samples]
        if audio.shape[1] < samples:
            audio = np.pad(audio, ((0, 0), (0, samples - audio.shape[1])))
        if not np.isfinite(audio).all():
            raise SynthError(f"fluidsynth produced non-finite samples for {midi.name}")
        return np.ascontiguousarray(audio, dtype=np.float32)


def find_synthesizer(soundfont: Path | None = None, effects: bool = False) -> Synthesizer:
    """The FluidSynth on PATH with ``soundfont`` (or the first default one that exists).

    Raises SynthError naming the package to install when either is missing, and when the file
    given is not a SoundFont.
    """
    executable = shutil.which("fluidsynth")
    if executable is None:
        raise SynthError(
            "the FluidSynth synthesizer is not installed: install the Debian package "
            f"{SYNTH_PACKAGE} (apt-get install {SYNTH_PACKAGE} {SOUNDFONT_PACKAGE})"
        )
    if soundfont is None:
        found = [path for path in DEFAULT_SOUNDFONTS if path.is_file()]
        if not found:
            raise SynthError(
                f"no General MIDI SoundFont at {DEFAULT_SOUNDFONTS[0]}: install the Debian package "
                f"{SOUNDFONT_PACKAGE} (apt-get install {SOUNDFONT_PACKAGE}) or pass --soundfont PATH"
            )
        soundfont = found[0]
    elif not soundfont.exists():
        raise SynthError(
            f"SoundFont {soundfont} does not exist: pass an existing .sf2 file, or install the "
            f"Debian package {SOUNDFONT_PACKAGE} for {DEFAULT_SOUNDFONTS[0]}"
        )
    elif not soundfont.is_file():
        raise SynthError(f"SoundFont {soundfont} is not a file")
    _check_soundfont(soundfont)
    return Synthesizer(executable, soundfont.resolve(), effects)


def _check_soundfont(path: Path) -> None:
    """A SoundFont 2 file is a RIFF file of form ``sfbk``; refuse anything else up front."""
    try:
        with path.open("rb") as file:
            header = file.read(12)
    except OSError as error:
        raise SynthError(f"cannot read SoundFont {path}: {error.strerror}") from None
    if header[:4] != b"RIFF" or header[8:12] != b"sfbk":
        raise SynthError(f"{path} is not a SoundFont 2 (.sf2) file")
