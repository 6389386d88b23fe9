"""Gradient estimators that reach the guide only through its reparameterised draws.

For a guide q_phi(z | x) with reparameterised draws z = g(eps; phi), the
gradient of log w = log p_theta(x, z) - log q_phi(z | x) with respect to
phi has two parts: the path derivative, through z, and the score term
d/dphi log q_phi(z | x) at fixed z, whose expectation under q is zero.

* **STL**, "sticking the landing" (Roeder, Wu & Duvenaud, *Sticking the
  Landing: Simple, Lower-Variance Gradient Estimators for Variational
  Inference*, NeurIPS 2017), drops the score term from the ELBO's gradient.
  The estimator stays unbiased, and its variance vanishes as q approaches
  the exact posterior, where log w is constant in z.
* **DReG**, doubly reparameterised gradients (Tucker, Lawson, Gu &
  Maddison, *Doubly Reparameterized Gradient Estimators for Monte Carlo
  Objectives*, ICLR 2019), is the unbiased estimator of the IWAE bound's
  gradient in phi that has no score term. Reparameterising the score term a
  second time gives

      d/dphi L_K = E[ sum_k wt_k^2 (d log w_k / d z_k) (d z_k / d phi) ],

  with wt_k = w_k / sum_j w_j the normalised weights, in place of IWAE's
  sum_k wt_k d log w_k / d phi. The gradient in theta is IWAE's,
  sum_k wt_k d log w_k / d theta. Where the prior reads the guide's
  parameters (the VampPrior's pseudo-inputs pass through the encoder),
  log p's direct dependence on them gets IWAE's weights wt_k, and only the
  path through z_k the squared ones. The signal-to-noise ratio of IWAE's phi
  gradient falls as 1 / sqrt(K) (Rainforth et al., *Tighter Variational
  Bounds are Not Necessarily Better*, ICML 2018); DReG's does not.

Both rest on :func:`~pyro_vae.infer.densities.site_log_densities` with
``hold_fixed``: log q is evaluated with the guide's parameters detached.
DReG puts its second factor wt_k on the draws with a gradient hook (the
single-backward form of Tucker et al.'s estimator): the hooks sit on the
draws as the densities read them, so the path from z1 through the guide's
network to z2 is not weighted twice.

Neither estimator changes the objective's value, only its gradient: the
loss is the negative ELBO, or IWAE bound, as the standard estimator's is.
"""

from __future__ import annotations

import torch

from ..checks import whole_number
from .densities import DATA_PLATE, SiteLogDensities, log_mean_exp, negligible_shares, site_log_densities

#: The gradient estimators, by the objective they apply to.
GRADIENTS = {"trace": ("standard", "stl"), "iwae": ("standard", "dreg")}


class _PathDerivativeEstimator:
    """The per-site densities with log q at the guide's parameters held fixed, for the estimators below.

    :param module: the module that holds the guide's parameters (the whole model will do).
    """

    estimator: str

    def __init__(self, module: torch.nn.Module, num_particles: int, max_plate_nesting: int = 1):
        num_particles = whole_number(num_particles, f"{self.estimator}'s num_particles")
        self.module, self.num_particles, self.max_plate_nesting = module, num_particles, max_plate_nesting

    def densities(self, model, guide, *args, **kwargs) -> SiteLogDensities:
        densities = site_log_densities(
            model,
            guide,
            *args,
            num_particles=self.num_particles,
            max_plate_nesting=self.max_plate_nesting,
            hold_fixed=self.module,
            **kwargs,
        )
        if not densities.reparameterized:
            raise ValueError(f"{self.estimator} needs a guide whose every site is reparameterisable (has rsample).")
        return densities


class STL_ELBO(_PathDerivativeEstimator):  # noqa: N801 (named like Pyro's ELBOs)
    """The ELBO with the gradient of Roeder et al.: the score term of the guide's parameters dropped.

    ``-sum_n mean_k [log p(x_n | z_k) + kl_weight (log p(z_k) - log q(z_k | x_n))]``
    with unscaled densities; ``kl_weight`` weighs the latent sites as
    ``poutine.scale`` does in Pyro's ELBOs.
    """

    estimator = "STL"

    def __init__(self, module: torch.nn.Module, num_particles: int = 1, max_plate_nesting: int = 1):
        super().__init__(module, num_particles, max_plate_nesting)

    def differentiable_loss(self, model, guide, *args, kl_weight=1.0, **kwargs) -> torch.Tensor:
        densities = self.densities(model, guide, *args, **kwargs)
        elbo = densities.reconstruction - kl_weight * densities.kl
        return -elbo.mean(0).sum()


class DReG_IWAE_ELBO(_PathDerivativeEstimator):  # noqa: N801 (named like Pyro's ELBOs)
    """The IWAE bound of Burda et al. with the doubly reparameterised gradient of Tucker et al.

    The value is -sum_n L_K(x_n), as :class:`~pyro_vae.infer.iwae.IWAE_ELBO`'s;
    the gradient in the model's parameters is the same, in the guide's it is DReG's.
    """

    estimator = "DReG"

    def __init__(self, module: torch.nn.Module, num_particles: int = 5, max_plate_nesting: int = 1):
        super().__init__(module, num_particles, max_plate_nesting)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        densities = self.densities(model, guide, *args, **kwargs)
        log_weights = densities.log_weights
        weights = log_weights.softmax(0).detach().masked_fill(negligible_shares(log_weights), 0.0)
        for value, site in densities.draws.values():
            if value.requires_grad:
                value.register_hook(_scale_by(weights, site, -self.max_plate_nesting - 1))
        surrogate = (weights * log_weights).sum(0)
        bound = log_mean_exp(log_weights.detach())
        return -(surrogate - surrogate.detach() + bound).sum()


def _scale_by(weights: torch.Tensor, site: dict, particle_dim: int):
    """A gradient hook that multiplies the gradient of ``site``'s draw by ``weights`` (K, N), broadcast to it."""
    event_dim = site["fn"].event_dim
    batch_dims = site["value"].dim() - event_dim
    data_dim = next(frame.dim for frame in site["cond_indep_stack"] if frame.name == DATA_PLATE)
    shape = [1] * batch_dims + [1] * event_dim
    shape[batch_dims + particle_dim], shape[batch_dims + data_dim] = weights.shape
    scale = weights.reshape(shape)
    return lambda gradient: gradient * scale
