"""pyro-vae: the Variational Autoencoder of Kingma & Welling (2014) as an
ordinary Pyro model and guide, with pluggable priors and likelihoods::

    import pyro_vae as pv
    data = pv.load_dataset("mnist")
    vae = pv.VAE(x_shape=(1, 28, 28), z_dim=50,
                 prior=pv.priors.StandardNormal(),
                 likelihood=pv.likelihoods.Bernoulli())
    history = pv.fit(vae, data, epochs=20, batch_size=128)

The package in layers, each importing only those before it:
:mod:`~pyro_vae.data` and :mod:`~pyro_vae.registry`;
:mod:`~pyro_vae.components` (priors, likelihoods, networks);
:mod:`~pyro_vae.models`; :mod:`~pyro_vae.accel` (compiled kernels and replay);
:mod:`~pyro_vae.infer` (densities, importance sampling, objectives);
:mod:`~pyro_vae.runs` (the run directory); :mod:`~pyro_vae.training` (the engine);
and the interface: :mod:`~pyro_vae.evaluate`, :mod:`~pyro_vae.plots`,
:mod:`~pyro_vae.workflow`, :mod:`~pyro_vae.cli`.
"""

from ._version import __version__
from .components import likelihoods, nets, priors
from .data import DataError, Dataset, Split, load_dataset, make_dataset
from .evaluate import active_units, active_units_per_layer, classify_generatively, compare_runs, evaluate_run
from .infer import (
    OBJECTIVES,
    AISEstimate,
    BDMCEstimate,
    MarginalLikelihoodEstimate,
    Objective,
    ais_log_marginal_likelihood,
    ais_log_marginal_likelihood_by_label,
    bdmc,
    elbo_per_point,
    evaluate_elbo,
    log_marginal_likelihood,
    register_objective,
    site_log_densities,
)
from .infer.elbo import ELBO, MeanFieldELBO
from .infer.iwae import IWAEBound
from .infer.semisupervised import SemiSupervisedELBO
from .models import MODELS, SSVAE, VAE, HierarchicalVAE, LatentFeatures, Model, StackedSSVAE, register_model
from .registry import load_plugins
from .runs import CheckpointError, Run, RunDirectory, RunLocked, load_run
from .training import LightningProcesses, TrainingDiverged, TrainingInterrupted, fit
from .workflow import resume_run, train_run

__all__ = [
    "AISEstimate",
    "BDMCEstimate",
    "ais_log_marginal_likelihood",
    "ais_log_marginal_likelihood_by_label",
    "bdmc",
    "load_plugins",
    "ELBO",
    "MODELS",
    "OBJECTIVES",
    "HierarchicalVAE",
    "SSVAE",
    "VAE",
    "CheckpointError",
    "DataError",
    "Dataset",
    "IWAEBound",
    "LatentFeatures",
    "LightningProcesses",
    "MarginalLikelihoodEstimate",
    "MeanFieldELBO",
    "Model",
    "Objective",
    "Run",
    "RunDirectory",
    "RunLocked",
    "SemiSupervisedELBO",
    "Split",
    "StackedSSVAE",
    "TrainingDiverged",
    "TrainingInterrupted",
    "__version__",
    "active_units",
    "active_units_per_layer",
    "classify_generatively",
    "compare_runs",
    "elbo_per_point",
    "evaluate_elbo",
    "evaluate_run",
    "fit",
    "likelihoods",
    "load_dataset",
    "load_run",
    "log_marginal_likelihood",
    "make_dataset",
    "nets",
    "priors",
    "register_model",
    "register_objective",
    "resume_run",
    "site_log_densities",
    "train_run",
]
