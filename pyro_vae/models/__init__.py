"""Models: ordinary Pyro models and guides behind one interface (:class:`~.base.Model`), found by type name."""

from .base import MODELS, Model, build_model, register_model
from .hierarchical import HierarchicalVAE
from .ssvae import SSVAE, SemiSupervisedModel
from .stacked import LatentFeatures, StackedSSVAE
from .vae import VAE

__all__ = [
    "MODELS",
    "HierarchicalVAE",
    "SSVAE",
    "VAE",
    "LatentFeatures",
    "Model",
    "SemiSupervisedModel",
    "StackedSSVAE",
    "build_model",
    "register_model",
]
