"""Temporal averaging of the weights: what a run validates, keeps and returns is an average of its steps.

Adam's iterates keep moving around a minimum by about the learning rate.
Kingma & Ba (2015, *Adam*, section 7.2, "Temporal averaging") average them
with exponential weights, Polyak & Juditsky's (1992) averaging of stochastic
approximation with a moving window:

    theta_bar_1 = theta_1,    theta_bar_t = d_t theta_bar_{t-1} + (1 - d_t) theta_t

after every optimiser step t. At a fixed decay d_t = d the average spans
about 1 / (1 - d) steps (10,000 at 0.9999, 40 epochs of M2's 245 steps),
and a run shorter than a few spans would keep much of its first, untrained
weights (d^t of theta_1: half of it after 7,000 steps at 0.9999). So the
decay warms up as TensorFlow's ``ExponentialMovingAverage`` with
``num_updates`` does: d_t = min(d, t / (t + 9)), which spans
1 / (1 - d_t) = (t + 9) / 9 steps, about the last ninth of the steps so far,
until that reaches 1 / (1 - d) (after 90,000 steps at 0.9999). The
gradients are always taken at the iterates theta_t; the average only
watches. :class:`torch.optim.swa_utils.AveragedModel` holds it.

The engine (:func:`~pyro_vae.training.engine.fit`, ``ema_decay``) validates
the averaged weights, picks the best epoch by them, saves them as the
checkpoints' ``"model"`` (so that :func:`~pyro_vae.load_run`, the
evaluators and the figures use them) and keeps the iterates beside them for
an exact resume. What it does for M2 from pixels: docs/semi-supervised.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def warmed_up_decay(decay: float, step: int) -> float:
    """d_t = min(d, t / (t + 9)) at step t >= 1 (TensorFlow's ``(1 + n) / (10 + n)`` at its n = t - 1 updates)."""
    return min(decay, step / (step + 9))


class WeightAverage:
    """The exponential moving average of a module's weights over the optimiser's steps, its decay warmed up.

    Before the first :meth:`update` the average is the module's weights themselves.

    :param module: the module whose parameters are averaged (its buffers are copied as they are).
    :param decay: d in (0, 1): the largest weight of the previous average at a step.
    :param warm_up: False keeps d at every step, Kingma & Ba's form (what ``fit`` does not;
        ``benchmarks/m2_weight_average.py`` compares the two).
    """

    def __init__(self, module: nn.Module, decay: float, warm_up: bool = True):
        self.decay, self.warm_up = decay, warm_up
        self.averaged = AveragedModel(module, multi_avg_fn=self._average_in)

    @torch.no_grad()
    def _average_in(self, averages: list[torch.Tensor], weights: list[torch.Tensor], steps: torch.Tensor) -> None:
        """AveragedModel's update at the step after ``steps``: theta_bar = d_t theta_bar + (1 - d_t) theta."""
        decay = warmed_up_decay(self.decay, int(steps) + 1) if self.warm_up else self.decay
        torch._foreach_lerp_(averages, weights, 1.0 - decay)

    @property
    def steps(self) -> int:
        """How many steps the average holds."""
        return int(self.averaged.n_averaged)

    def update(self, module: nn.Module) -> None:
        """Take ``module``'s weights after an optimiser step into the average."""
        self.averaged.update_parameters(module)

    def state_of(self, module: nn.Module) -> dict:
        """``module``'s state dict with its parameters averaged (before the first step: ``module``'s own)."""
        source = self.averaged.module if self.steps else module
        return {name: tensor.detach().clone() for name, tensor in source.state_dict().items()}

    def load(self, averaged_state: dict, steps: int) -> None:
        """Restore an average saved as :meth:`state_of` after ``steps`` steps."""
        self.averaged.module.load_state_dict(averaged_state)
        self.averaged.n_averaged.fill_(steps)

    @contextlib.contextmanager
    def applied(self, module: nn.Module) -> Iterator[None]:
        """Within the block ``module`` holds the averaged weights; after it, its own, bit for bit.

        The values are copied into the module's own parameters, so that Pyro's ``pyro.module`` and
        any compiled program see the same tensors; the optimiser's state is not touched.
        """
        if not self.steps:
            yield
            return
        parameters = list(module.parameters())
        iterates = [parameter.detach().clone() for parameter in parameters]
        with torch.no_grad():
            for parameter, average in zip(parameters, self.averaged.module.parameters(), strict=True):
                parameter.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, iterate in zip(parameters, iterates, strict=True):
                    parameter.copy_(iterate)
