"""Synthetic four-stem music rendered with FluidSynth, written in the MUSDB18-HQ layout.

``plan`` draws a track's form, harmony and instruments from a seed; ``drums``, ``harmony`` and
``vocals`` compose the notes; ``score`` writes them as MIDI and lists them as a note table;
``render`` runs FluidSynth; and ``dataset`` levels, writes and indexes the tracks and their
notes (``metasep synth``).
"""

from pipeline.synth.dataset import SPLITS, DatasetSummary, build_track, write_dataset
from pipeline.synth.plan import TrackPlan, plan_track
from pipeline.synth.render import SynthError, Synthesizer, find_synthesizer

__all__ = [
    "SPLITS",
    "DatasetSummary",
    "SynthError",
    "Synthesizer",
    "TrackPlan",
    "build_track",
    "find_synthesizer",
    "plan_track",
    "write_dataset",
]
