"""The evidence lower bound as a training objective, estimated by Pyro's own ELBOs.

    ELBO(x) = E_q(z|x)[log p(x | z)] - KL(q(z | x) || p(z)) <= log p(x)

(Kingma & Welling, *Auto-Encoding Variational Bayes*, 2014), with
reparameterised draws z = loc(x) + scale(x) * eps. ``"trace"`` estimates
both terms by Monte Carlo (``Trace_ELBO``); ``"meanfield"`` takes the KL in
closed form where one exists (``TraceMeanField_ELBO``). With several
particles the draws are vectorised. The KL weight of warm-up and beta
reaches the latent sites through ``poutine.scale`` in the model and guide,
so the annealed objective is E_q[log p(x|z)] - kl_weight * KL.

``gradient="stl"`` keeps the estimate and changes its gradient to the path
derivative of Roeder et al. (:mod:`.path_derivatives`): the score term of the
guide's parameters is dropped, which lowers the variance as q nears the
posterior. It applies to ``"trace"``; the closed-form KL of ``"meanfield"``
carries its score term inside it, so there it is refused.
"""

from __future__ import annotations

from typing import ClassVar

from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from ..checks import whole_number
from .densities import check_reparameterized_guide
from .objective import ParticleObjective, register_objective
from .path_derivatives import GRADIENTS, STL_ELBO


@register_objective
class ELBO(ParticleObjective):
    """The ELBO of Pyro's ``Trace_ELBO``, with ``num_particles`` vectorised draws per point.

    :param gradient: ``"standard"`` (Pyro's estimator) or ``"stl"`` (Roeder et al.'s path derivative).
    """

    name = "trace"
    pyro_elbo: ClassVar[type] = Trace_ELBO
    gradients: ClassVar[tuple[str, ...]] = GRADIENTS["trace"]

    def __init__(self, num_particles: int = 1, gradient: str = "standard"):
        num_particles = whole_number(num_particles, "The ELBO's num_particles")
        if gradient not in self.gradients:
            raise ValueError(
                f"The {self.name!r} ELBO takes the gradient estimators {self.gradients}, not {gradient!r}"
                + (" (STL needs the Monte Carlo KL of the 'trace' ELBO)." if gradient == "stl" else ".")
            )
        self.num_particles, self.gradient = int(num_particles), gradient  # a NumPy integer made Python's
        self.elbo = self.pyro_elbo(
            num_particles=self.num_particles, vectorize_particles=self.num_particles > 1, max_plate_nesting=1
        )

    def setup(self, model, data, *, batch_size):
        if self.gradient == "stl":
            check_reparameterized_guide(model.guide, data.train.x[:2], "The STL gradient")

    def loss(self, model, x, *, kl_weight):
        if self.gradient == "stl":
            return STL_ELBO(model, self.num_particles).differentiable_loss(
                model.model, model.guide, x, kl_weight=kl_weight
            )
        return self.elbo.differentiable_loss(model.model, model.guide, x, kl_weight=kl_weight)


@register_objective
class MeanFieldELBO(ELBO):
    """The ELBO of Pyro's ``TraceMeanField_ELBO``: the KL in closed form where one exists."""

    name = "meanfield"
    pyro_elbo = TraceMeanField_ELBO
    gradients = ("standard",)

    def setup(self, model, data, *, batch_size):
        super().setup(model, data, batch_size=batch_size)
        if not model.mean_field_guide:
            raise ValueError(
                f"The 'meanfield' ELBO takes KL(q(z | x) || p(z)) site by site, which needs a guide whose latent "
                f"sites are independent given x; the guide of this {type(model).__name__} is not. Use its default "
                f"objective, {model.default_objective!r}."
            )
