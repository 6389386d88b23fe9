"""The importance-weighted bound of Burda, Grosse & Salakhutdinov, *Importance
Weighted Autoencoders* (2015), as a training objective:

    L_K(x) = E_{z_1..z_K ~ q(z|x)} [ log (1/K) sum_k p(x, z_k) / q(z_k | x) ],

per data point, summed over the batch. L_1 is the ELBO; L_K rises with K
towards log p(x). Gradients flow through reparameterised draws of z.

Why not Pyro's ``RenyiELBO(alpha=0)``: it sums the log weights over the data
plate before the logsumexp over particles, so on a batch of N points it
computes the bound of the batch as one joint observation,
log (1/K) sum_k prod_n w_nk, which is looser than sum_n L_K(x_n) and is not
the objective Burda et al. train. On a single data point the two agree, which
the tests check.

``gradient="dreg"`` keeps the bound and gives the guide the doubly
reparameterised gradient of Tucker et al. (:mod:`.path_derivatives`), whose
signal-to-noise ratio does not fall with K as the standard one's does.
"""

from __future__ import annotations

import torch

from ..checks import whole_number
from .densities import (
    check_reparameterized_guide,
    evaluating,
    log_mean_exp,
    negligible_shares,
    site_log_densities,
)
from .importance import log_marginal_likelihood
from .objective import ParticleObjective, register_objective
from .path_derivatives import GRADIENTS, DReG_IWAE_ELBO


class IWAE_ELBO:  # noqa: N801 (named like Pyro's ELBOs)
    """The per-point importance-weighted bound with ``num_particles`` = K vectorised samples.

    Offers ``differentiable_loss`` and ``loss`` like Pyro's ELBO classes. The
    densities are unscaled, so ``kl_weight`` and plate scaling do not apply.
    """

    def __init__(self, num_particles: int = 5, max_plate_nesting: int = 1):
        self.num_particles = whole_number(num_particles, "The IWAE bound's num_particles")
        self.max_plate_nesting = max_plate_nesting

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """-sum_n L_K(x_n), differentiable through the reparameterised samples."""
        densities = site_log_densities(
            model, guide, *args, num_particles=self.num_particles, max_plate_nesting=self.max_plate_nesting, **kwargs
        )
        if not densities.reparameterized:
            raise ValueError("IWAE training needs a guide whose every site is reparameterisable (has rsample).")
        log_weights = densities.log_weights
        log_weights = torch.where(negligible_shares(log_weights), log_weights.detach(), log_weights)
        bound = log_mean_exp(log_weights)
        return -bound.sum()

    @torch.no_grad()
    def loss(self, model, guide, *args, **kwargs) -> float:
        return float(self.differentiable_loss(model, guide, *args, **kwargs))


@register_objective
class IWAEBound(ParticleObjective):
    """L_K of Burda et al. as a training objective, with K = ``num_particles`` vectorised samples per point.

    :param gradient: ``"standard"`` (through the reparameterised draws) or
        ``"dreg"`` (Tucker et al.'s doubly reparameterised gradient for the guide).
    """

    name = "iwae"
    supports_kl_weight = False  # the bound has no separate KL term to weigh
    validation_metric = "val_iwae"  # the best checkpoint is the one of the best bound, not of the ELBO

    def __init__(self, num_particles: int = 5, gradient: str = "standard"):
        if gradient not in GRADIENTS["iwae"]:
            raise ValueError(
                f"The IWAE bound takes the gradient estimators {GRADIENTS['iwae']}, not {gradient!r}"
                + (" (STL is biased for K > 1, Tucker et al. 2019; use 'dreg')." if gradient == "stl" else ".")
            )
        self.bound = IWAE_ELBO(num_particles=num_particles)
        self.num_particles, self.gradient = self.bound.num_particles, gradient

    def setup(self, model, data, *, batch_size):
        check_reparameterized_guide(model.guide, data.train.x[:2], "IWAE training")

    def loss(self, model, x, *, kl_weight):
        if self.gradient == "dreg":
            return DReG_IWAE_ELBO(model, self.num_particles).differentiable_loss(model.model, model.guide, x)
        return self.bound.differentiable_loss(model.model, model.guide, x)

    def validate(self, model, split, prefix: str) -> dict:
        """The ELBO and its terms, and the bound L_K itself (``iwae``, with ``iwae_se``), per point.

        L_K is estimated with the same K draws for every epoch (a fixed seed), so that epochs differ by
        their weights alone, and with unscaled densities, as the importance sampler estimates log p(x).
        """
        metrics = super().validate(model, split, prefix)
        with evaluating(model):
            k = self.num_particles
            bound = log_marginal_likelihood(
                model.model, model.guide, split.x, num_samples=k, batch_size=200, max_samples_per_pass=200 * k, seed=0
            )
        return {**metrics, f"{prefix}iwae": bound.mean, f"{prefix}iwae_se": bound.stderr}
