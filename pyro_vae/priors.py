"""Priors p(z) over the latent code.

A prior is a small :class:`torch.nn.Module` that, called with no arguments,
hands back a Pyro distribution over z with event shape ``(z_dim,)``. Its
learnable parts are ordinary parameters, so the VAE registers them with
``pyro.module`` and every Pyro ELBO trains them. The VAE calls
:meth:`Prior.setup` once, telling the prior the latent size (and, for priors
that need them, the encoder and the data shape).

To add a prior, subclass :class:`Prior`, set ``name``, implement
:meth:`forward`, and list the class in :data:`PRIORS`.
"""

from __future__ import annotations

from typing import ClassVar

import pyro.distributions as dist
import torch
from torch import nn


class Prior(nn.Module):
    """Base class: ``prior()`` returns a distribution with event shape ``(z_dim,)``."""

    name: ClassVar[str]

    def setup(self, z_dim: int, *, x_shape: tuple[int, ...], encoder: nn.Module) -> None:
        """Called once by the VAE before use; builds whatever depends on the sizes."""
        self.z_dim = z_dim

    def forward(self) -> dist.TorchDistribution:
        raise NotImplementedError

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z), summed over the latent dimensions."""
        return self().log_prob(z)

    def sample(self, num_samples: int) -> torch.Tensor:
        """``num_samples`` draws of z, shape ``(num_samples, z_dim)``."""
        return self().sample((num_samples,))

    def config(self) -> dict:
        """The short name and arguments that rebuild this prior (see :func:`build_prior`)."""
        return {"name": self.name}


class StandardNormal(Prior):
    """p(z) = N(0, I), the prior of Kingma & Welling (2014)."""

    name = "standard-normal"

    def setup(self, z_dim, *, x_shape, encoder):
        super().setup(z_dim, x_shape=x_shape, encoder=encoder)
        self.register_buffer("loc", torch.zeros(z_dim))
        self.register_buffer("scale", torch.ones(z_dim))

    def forward(self):
        return dist.Normal(self.loc, self.scale).to_event(1)


PRIORS: dict[str, type[Prior]] = {cls.name: cls for cls in (StandardNormal,)}


def build_prior(config: dict | str) -> Prior:
    """A prior from its short name, or from the dict that :meth:`Prior.config` wrote."""
    config = {"name": config} if isinstance(config, str) else dict(config)
    name = config.pop("name")
    if name not in PRIORS:
        raise ValueError(f"Unknown prior {name!r}; choose one of {sorted(PRIORS)}.")
    return PRIORS[name](**config)
