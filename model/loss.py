"""The paper's training objective.

Per stage: the negative SI-SNR of each stem averaged over the examples where that stem is not
silent, minus a weighted SI-SNR of the encoder/decoder reconstruction of the mix, plus a weighted
cosine *dissimilarity* between different instruments' true latents, minus a weighted cosine
*similarity* between the same instrument's latents across examples of the batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from model.config import TasNetConfig

# Pairs of different instruments compared by the dissimilarity term.
_PAIRS_A = (0, 0, 0, 1, 1, 2)
_PAIRS_B = (1, 2, 3, 2, 3, 3)


def si_snr(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Scale-invariant SNR in dB over the last axis; the shape loses that axis."""
    target_power = target.pow(2).sum(-1, keepdim=True) + 1e-8
    scale = (target * estimate).sum(-1, keepdim=True) / target_power
    projection = scale * target
    residual = estimate - projection
    signal = projection.pow(2).sum(-1).clamp(min=1e-8)
    noise = residual.pow(2).sum(-1).clamp(min=1e-8)
    return 10 * (torch.log10(signal) - torch.log10(noise))


def stem_si_snr(
    estimate: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """SI-SNR per stem (4,) of (B, 4, 1, T) tensors, averaged over examples where ``mask`` is 1."""
    snr = si_snr(estimate, target)
    if mask is None:
        return snr.mean(dim=(0, -1))
    return (snr * mask).sum(dim=(0, -1)) / mask.sum(dim=(0, -1)).clamp(min=1e-8)


def _dissimilarity(latents: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of |latents| between different instruments (to be minimised).

    ``latents`` is (4, B, T', N) with silent stems zeroed, ``mask`` is (B, 4).
    """
    a, b = latents[list(_PAIRS_A)], latents[list(_PAIRS_B)]
    count = (mask[:, _PAIRS_A] * mask[:, _PAIRS_B]).sum() + 1e-8
    similarity = F.cosine_similarity(a.abs(), b.abs(), dim=-1)
    return (similarity.sum(dim=(0, 1)) / count).mean()


def _similarity(latents: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of each instrument's latents with the next example's (maximised)."""
    count = (mask * torch.roll(mask, 1, dims=0)).sum().clamp(min=1e-8)
    similarity = F.cosine_similarity(latents, torch.roll(latents, 1, dims=1), dim=-1)
    return (similarity.sum(dim=(0, 1)) / count).mean()


def separation_loss(
    stems: torch.Tensor,
    sources: torch.Tensor,
    mask: torch.Tensor,
    source_latents: torch.Tensor | None,
    reconstruction: torch.Tensor | None,
    mix: torch.Tensor,
    config: TasNetConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One stage's loss and its stats: SI-SNR x4, reconstruction SI-SNR, dissimilarity, similarity.

    ``stems``/``sources``: (B, 4, 1, T); ``mask``: (B, 4, 1), 1 for non-silent stems;
    ``source_latents``: (B, 4, T', N) encoder output of the true stems; ``reconstruction``:
    decoder output of the mixture latent, (B, 1, T).
    """
    stats = torch.zeros(7, device=stems.device)
    snr = stem_si_snr(stems, sources, mask)
    stats[:4] = snr
    loss = -snr.sum()
    if reconstruction is not None:
        reconstruction_snr = stem_si_snr(reconstruction, mix).mean()
        stats[4] = reconstruction_snr
        loss = loss - config.reconstruction_loss_weight * reconstruction_snr
    if source_latents is not None:
        flat_mask = mask.squeeze(-1)
        latents = (source_latents * flat_mask[..., None, None]).transpose(0, 1)
        if config.dissimilarity_loss_weight > 0:
            dissimilarity = _dissimilarity(latents, flat_mask)
            stats[5] = dissimilarity
            loss = loss + config.dissimilarity_loss_weight * dissimilarity
        if config.similarity_loss_weight > 0:
            similarity = _similarity(latents, flat_mask)
            stats[6] = similarity
            loss = loss - config.similarity_loss_weight * similarity
    return loss, stats
