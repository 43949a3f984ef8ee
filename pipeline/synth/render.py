"""Rendering MIDI with the FluidSynth command-line synthesizer and General MIDI SoundFonts.

Each track is rendered with one SoundFont of a list, picked from the track's seed, so that a set
has more than one timbre per instrument while a seed and the list still fix every sample.

FluidSynth renders faster than real time, offline and deterministically: with its output in
32-bit float there is neither dither nor clipping, so the same MIDI file always gives the same
samples. The synthesizer's reverb and chorus are optional (``effects``).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 44100
SYNTH_PACKAGE = "fluidsynth"
# The General MIDI SoundFonts used when none is given: each one whose Debian package is installed
# (the paths after the first are where Fedora and Arch put FluidR3).
DEFAULT_SOUNDFONTS: dict[str, tuple[Path, ...]] = {
    "fluid-soundfont-gm": (
        Path("/usr/share/sounds/sf2/FluidR3_GM.sf2"),
        Path("/usr/share/soundfonts/FluidR3_GM.sf2"),
        Path("/usr/share/soundfonts/default.sf2"),
    ),
    "timgm6mb-soundfont": (Path("/usr/share/sounds/sf2/TimGM6mb.sf2"),),
}
SOUNDFONT_STREAM = 5  # the seed's generator stream that picks the SoundFont (0-4: plan and stems)
GAIN = 0.5  # FluidSynth's master gain; float output cannot clip, the track is levelled later


class SynthError(RuntimeError):
    """The synthesizer or SoundFont is missing or unusable; the message says what to install."""


@dataclass(frozen=True)
class Synthesizer:
    """A FluidSynth executable and the SoundFonts it may use, rendering at 44.1 kHz stereo."""

    executable: str
    soundfonts: tuple[Path, ...]
    effects: bool = False

    def soundfont_for(self, seed: int) -> Path:
        """The SoundFont of the track of ``seed``: same seed and SoundFont list, same choice.

        It is drawn from a stream of its own, so the music of the track does not depend on it.
        """
        draw = np.random.default_rng([seed, SOUNDFONT_STREAM]).integers(len(self.soundfonts))
        return self.soundfonts[int(draw)]

    def render(self, midi: Path, samples: int, soundfont: Path) -> np.ndarray:
        """Render ``midi`` with ``soundfont`` into float32 (2, samples), cut or zero-padded."""
        raw = midi.with_suffix(".raw")
        switch = "1" if self.effects else "0"
        command = [
            self.executable, "-n", "-i", "-q",
            "-g", str(GAIN), "-r", str(SAMPLE_RATE), "-R", switch, "-C", switch,
            "-o", "synth.dynamic-sample-loading=1",
            "-T", "raw", "-O", "float", "-E", "little", "-F", str(raw),
            str(soundfont), str(midi),
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


def find_synthesizer(
    soundfonts: Sequence[Path] | None = None, effects: bool = False
) -> Synthesizer:
    """The FluidSynth on PATH with ``soundfonts`` (or every default one that is installed).

    The list is kept in the order given, without repeats. Raises SynthError naming the package
    to install when FluidSynth or every default SoundFont is missing, and when a file given is
    not a SoundFont.
    """
    executable = shutil.which("fluidsynth")
    packages = " ".join(DEFAULT_SOUNDFONTS)
    if executable is None:
        raise SynthError(
            "the FluidSynth synthesizer is not installed: install the Debian package "
            f"{SYNTH_PACKAGE} (apt-get install {SYNTH_PACKAGE} {packages})"
        )
    if not soundfonts:
        soundfonts = installed_soundfonts()
        if not soundfonts:
            looked = " or ".join(str(paths[0]) for paths in DEFAULT_SOUNDFONTS.values())
            raise SynthError(
                f"no General MIDI SoundFont at {looked}: install the Debian packages "
                f"{packages} (apt-get install {packages}) or pass --soundfont PATH"
            )
    for soundfont in soundfonts:
        _check_soundfont(soundfont)
    unique = dict.fromkeys(soundfont.resolve() for soundfont in soundfonts)
    return Synthesizer(executable, tuple(unique), effects)


def installed_soundfonts() -> list[Path]:
    """The first existing file of each default SoundFont package, in the table's order."""
    found = []
    for paths in DEFAULT_SOUNDFONTS.values():
        existing = [path for path in paths if path.is_file()]
        if existing:
            found.append(existing[0])
    return found


def _check_soundfont(path: Path) -> None:
    """A SoundFont 2 file is a RIFF file of form ``sfbk``; refuse anything else up front."""
    if not path.exists():
        raise SynthError(
            f"SoundFont {path} does not exist: pass an existing .sf2 file, or install the "
            f"Debian packages {' '.join(DEFAULT_SOUNDFONTS)} for the default ones"
        )
    if not path.is_file():
        raise SynthError(f"SoundFont {path} is not a file")
    try:
        with path.open("rb") as file:
            header = file.read(12)
    except OSError as error:
        raise SynthError(f"cannot read SoundFont {path}: {error.strerror}") from None
    if header[:4] != b"RIFF" or header[8:12] != b"sfbk":
        raise SynthError(f"{path} is not a SoundFont 2 (.sf2) file")
