"""Likelihoods p(x | z): from the decoder's output to a Pyro distribution over x.

A likelihood is a small :class:`torch.nn.Module` in the pattern of
``DistributionNet.make_dist`` in ``pyro.contrib.cevae``:

* ``params_per_dim`` says how many decoder outputs it needs per data
  dimension; the decoder returns a tensor of shape
  ``(*batch, params_per_dim, *x_shape)``;
* calling it on that tensor returns a distribution with batch shape
  ``batch`` and event shape ``x_shape``;
* ``support`` declares where x may lie, and :meth:`Likelihood.check_data`
  refuses data outside it with a message that names the fix.

To add a likelihood, subclass :class:`Likelihood`, set ``name``,
``params_per_dim`` and ``support``, implement :meth:`forward`, and list the
class in :data:`LIKELIHOODS`.
"""

from __future__ import annotations

import math
from typing import ClassVar

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import constraints

from .data import DataError


class Likelihood(nn.Module):
    """Base class: ``likelihood(decoder_output)`` returns p(x | z) with event shape ``x_shape``."""

    name: ClassVar[str]
    params_per_dim: ClassVar[int] = 1
    support: ClassVar[constraints.Constraint] = constraints.real

    def setup(self, x_shape: tuple[int, ...]) -> None:
        """Called once by the VAE; builds whatever depends on the data shape."""
        self.x_shape = tuple(x_shape)

    def forward(self, params: torch.Tensor) -> dist.TorchDistribution:
        raise NotImplementedError

    def _param(self, params: torch.Tensor, i: int) -> torch.Tensor:
        """The i-th decoder output per data dimension, shape ``(*batch, *x_shape)``."""
        return params.select(-len(self.x_shape) - 1, i)

    def check_data(self, x: torch.Tensor) -> None:
        """Raise :class:`~pyro_vae.data.DataError` if x lies outside this likelihood's support."""
        inside = self.support.check(x)
        if not bool(inside.all()):
            outside = x[~inside]
            raise DataError(
                f"The {self.name} likelihood needs data in {self.support}, but {outside.numel()} values lie "
                f"outside it (e.g. {float(outside[0]):g}). {self.fix_hint()}"
            )

    def fix_hint(self) -> str:
        return "Transform the data into the likelihood's support or choose another likelihood."

    def config(self) -> dict:
        """The short name and arguments that rebuild this likelihood (see :func:`build_likelihood`)."""
        return {"name": self.name}


class Bernoulli(Likelihood):
    """p(x | z) = prod_d Bernoulli(x_d; sigmoid(logit_d(z))), for binary data only."""

    name = "bernoulli"
    support = constraints.boolean

    def forward(self, params):
        return dist.Bernoulli(logits=self._param(params, 0)).to_event(len(self.x_shape))

    def fix_hint(self):
        return (
            "A Bernoulli is a density only for binary data: binarise grayscale pixels "
            "(--binarize dynamic or fixed; load_dataset(..., binarize='dynamic')), or use a likelihood "
            "for continuous data such as gaussian (the continuous Bernoulli is planned)."
        )


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class Gaussian(Likelihood):
    """p(x | z) = prod_d N(x_d; mu_d(z), sigma_d^2).

    ``sigma="fixed"`` keeps sigma at ``init_sigma``; ``"shared"`` learns one
    sigma for all dimensions; ``"per-dim"`` learns one per data dimension.
    Learned sigmas are ``min_sigma + softplus(raw)``, so they never fall to
    the bound where the density would degenerate.
    """

    name = "gaussian"
    SIGMA_MODES = ("fixed", "shared", "per-dim")

    def __init__(self, sigma: str = "fixed", init_sigma: float = 0.1, min_sigma: float = 1e-3):
        super().__init__()
        if sigma not in self.SIGMA_MODES:
            raise ValueError(f"Unknown sigma mode {sigma!r}; choose one of {self.SIGMA_MODES}.")
        if not init_sigma > min_sigma > 0:
            raise ValueError(f"Need init_sigma > min_sigma > 0; got init_sigma={init_sigma}, min_sigma={min_sigma}.")
        self.sigma_mode, self.init_sigma, self.min_sigma = sigma, init_sigma, min_sigma

    def setup(self, x_shape):
        super().setup(x_shape)
        shape = {"fixed": (), "shared": (), "per-dim": self.x_shape}[self.sigma_mode]
        raw = torch.full(shape, _inverse_softplus(self.init_sigma - self.min_sigma))
        if self.sigma_mode == "fixed":
            self.register_buffer("raw_sigma", raw)
        else:
            self.raw_sigma = nn.Parameter(raw)

    @property
    def sigma(self) -> torch.Tensor:
        return self.min_sigma + F.softplus(self.raw_sigma)

    def forward(self, params):
        loc = self._param(params, 0)
        return dist.Normal(loc, self.sigma.expand(loc.shape)).to_event(len(self.x_shape))

    def config(self):
        return {"name": self.name, "sigma": self.sigma_mode, "init_sigma": self.init_sigma, "min_sigma": self.min_sigma}


LIKELIHOODS: dict[str, type[Likelihood]] = {cls.name: cls for cls in (Bernoulli, Gaussian)}


def build_likelihood(config: dict | str) -> Likelihood:
    """A likelihood from its short name, or from the dict that :meth:`Likelihood.config` wrote."""
    config = {"name": config} if isinstance(config, str) else dict(config)
    name = config.pop("name")
    if name not in LIKELIHOODS:
        raise ValueError(f"Unknown likelihood {name!r}; choose one of {sorted(LIKELIHOODS)}.")
    return LIKELIHOODS[name](**config)
