"""A VAE with several stochastic layers, the model of Burda, Grosse &
Salakhutdinov, *Importance Weighted Autoencoders* (ICLR 2016, section 5),
as an ordinary Pyro model and guide.

Generative model (``HierarchicalVAE.model``), for L layers, in the plate "data"::

    z_L ~ p(z_L)                                  site "zL", the pluggable prior
    z_l ~ N(mu_l(z_{l+1}), diag sigma_l(z_{l+1})^2)   site "zl", l = L-1, ..., 1
    x   ~ p(x | z_1) = likelihood(decoder(z_1))   site "x"

Inference network (``HierarchicalVAE.guide``), bottom-up::

    z_1 ~ q(z_1 | x)       = N(loc_1(x), diag scale_1(x)^2)
    z_l ~ q(z_l | z_{l-1}) = N(loc_l(z_{l-1}), diag scale_l(z_{l-1})^2)

Each conditional is an MLP. Burda et al.'s MNIST model has two layers:
z_1 of 100 units with deterministic layers of 200-200 between x and z_1,
and z_2 of 50 units with 100-100 between z_1 and z_2, tanh throughout:
``HierarchicalVAE((1, 28, 28), z_dims=(100, 50), hidden=((200, 200), (100, 100)))``,
the defaults. Its ELBO is

    E_q[log p(x | z_1) + sum_{l<L} log p(z_l | z_{l+1}) + log p(z_L)
        - log q(z_1 | x) - sum_{l>1} log q(z_l | z_{l-1})],

which Pyro's ``Trace_ELBO`` estimates from the two programs, as the IWAE
bound and the importance sampler do from their per-site densities; the KL
weight of warm-up scales every latent site.

``z_dim`` is the total latent dimension, sum_l dim z_l, and
:meth:`latent_means` puts the layers' E_q[z_l | x] side by side in that
order, for the active-unit count per layer (``latent_sizes``). The top layer's prior is
any of :mod:`pyro_vae.components.priors`; a VampPrior reaches z_L from its
pseudo-inputs through the guide's means, q(z_L | loc_{L-1}(... loc_1(u))).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch import nn

from ..checks import is_whole_number
from ..components.likelihoods import Likelihood, as_likelihood, build_likelihood
from ..components.nets import MLPDecoder, MLPEncoder, activation_class
from ..components.priors import Prior, as_prior, build_prior
from .base import (
    Model,
    check_points,
    data_plate,
    likelihood_config,
    prior_config,
    register_model,
    start_decoder_output,
)

_instance_ids = itertools.count()
#: Ancestral draws per point with which :meth:`HierarchicalVAE.latent_means` averages a layer's location.
LATENT_MEAN_DRAWS = 100


class MeanPath(nn.Module):
    """x -> q(z_L | loc_{L-1}): the bottom-up networks applied to means, the encoder a VampPrior needs.

    Holds the networks by reference, as the VampPrior holds its encoder: the model owns and saves them.
    """

    def __init__(self, encoders: nn.ModuleList):
        super().__init__()
        self._encoders = [encoders]

    def forward(self, x):
        *lower, top = self._encoders[0]
        h = x
        for encoder in lower:
            h = encoder(h)[0]
        return top(h)


@register_model
class HierarchicalVAE(Model):
    """A VAE with stochastic layers z_1, ..., z_L between x and the prior (Burda et al. 2016).

    :param x_shape: shape of one data point, e.g. ``(1, 28, 28)``.
    :param z_dims: the sizes of z_1, ..., z_L, from the data side.
    :param hidden: one tuple of hidden sizes per layer, from the data side: the deterministic layers
        between x and z_1, then between z_{l-1} and z_l; p's networks mirror q's.
    :param prior: the :class:`~pyro_vae.components.priors.Prior` of z_L, its short name or config dict
        (default standard normal).
    :param likelihood: p(x | z_1), a :class:`~pyro_vae.components.likelihoods.Likelihood`, its short name or config dict
        (default Bernoulli).
    :param activation: of every hidden layer (default tanh, as Burda et al.).
    :param name: prefix of the parameters in Pyro's param store (default unique per instance).
    """

    name = "hierarchical"
    mean_field_guide = False  # q(z_2 | z_1) depends on z_1
    figures = ("learning_curves", "latent_space", "reconstructions", "samples")

    def __init__(
        self,
        x_shape: Sequence[int],
        z_dims: Sequence[int] = (100, 50),
        hidden: Sequence[Sequence[int]] = ((200, 200), (100, 100)),
        prior: Prior | str | dict | None = None,
        likelihood: Likelihood | str | dict | None = None,
        *,
        activation: str = "tanh",
        name: str | None = None,
    ):
        super().__init__()
        try:
            layers, blocks = tuple(z_dims), tuple(tuple(block) for block in hidden)  # NumPy arrays and lists too
        except TypeError:  # a size where sizes belong
            layers, blocks = (), ()
        sizes = [*layers, *(size for block in blocks for size in block)]
        if len(layers) < 2 or len(blocks) != len(layers) or not all(is_whole_number(n) and n >= 1 for n in sizes):
            raise ValueError(
                f"A hierarchical VAE needs two or more layer sizes and one tuple of hidden sizes per layer, whole "
                f"numbers >= 1, e.g. z_dims=(100, 50), hidden=((200, 200), (100, 100)); got z_dims={z_dims!r} and "
                f"hidden={hidden!r}. For one stochastic layer use pv.VAE."
            )
        self.x_shape, self.z_dims = tuple(x_shape), tuple(int(d) for d in layers)
        self.hidden = tuple(tuple(int(h) for h in block) for block in blocks)
        self.activation, self.z_dim = activation, sum(self.z_dims)
        act = activation_class(activation)
        self.likelihood = as_likelihood(likelihood)
        self.likelihood.setup(self.x_shape)
        inputs = [self.x_shape, *((d,) for d in self.z_dims[:-1])]
        #: q(z_1 | x), q(z_2 | z_1), ...
        self.encoders = nn.ModuleList(
            MLPEncoder(shape, d, block, activation=act)
            for shape, d, block in zip(inputs, self.z_dims, self.hidden, strict=True)
        )
        #: p(z_1 | z_2), ..., p(z_{L-1} | z_L): Gaussian MLPs with the mirrored hidden sizes.
        self.conditionals = nn.ModuleList(
            MLPEncoder((above,), below, tuple(reversed(block)), activation=act)
            for below, above, block in zip(self.z_dims[:-1], self.z_dims[1:], self.hidden[1:], strict=True)
        )
        self.decoder = MLPDecoder(
            self.z_dims[0], self.x_shape, self.hidden[0], self.likelihood.params_per_dim, activation=act
        )
        self.prior = as_prior(prior)
        self.prior.setup(self.z_dims[-1], x_shape=self.x_shape, encoder=MeanPath(self.encoders))
        self.prior.owned = self.likelihood.owned = True  # built: another model may not set them up again
        self.pyro_name = name or f"hvae{next(_instance_ids)}"

    @property
    def sites(self) -> tuple[str, ...]:
        """The latent sites, "z1" (next to x) to "zL" (under the prior)."""
        return tuple(f"z{layer}" for layer in range(1, len(self.z_dims) + 1))

    @property
    def latent_sizes(self) -> tuple[int, ...]:
        return self.z_dims

    # ----------------------------------------------------------------- Pyro
    def model(self, x=None, *, kl_weight: float = 1.0, num_data: int | None = None, batch_size: int | None = None):
        """p(z_L) prod_l p(z_l | z_{l+1}) p(x | z_1) over a batch; with ``x=None`` it draws ``batch_size`` points."""
        for part in ("decoder", "conditionals", "prior", "likelihood"):
            pyro.module(f"{self.pyro_name}.{part}", getattr(self, part))
        n = x.shape[0] if x is not None else (batch_size or 1)
        device = x.device if x is not None else next(self.decoder.parameters()).device
        with data_plate(n, num_data, device):
            with poutine.scale(scale=kl_weight):
                z = pyro.sample(self.sites[-1], self.prior())
                for site, conditional in zip(reversed(self.sites[:-1]), reversed(self.conditionals), strict=True):
                    z = pyro.sample(site, dist.Normal(*conditional(z)).to_event(1))
            return pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    def guide(self, x=None, *, kl_weight: float = 1.0, num_data: int | None = None, batch_size: int | None = None):
        """q(z_1 | x) prod_l q(z_l | z_{l-1}) over a batch."""
        if x is None:
            raise ValueError("The guide q(z | x) needs data x.")
        pyro.module(f"{self.pyro_name}.encoders", self.encoders)
        with data_plate(x.shape[0], num_data, x.device):
            with poutine.scale(scale=kl_weight):
                h = x
                for site, encoder in zip(self.sites, self.encoders, strict=True):
                    h = pyro.sample(site, dist.Normal(*encoder(h)).to_event(1))
        return h

    # ------------------------------------------------------------ utilities
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of every layer side by side, each layer's network applied to the mean of the layer below."""
        locs, scales, h = [], [], x
        for encoder in self.encoders:
            loc, scale = encoder(h)
            locs.append(loc)
            scales.append(scale)
            h = loc
        return torch.cat(locs, -1), torch.cat(scales, -1)

    @torch.no_grad()
    def latent_means(self, x: torch.Tensor, batch_size: int = 1000, num_draws: int = LATENT_MEAN_DRAWS) -> torch.Tensor:
        """E_q[z_l | x] of every layer side by side, the statistic of the active-unit count (Burda et al. 2016,
        section 5.2: Cov_x(E_q[u | x]) per unit).

        The first layer's is loc_1(x). A layer above averages its location over the layers below,
        E_q[z_l | x] = E_{z_{l-1} ~ q(z_{l-1} | x)}[loc_l(z_{l-1})], estimated from ``num_draws`` ancestral draws
        per point; loc_l at the mean of the layer below (:meth:`encode`) differs from it wherever loc_l is
        not linear, and overstates how the mean varies over x where q(z_{l-1} | x) is broad (a collapsed unit
        below). The draws' Monte Carlo error adds at most about Var(loc_l(z_{l-1}) | x) / ``num_draws`` to
        each unit's variance over x, a thousandth or less against the threshold of 0.01. Every point uses the
        same standard normal draws (common random numbers, from a generator seeded alike at every call): the
        same means at every call and for any ``batch_size``, and the global random stream untouched.
        """
        generator = torch.Generator().manual_seed(0)
        noise = [torch.randn(num_draws, 1, size, generator=generator).to(x.device) for size in self.z_dims[:-1]]
        means = []
        for start in range(0, x.shape[0], batch_size):
            loc, scale = self.encoders[0](x[start : start + batch_size])
            layers = [loc]
            for encoder, eps in zip(self.encoders[1:], noise, strict=True):  # z_{l-1} on each path, then q(z_l | it)
                loc, scale = encoder(loc + scale * eps)
                layers.append(loc.mean(0))
            means.append(torch.cat(layers, -1))
        return torch.cat(means)

    def decode(self, z1: torch.Tensor):
        """The distribution p(x | z_1)."""
        return self.likelihood(self.decoder(z1))

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """Means of p(x | z_1) for z_L from the prior and z_l ~ p(z_l | z_{l+1}): new points."""
        z = self.prior.sample(num_samples)
        for conditional in reversed(self.conditionals):
            z = dist.Normal(*conditional(z)).sample()
        return self.decode(z).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Means of p(x | z_1) at the posterior mean z_1 = loc_1(x)."""
        return self.decode(self.encoders[0](x)[0]).mean

    def start_output_bias(self, x: torch.Tensor) -> bool:
        return start_decoder_output(self.decoder, self.likelihood, x)

    def check_data(self, x: torch.Tensor, what: str = "data") -> None:
        check_points(x, self.x_shape, self.likelihood, what, "hierarchical VAE")

    # --------------------------------------------------------------- config
    def config(self) -> dict:
        return {
            "type": self.name,
            "x_shape": list(self.x_shape),
            "z_dims": list(self.z_dims),
            "hidden": [list(block) for block in self.hidden],
            "activation": self.activation,
            "prior": prior_config(self.prior, self.z_dims[-1], self.x_shape, MeanPath(self.encoders)),
            "likelihood": likelihood_config(self.likelihood, self.x_shape),
        }

    @classmethod
    def from_config(cls, config: dict) -> HierarchicalVAE:
        return cls(
            x_shape=config["x_shape"],
            z_dims=config["z_dims"],
            hidden=config["hidden"],
            prior=build_prior(config["prior"]),
            likelihood=build_likelihood(config["likelihood"]),
            activation=config["activation"],
        )
