"""The least squares of a track: the coefficients that make its stems sum to its mixture, and
what the same sums say of the stems (their levels, the residual, how alike two of them are).

The engine gathers, per channel, the Gram matrix of the unscaled stems, their products with the
mixture and the mixture's energy as the windows come out; everything here is computed from those
sums, with no second pass over the audio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from model import STEMS


@dataclass(frozen=True)
class Balance:
    """What a track's least-squares sums say of its scaled stems against its mixture, over all
    its channels (levels in dB; a silent mixture gives -inf levels and no similarity)."""

    mixture_dbfs: float  # the mixture's mean power, against full scale
    stems_db: dict[str, float]  # each stem's power against the mixture's
    residual_db: float  # the power of mixture minus the sum of the stems, against the mixture's
    similar: tuple[str, str, float]  # the two most alike stems and their correlation (-1..1)


@dataclass(frozen=True)
class Solution:
    """The least squares of a track: the stems' coefficients and the balance they give."""

    coefficients: np.ndarray  # (channels, 4)
    balance: Balance


def balance(
    gram: np.ndarray,
    target: np.ndarray,
    power: np.ndarray,
    coefficients: np.ndarray,
    samples: int,
) -> Balance:
    """The balance of a track from its sums per channel: the Gram matrix of the unscaled stems
    (channels, 4, 4), their products with the mixture (channels, 4), the mixture's energy
    (channels,) and the coefficients (channels, 4); ``samples`` counts all channels' samples.
    No pass over the audio: scaled by x, stem k has energy x_k² G_kk, the pair (k, l) the inner
    product x_k x_l G_kl, and the residual |m|² - 2 x·t + xᵀ G x."""
    scaled = coefficients[:, :, None] * gram * coefficients[:, None, :]  # (channels, 4, 4)
    products = scaled.sum(0)
    energies = np.diagonal(products)
    mixture = float(power.sum())
    explained = float((coefficients * target).sum())
    residual = max(0.0, mixture - 2 * explained + float(products.sum()))
    pairs = [
        (float(products[k, j] / np.sqrt(energies[k] * energies[j])), k, j)
        for k in range(len(STEMS))
        for j in range(k + 1, len(STEMS))
        if energies[k] > 0 and energies[j] > 0
    ]
    correlation, first, second = max(pairs, default=(0.0, 0, 1))
    return Balance(
        mixture_dbfs=_db(mixture / max(samples, 1)),
        stems_db={
            stem: _db(energy / mixture) if mixture else -math.inf
            for stem, energy in zip(STEMS, energies, strict=True)
        },
        residual_db=_db(residual / mixture) if mixture else -math.inf,
        similar=(STEMS[first], STEMS[second], correlation),
    )


def _db(ratio: float) -> float:
    return 10 * math.log10(ratio) if ratio > 0 else -math.inf


def least_squares(gram: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per channel, the stem weights x minimising |mix - sum_k x_k stem_k|², from the normal
    equations (gram = A Aᵀ, target = A mix); minimum-norm where stems are degenerate."""
    return np.stack(
        [np.linalg.lstsq(g, t, rcond=None)[0] for g, t in zip(gram, target, strict=True)]
    )
