"""The paper's optimiser and schedule: Ranger (RAdam + Lookahead) with SGDR cosine restarts.

RAdam is PyTorch's own (``torch.optim.RAdam`` with decoupled weight decay, which is the release's
update: ``p -= lr * weight_decay * p``); Lookahead is the small addition on top: every ``k`` steps
the slow weights move ``alpha`` of the way to the fast ones and the fast weights restart there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class Ranger(torch.optim.RAdam):
    """RAdam + Lookahead with the release's defaults (k=6, alpha=0.5, betas (0.95, 0.999))."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.95, 0.999),
        eps: float = 1e-5,
        weight_decay: float = 0.0,
        k: int = 6,
        alpha: float = 0.5,
    ) -> None:
        if k < 1 or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"lookahead needs k >= 1 and 0 <= alpha <= 1 (got {k}, {alpha})")
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=True,
        )
        for group in self.param_groups:
            group.setdefault("lookahead_k", k)
            group.setdefault("lookahead_alpha", alpha)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        # Slow weights start at the weights before the first update. They join the state after
        # RAdam's step, which initialises a parameter's state only while it is empty.
        initial = {
            p: p.detach().clone()
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None and "slow_buffer" not in self.state[p]
        }
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if p in initial:
                    state["slow_buffer"] = initial[p]
                if p.grad is None or int(state["step"]) % group["lookahead_k"]:
                    continue
                slow = state["slow_buffer"]
                slow.add_(p - slow, alpha=group["lookahead_alpha"])
                p.copy_(slow)
        return loss


def sgdr_learning_rate(step: int, base: float, period: int, decay: float) -> float:
    """Cosine annealing with warm restarts every ``period`` steps, the peak times ``decay`` each
    restart (SGDR; the release uses period 200k and decay 0.85)."""
    restarts, phase = divmod(step / period, 1.0)
    return 0.5 * base * decay**restarts * (math.cos(math.pi * phase) + 1)
