"""Temporal averaging of the weights: what a run validates, keeps and returns is an average of its steps.

Adam's iterates keep moving around a minimum by about the learning rate.
Kingma & Ba (2015, *Adam*, section 7.2, "Temporal averaging") average them
with exponential weights, Polyak & Juditsky's (1992) averaging of stochastic
approximation with a moving window:

    theta_bar_1 = theta_1,    theta_bar_t = d theta_bar_{t-1} + (1 - d) theta_t

after every optimiser step t, at decay ``d``: the average spans about
1 / (1 - d) steps (10,000 at 0.9999, 40 epochs of M2's 245 steps). The
gradients are always taken at the iterates theta_t; the average only
watches. :class:`torch.optim.swa_utils.AveragedModel` with
:func:`~torch.optim.swa_utils.get_ema_multi_avg_fn` holds it.

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
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightAverage:
    """The exponential moving average of a module's weights over the optimiser's steps.

    Before the first :meth:`update` the average is the module's weights themselves.

    :param module: the module whose parameters are averaged (its buffers are copied as they are).
    :param decay: d in (0, 1): the weight of the previous average at every step.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.averaged = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(decay))

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
