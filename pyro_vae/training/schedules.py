"""The KL weight over training: linear warm-up (Bowman et al. 2016) to a final beta (Higgins et al. 2017).

The training objective with KL weight w is E_q[log p(x|z)] - w * KL(q(z|x) || p(z));
w reaches the latent sites through ``poutine.scale`` in the model and guide.
"""

from __future__ import annotations


def kl_weight_schedule(step: int, *, beta: float, warmup_steps: int) -> float:
    """Linear KL warm-up from ``beta / warmup_steps`` to ``beta``; constant ``beta`` without warm-up."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, (step + 1) / warmup_steps)
