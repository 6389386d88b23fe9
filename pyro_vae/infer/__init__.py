"""Inference: per-site densities, log p(x) by importance sampling and by AIS, and the training objectives.

Importing this package registers the objectives: ``"trace"`` and
``"meanfield"`` (:mod:`.elbo`), ``"iwae"`` (:mod:`.iwae`) and
``"semi-supervised"`` (:mod:`.semisupervised`).
"""

from . import elbo, iwae, semisupervised  # noqa: F401 (registers the objectives)
from .ais import (
    BDMC,
    AISEstimate,
    BDMCEstimate,
    ais_log_marginal_likelihood,
    ais_log_marginal_likelihood_by_label,
    bdmc,
)
from .densities import SiteLogDensities, elbo_per_point, site_log_densities
from .importance import MarginalLikelihoodEstimate, log_marginal_likelihood
from .objective import OBJECTIVES, Objective, build_objective, evaluate_elbo, register_objective

__all__ = [
    "AISEstimate",
    "BDMC",
    "BDMCEstimate",
    "ais_log_marginal_likelihood",
    "ais_log_marginal_likelihood_by_label",
    "bdmc",
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
