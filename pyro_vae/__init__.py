"""pyro-vae: the Variational Autoencoder of Kingma & Welling (2014) as an
ordinary Pyro model and guide, with pluggable priors and likelihoods.

    import pyro_vae as pv
    data = pv.load_dataset("mnist")
    vae = pv.VAE(x_shape=(1, 28, 28), z_dim=50,
                 prior=pv.priors.StandardNormal(),
                 likelihood=pv.likelihoods.Bernoulli())
    history = pv.fit(vae, data, epochs=20, batch_size=128)
"""

__version__ = "0.1.0"

from . import likelihoods, nets, priors  # noqa: E402
from .checkpoint import CheckpointError  # noqa: E402
from .data import DataError, Dataset, Split, load_dataset, make_dataset  # noqa: E402
from .evaluate import active_units, compare_runs, evaluate_run  # noqa: E402
from .marginal import MarginalLikelihoodEstimate, elbo_per_point, log_marginal_likelihood, site_log_densities  # noqa: E402
from .runs import Run, load_run  # noqa: E402
from .semisupervised import fit_ssvae  # noqa: E402
from .ssvae import SSVAE  # noqa: E402
from .stacked import LatentFeatures, StackedSSVAE  # noqa: E402
from .train import TrainingDiverged, TrainingInterrupted, evaluate_elbo, fit  # noqa: E402
from .vae import VAE  # noqa: E402

__all__ = [
    "VAE",
    "SSVAE",
    "StackedSSVAE",
    "LatentFeatures",
    "fit_ssvae",
    "active_units",
    "compare_runs",
    "evaluate_run",
    "CheckpointError",
    "DataError",
    "Dataset",
    "Run",
    "Split",
    "TrainingDiverged",
    "TrainingInterrupted",
    "MarginalLikelihoodEstimate",
    "elbo_per_point",
    "log_marginal_likelihood",
    "evaluate_elbo",
    "fit",
    "likelihoods",
    "load_dataset",
    "load_run",
    "make_dataset",
    "nets",
    "priors",
    "site_log_densities",
]
