"""Schedules over training: the KL weight, and Adam's learning rate.

KL weight: linear warm-up (Bowman et al. 2016) to a final beta (Higgins et
al. 2017). The training objective with KL weight w is
E_q[log p(x|z)] - w * KL(q(z|x) || p(z)); w reaches the latent sites
through ``poutine.scale`` in the model and guide.

Learning rate, by name (``fit(lr_schedule=...)``):

- ``"constant"``: the base rate throughout;
- ``"iwae"``: Burda, Grosse & Salakhutdinov's (*Importance Weighted
  Autoencoders*, ICLR 2016, section 5) schedule for their Table 1: stage
  i = 0, ..., 7 runs 3^i epochs at ``lr * 10^(-i / 7)``, 3,280 epochs in
  all; later epochs keep the last stage's rate. A run of fewer epochs
  follows its first stages (364 epochs end stage 5, 1,093 stage 6).
"""

from __future__ import annotations


def kl_weight_schedule(step: int, *, beta: float, warmup_steps: int) -> float:
    """Linear KL warm-up from ``beta / warmup_steps`` to ``beta``; constant ``beta`` without warm-up."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, (step + 1) / warmup_steps)


#: Stages of Burda et al.'s schedule: 3^i epochs each, i = 0, ..., 7.
IWAE_STAGES = 8


def iwae_stage(epoch: int) -> int:
    """The stage i of (1-based) ``epoch`` in Burda et al.'s schedule: epochs (3^i - 1)/2 + 1 to (3^(i+1) - 1)/2."""
    stage, last_epoch = 0, 1
    while epoch > last_epoch and stage < IWAE_STAGES - 1:
        stage += 1
        last_epoch += 3**stage
    return stage


def constant_learning_rate(epoch: int, lr: float) -> float:
    return lr


def iwae_learning_rate(epoch: int, lr: float) -> float:
    """``lr * 10^(-i / 7)`` in stage i of Burda et al.'s schedule."""
    return lr * 10 ** (-iwae_stage(epoch) / 7)


#: The learning rate of a (1-based) epoch given the base rate, by schedule name.
LR_SCHEDULES = {"constant": constant_learning_rate, "iwae": iwae_learning_rate}
