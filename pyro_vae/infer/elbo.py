"""The evidence lower bound as a training objective, estimated by Pyro's own ELBOs.

    ELBO(x) = E_q(z|x)[log p(x | z)] - KL(q(z | x) || p(z)) <= log p(x)

(Kingma & Welling, *Auto-Encoding Variational Bayes*, 2014), with
reparameterised draws z = loc(x) + scale(x) * eps. ``"trace"`` estimates
both terms by Monte Carlo (``Trace_ELBO``); ``"meanfield"`` takes the KL in
closed form where one exists (``TraceMeanField_ELBO``). With several
particles the draws are vectorised. The KL weight of warm-up and beta
reaches the latent sites through ``poutine.scale`` in the model and guide,
so the annealed objective is E_q[log p(x|z)] - kl_weight * KL.
"""

from __future__ import annotations

from typing import ClassVar

from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from .objective import Objective, register_objective


@register_objective
class ELBO(Objective):
    """The ELBO of Pyro's ``Trace_ELBO``, with ``num_particles`` vectorised draws per point."""

    name = "trace"
    pyro_elbo: ClassVar[type] = Trace_ELBO

    def __init__(self, num_particles: int = 1):
        if int(num_particles) < 1:
            raise ValueError(f"The ELBO needs num_particles >= 1; got {num_particles}.")
        self.num_particles = int(num_particles)
        self.elbo = self.pyro_elbo(
            num_particles=self.num_particles, vectorize_particles=self.num_particles > 1, max_plate_nesting=1
        )

    def loss(self, model, x, *, kl_weight):
        return self.elbo.differentiable_loss(model.model, model.guide, x, kl_weight=kl_weight)

    def config(self):
        return {"name": self.name, "num_particles": self.num_particles}


@register_objective
class MeanFieldELBO(ELBO):
    """The ELBO of Pyro's ``TraceMeanField_ELBO``: the KL in closed form where one exists."""

    name = "meanfield"
    pyro_elbo = TraceMeanField_ELBO
