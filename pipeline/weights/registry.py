"""The named weights metasep knows: what each name is, where its file comes from, what it must
hold and how well it separates.

A name is what ``--checkpoint`` and ``METASEP_CHECKPOINT`` take besides a file path. ``default``
is shipped inside the package (``model/weights/``); every other entry is downloaded once into the
cache (:mod:`pipeline.weights.store`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model import STEMS, TasNetConfig

# The authors' demo links to their trained model on Dropbox; ``dl=1`` makes Dropbox send the
# file itself instead of its preview page.
RELEASE_URL = "https://www.dropbox.com/s/zw6zgt3edd88v87/best_model.pt?dl=1"


@dataclass(frozen=True)
class WeightsEntry:
    """One named set of weights.

    ``url`` is ``None`` for weights shipped in the package. ``filename`` is the file's original
    name, under which a mirror (``METASEP_WEIGHTS_MIRROR``) holds it. ``config`` is the
    architecture the file must have; ``size`` its length in bytes when known (a download of
    another length is refused). ``scores`` are published SDRs in dB per stem, from ``source``.
    """

    name: str
    description: str
    config: TasNetConfig
    url: str | None = None
    filename: str | None = None
    size: int | None = None
    scores: dict[str, float] = field(default_factory=dict)
    source: str = ""
    licence: str = ""

    @property
    def shipped(self) -> bool:
        return self.url is None

    def __post_init__(self) -> None:
        unknown = set(self.scores) - set(STEMS)
        if unknown:
            raise ValueError(f"{self.name}: scores for unknown stems {sorted(unknown)}")


REGISTRY: dict[str, WeightsEntry] = {
    "default": WeightsEntry(
        name="default",
        description="metasep's own small model, trained on synthesised General-MIDI songs; "
        "proves the pipeline, not meant for real recordings",
        config=TasNetConfig(N=64, B=32, H=32, layers=4, stack=2, num_mels=32),
        scores={"drums": 2.39, "bass": 4.51, "other": 2.86, "vocals": 1.19},
        source="museval SDR on 12 held-out metasep synth songs (model/weights/README.md)",
        licence="MIT, as metasep; trained only on data metasep renders itself",
    ),
    "release": WeightsEntry(
        name="release",
        description="the authors' trained best_model.pt, the paper's model (45.5 M parameters)",
        config=TasNetConfig(),
        url=RELEASE_URL,
        filename="best_model.pt",
        scores={"drums": 5.91, "bass": 5.58, "other": 4.19, "vocals": 6.40},
        source="SDR on the MUSDB18 test set, Samuel, Ganeshan & Naradowsky, 'Meta-learning "
        "extractors for music source separation', ICASSP 2020",
        licence="published by the authors with their MIT-licensed code "
        "(github.com/pfnet-research/meta-tasnet), without a licence statement of its own; "
        "trained on MUSDB18, whose audio is licensed for non-commercial research",
    ),
}


class UnknownWeightsError(KeyError):
    """A name that is not in the registry."""


def weights_entry(name: str) -> WeightsEntry:
    """The registry entry of ``name``; :class:`UnknownWeightsError` naming the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise UnknownWeightsError(f"no weights named {name!r} (known: {known})") from None
