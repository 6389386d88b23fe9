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
  follows its first stages (364 epochs end stage 5, 1,093 stage 6);
- ``"cosine"``: Loshchilov & Hutter's cosine annealing (*SGDR: Stochastic
  Gradient Descent with Warm Restarts*, ICLR 2017) without restarts, over
  the run's epochs E: epoch t runs at ``lr * (1 + cos(pi (t - 1) / E)) / 2``,
  from ``lr`` at the first epoch towards 0 after the last (the rates of
  ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=E)`` stepped once an
  epoch). Its rates depend on E, so a run trained with it cannot be
  extended to more epochs (:data:`LENGTH_DEPENDENT_SCHEDULES`);
- ``"step"``: a step decay: the base rate, then ``lr / 10`` for the last
  ``E // 10`` of the run's E epochs (``torch.optim.lr_scheduler.MultiStepLR``
  with the one milestone ``E - E // 10`` and ``gamma=0.1``; a run of fewer
  than 10 epochs keeps the base rate); M2's default, measured in
  benchmarks/RESULTS.md ("A tenth of the run at a tenth of the rate"). Like
  the cosine, its rates depend on E.

Every schedule is a function of the (1-based) epoch, the base rate and the
run's epochs, so a resumed run recomputes its rates exactly.
"""

from __future__ import annotations

import math


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


def constant_learning_rate(epoch: int, lr: float, epochs: int) -> float:
    return lr


def iwae_learning_rate(epoch: int, lr: float, epochs: int) -> float:
    """``lr * 10^(-i / 7)`` in stage i of Burda et al.'s schedule (whatever the run's length)."""
    return lr * 10 ** (-iwae_stage(epoch) / 7)


def cosine_learning_rate(epoch: int, lr: float, epochs: int) -> float:
    """``lr * (1 + cos(pi (epoch - 1) / epochs)) / 2``: cosine annealing over the run's ``epochs``."""
    return lr * (1 + math.cos(math.pi * (epoch - 1) / epochs)) / 2


def step_learning_rate(epoch: int, lr: float, epochs: int) -> float:
    """``lr`` up to epoch ``epochs - epochs // 10``, then ``lr / 10``: a step decay for the run's last tenth."""
    return lr if epoch <= epochs - epochs // 10 else lr / 10


#: The learning rate of a (1-based) epoch given the base rate and the run's epochs, by schedule name.
LR_SCHEDULES = {
    "constant": constant_learning_rate,
    "iwae": iwae_learning_rate,
    "cosine": cosine_learning_rate,
    "step": step_learning_rate,
}

#: Schedules whose rates depend on the run's epochs: a run trained with one keeps its epoch target.
LENGTH_DEPENDENT_SCHEDULES = frozenset({"cosine", "step"})


def length_conflict(schedule: str, run_epochs: int, epochs: int) -> str | None:
    """Why a run of ``run_epochs`` under ``schedule`` cannot go on as a run of ``epochs`` (None where it can)."""
    if schedule in LENGTH_DEPENDENT_SCHEDULES and run_epochs != epochs:
        return (
            f"follows the {schedule} learning-rate schedule over {run_epochs} epochs, whose rates depend on that number"
        )
    return None
