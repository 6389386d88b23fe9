"""The interface of a training objective, and the registry of objectives.

An objective turns a model and a batch of training data into a
differentiable loss: the negative of an estimate of the objective (an ELBO,
a tighter bound, the semi-supervised J) summed over the points the loss
stands for. The training engine (:mod:`pyro_vae.training.engine`) owns the
loop, the optimiser, checkpoints and every guarantee; the objective owns
only what is particular to it:

* :meth:`Objective.setup`: checks and preparation before training (the
  semi-supervised objective draws its labelled points);
* :meth:`Objective.start`: what a fresh run does once before its first
  epoch, and a resumed run never repeats (the semi-supervised objective
  trains its classifier on the labels);
* :meth:`Objective.training_points`: the indices an epoch runs over;
* :meth:`Objective.batch`: the tensors of one step, taken from the data
  (the points at the step's indices, dynamically binarised; a labelled
  batch), and :meth:`Objective.points`, how many points its loss sums over;
* :meth:`Objective.loss`: the step's loss, a function of those tensors and
  the model alone, so that the engine can record it once and replay it
  compiled (:mod:`pyro_vae.accel.training_step`);
* :meth:`Objective.validate`: the metrics of a split after every epoch;
* :meth:`Objective.state_dict`: whatever it keeps between steps (a
  cursor, an order), saved in every checkpoint so that a resumed run
  continues exactly.

Adding an objective is one module: subclass :class:`Objective`, give it a
``name`` and decorate it with ``@register_objective``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..data import Dataset, Split
from ..registry import Registry
from .densities import elbo_per_point, evaluating


class Objective(ABC):
    """Base class: a training objective for the engine."""

    name: ClassVar[str]
    #: Whether the KL weight of warm-up and beta (``poutine.scale`` on the latent sites) applies.
    supports_kl_weight: ClassVar[bool] = True
    #: Arguments added to :meth:`config` after runs were written without them, with the values those runs had.
    legacy_config: ClassVar[dict] = {}
    #: Whether :meth:`loss` estimates the loss of the whole training set (its plates sized to the set, as M2's
    #: are), where the default sums over the batch's points. Over several processes the gradients of summed
    #: losses are summed, and estimates of the whole set's are weighed by each process's share of the batch.
    loss_scaled_to_data: ClassVar[bool] = False
    #: The history column whose maximum picks the best checkpoint, where the objective has its own (one of
    #: :meth:`validate`'s, prefixed ``val_``); None leaves it to the model's ``validation_metric``.
    validation_metric: ClassVar[str | None] = None

    def setup(self, model, data: Dataset, *, batch_size: int) -> None:  # noqa: B027 (a hook; most need nothing)
        """Check that the objective fits ``model`` and ``data`` and prepare for training."""

    def start(self, model, data: Dataset, *, progress: bool = False) -> None:  # noqa: B027 (a hook)
        """Prepare a fresh run's ``model`` before its first epoch (not called on resume)."""

    def training_points(self, data: Dataset) -> torch.Tensor:
        """Indices of the training points one epoch runs over (by default all of them)."""
        return torch.arange(len(data.train), device=data.train.x.device)

    def batch(self, data: Dataset, indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The tensors one step's loss reads: by default the points at ``indices``, binarised as the data says."""
        return (data.batch(indices),)

    def points(self, batch: tuple[torch.Tensor, ...]) -> float:
        """How many points the loss of ``batch`` sums over (by default the length of its first tensor)."""
        return len(batch[0])

    @abstractmethod
    def loss(self, model, *batch: torch.Tensor, kl_weight: float | torch.Tensor) -> torch.Tensor:
        """The differentiable loss of one step's ``batch`` (from :meth:`batch`).

        A function of ``batch``, ``kl_weight`` and the model alone: whatever
        else it reads (Python state that changes between steps) belongs in
        :meth:`batch`. A compiled step passes ``kl_weight`` as a 0-d tensor.
        """

    def validate(self, model, split: Split, prefix: str) -> dict:
        """Metrics of ``split`` with names starting ``prefix``: by default the ELBO and its terms."""
        return evaluate_elbo(model, split.x, prefix=prefix)

    def state_dict(self) -> dict:
        """What the objective keeps between steps, as tensors and plain data."""
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 (a hook; most keep no state)
        """Restore :meth:`state_dict`."""

    def config(self) -> dict:
        """The short name and arguments that rebuild this objective (see :data:`OBJECTIVES`)."""
        return {"name": self.name}


class ParticleObjective(Objective):
    """An objective estimated from ``num_particles`` draws per point, with a choice of ``gradient`` estimator
    (the ELBO's and the IWAE bound's); subclasses set both attributes."""

    legacy_config = {"gradient": "standard"}  # config() leaves the standard gradient out, as older runs did
    num_particles: int
    gradient: str

    def config(self) -> dict:
        extra = {} if self.gradient == "standard" else {"gradient": self.gradient}  # as older runs wrote it
        return {"name": self.name, "num_particles": self.num_particles, **extra}


def evaluate_elbo(model, x: torch.Tensor, *, num_particles: int = 1, batch_size: int = 1000, prefix: str = "") -> dict:
    """Mean ELBO per data point (with standard error), reconstruction and KL terms, with unscaled densities."""
    with evaluating(model):
        estimate = elbo_per_point(model.model, model.guide, x, num_particles=num_particles, batch_size=batch_size)
    return estimate.summary(prefix)


OBJECTIVES: Registry[type[Objective]] = Registry("objective", Objective)
#: Make an objective known by its ``name`` to configs and the command line (usable as a decorator).
register_objective = OBJECTIVES.register
#: An objective from its short name, or from the dict that :meth:`Objective.config` wrote.
build_objective = OBJECTIVES.build


def completed_objective_config(config: dict) -> dict:
    """An objective's config with the arguments that older runs did not record (its ``legacy_config``) filled in."""
    legacy = OBJECTIVES[config["name"]].legacy_config if config.get("name") in OBJECTIVES else {}
    return {**legacy, **config}
