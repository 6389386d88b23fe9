"""Inference: per-site densities, the importance-sampled log p(x), and the training objectives.

Importing this package registers the objectives: ``"trace"`` and
``"meanfield"`` (:mod:`.elbo`), ``"iwae"`` (:mod:`.iwae`) and
``"semi-supervised"`` (:mod:`.semisupervised`).
"""

from . import elbo, iwae, semisupervised  # noqa: F401 (registers the objectives)
from .densities import SiteLogDensities, elbo_per_point, site_log_densities
from .importance import MarginalLikelihoodEstimate, log_marginal_likelihood
from .objective import OBJECTIVES, Objective, build_objective, evaluate_elbo, register_objective

__all__ = [
    "OBJECTIVES",
    "MarginalLikelihoodEstimate",
    "Objective",
    "SiteLogDensities",
    "build_objective",
    "elbo_per_point",
    "evaluate_elbo",
    "log_marginal_likelihood",
    "register_objective",
    "site_log_densities",
]
