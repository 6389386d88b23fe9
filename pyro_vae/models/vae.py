"""The Variational Autoencoder of Kingma & Welling, *Auto-Encoding Variational
Bayes* (ICLR 2014), as an ordinary Pyro model and guide.

Generative model (``VAE.model``)::

    z_n ~ p(z)                      site "z", event dim 1
    x_n ~ p(x | z_n) = likelihood(decoder(z_n))   site "x", event dims = x_shape

Inference network (``VAE.guide``)::

    z_n ~ q(z | x_n) = N(loc(x_n), diag(scale(x_n)^2))

both inside one plate named ``"data"`` at dim -1. Pyro's ``Trace_ELBO``
estimates ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)) with the
reparameterised draw z = loc + scale * eps, eps ~ N(0, I);
``TraceMeanField_ELBO`` uses the closed-form KL where one exists.

Both programs take the same keyword arguments, as SVI requires:

* ``kl_weight`` scales the "z" site in model and guide through
  ``poutine.scale``, which multiplies the KL term (warm-up, beta-VAE);
* ``num_data`` sizes the plate for the whole data set, so that a minibatch
  is scaled by ``num_data / batch_size``;
* ``batch_size`` is how many x to draw when the model runs without data.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pyro
import pyro.poutine as poutine
import torch
from torch import nn

from ..components.likelihoods import Likelihood, as_likelihood, build_likelihood
from ..components.nets import build_nets
from ..components.priors import Prior, as_prior, build_prior
from .base import (
    Model,
    check_points,
    data_plate,
    latent_size,
    likelihood_config,
    prior_config,
    register_model,
    start_decoder_output,
)

_instance_ids = itertools.count()


@register_model
class VAE(Model):
    """A VAE with pluggable prior, likelihood, encoder and decoder.

    :param x_shape: shape of one data point, e.g. ``(1, 28, 28)``.
    :param z_dim: latent dimension.
    :param prior: a :class:`~pyro_vae.components.priors.Prior`, its short name or config dict (default
        standard normal).
    :param likelihood: a :class:`~pyro_vae.components.likelihoods.Likelihood`, its short name or config dict
        (default Bernoulli).
    :param hidden: hidden sizes of the default networks.
    :param arch: ``"mlp"`` or ``"conv"``, the default networks' architecture.
    :param activation: of the MLP's hidden layers: ``"relu"``, ``"softplus"``, or ``"tanh"`` as in
        Burda et al.'s IWAE experiments.
    :param encoder, decoder: modules with the signatures in :mod:`pyro_vae.components.nets`,
        replacing the default networks.
    :param name: prefix of this VAE's parameters in Pyro's param store; by
        default unique per instance, so that two VAEs never share parameters.
    """

    name = "vae"
    legacy_config = {"activation": "relu"}  # runs written before the choice used ReLU
    figures = ("learning_curves", "latent_space", "reconstructions", "samples", "manifold")

    @classmethod
    def completed_config(cls, config: dict) -> dict:
        """Also: a conv run of several hidden sizes (accepted before they were refused) used the first."""
        config = super().completed_config(config)
        if config.get("arch") == "conv" and len(config.get("hidden") or ()) > 1:
            config = {**config, "hidden": list(config["hidden"][:1])}
        return config

    def __init__(
        self,
        x_shape: Sequence[int],
        z_dim: int = 50,
        prior: Prior | str | dict | None = None,
        likelihood: Likelihood | str | dict | None = None,
        *,
        hidden: Sequence[int] = (400,),
        arch: str = "mlp",
        activation: str = "relu",
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
        name: str | None = None,
    ):
        super().__init__()
        self.x_shape, self.z_dim = tuple(x_shape), latent_size(z_dim)
        self.hidden, self.arch, self.activation = tuple(hidden), arch, activation
        self.custom_nets = encoder is not None or decoder is not None
        self.likelihood = as_likelihood(likelihood)
        self.likelihood.setup(self.x_shape)
        default_encoder, default_decoder = (
            build_nets(arch, self.x_shape, self.z_dim, self.hidden, self.likelihood.params_per_dim, activation)
            if encoder is None or decoder is None
            else (None, None)
        )
        self.encoder = encoder if encoder is not None else default_encoder
        self.decoder = decoder if decoder is not None else default_decoder
        if self.custom_nets:
            self._check_net_shapes()
        self.prior = as_prior(prior)
        self.prior.setup(self.z_dim, x_shape=self.x_shape, encoder=self.encoder)
        self.prior.owned = self.likelihood.owned = True  # built: another model may not set them up again
        self.pyro_name = name or f"vae{next(_instance_ids)}"

    def _check_net_shapes(self) -> None:
        """Networks of one's own must give the shapes the model reads (docs/conventions.md), checked on two
        points at construction: a decoder output without its ``params_per_dim`` axis would otherwise be read
        along the batch axis, and train a wrong model without an error."""
        device = next(self.decoder.parameters(), torch.empty(0)).device
        modes = self.encoder.training, self.decoder.training
        self.encoder.eval(), self.decoder.eval()  # no batch statistics updated by the probe
        try:
            with torch.no_grad():
                output = self.decoder(torch.zeros(2, self.z_dim, device=device))
                encoded = self.encoder(torch.zeros(2, *self.x_shape, device=device))
        finally:
            self.encoder.train(modes[0]), self.decoder.train(modes[1])
        wanted = (2, self.likelihood.params_per_dim, *self.x_shape)
        if not isinstance(output, torch.Tensor) or tuple(output.shape) != wanted:
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(
                f"The decoder gives {got} for 2 latent codes; the {self.likelihood.name} likelihood reads "
                f"(batch, params_per_dim, *x_shape) = {wanted}. Return a tensor of that shape (e.g. "
                f".reshape(*z.shape[:-1], {self.likelihood.params_per_dim}, *x_shape))."
            )
        shapes = [tuple(t.shape) for t in encoded] if isinstance(encoded, tuple | list) else None
        if shapes != [(2, self.z_dim)] * 2:
            raise ValueError(
                f"The encoder gives {shapes or type(encoded).__name__} for 2 points; q(z | x) reads (loc, scale), "
                f"each of shape (batch, z_dim) = {(2, self.z_dim)}."
            )

    # ----------------------------------------------------------------- Pyro
    def model(self, x=None, *, kl_weight: float = 1.0, num_data: int | None = None, batch_size: int | None = None):
        """p(z) p(x | z) over a batch; with ``x=None`` it draws ``batch_size`` new points."""
        pyro.module(f"{self.pyro_name}.decoder", self.decoder)
        pyro.module(f"{self.pyro_name}.prior", self.prior)
        pyro.module(f"{self.pyro_name}.likelihood", self.likelihood)
        n = x.shape[0] if x is not None else (batch_size or 1)
        device = x.device if x is not None else next(self.decoder.parameters()).device
        with data_plate(n, num_data, device):
            with poutine.scale(scale=kl_weight):
                z = pyro.sample("z", self.prior())
            return pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    def guide(self, x=None, *, kl_weight: float = 1.0, num_data: int | None = None, batch_size: int | None = None):
        """q(z | x) = N(loc(x), diag(scale(x)^2)) over a batch."""
        if x is None:
            raise ValueError("The guide q(z | x) needs data x.")
        pyro.module(f"{self.pyro_name}.encoder", self.encoder)
        loc, scale = self.encoder(x)
        with data_plate(x.shape[0], num_data, x.device):
            with poutine.scale(scale=kl_weight):
                return pyro.sample("z", pyro.distributions.Normal(loc, scale).to_event(1))

    # ------------------------------------------------------------ utilities
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of q(z | x)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor):
        """The distribution p(x | z)."""
        return self.likelihood(self.decoder(z))

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """Means of p(x | z) for z drawn from the prior: new data points, shape ``(num_samples, *x_shape)``."""
        return self.decode(self.prior.sample(num_samples)).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Means of p(x | z) at the posterior mean z = loc(x)."""
        return self.decode(self.encode(x)[0]).mean

    def start_output_bias(self, x: torch.Tensor) -> bool:
        return start_decoder_output(self.decoder, self.likelihood, x)

    def check_data(self, x: torch.Tensor, what: str = "data") -> None:
        """Refuse data this model cannot take, naming the fix: empty, NaN/inf, wrong shape, outside the support."""
        check_points(x, self.x_shape, self.likelihood, what, "VAE")

    # --------------------------------------------------------------- config
    @property
    def describable(self) -> bool:
        return not self.custom_nets

    def config(self) -> dict:
        """Everything needed to rebuild this VAE with :meth:`from_config`."""
        if self.custom_nets:
            raise ValueError(
                "A VAE with a custom encoder or decoder cannot be described by a config; save its state_dict."
            )
        return {
            "type": self.name,
            "x_shape": list(self.x_shape),
            "z_dim": self.z_dim,
            "hidden": list(self.hidden),
            "arch": self.arch,
            "activation": self.activation,
            "prior": prior_config(self.prior, self.z_dim, self.x_shape, self.encoder),
            "likelihood": likelihood_config(self.likelihood, self.x_shape),
        }

    @classmethod
    def from_config(cls, config: dict) -> VAE:
        """The VAE that :meth:`config` describes, with fresh weights."""
        config = cls.completed_config(config)
        return cls(
            x_shape=config["x_shape"],
            z_dim=config["z_dim"],
            prior=build_prior(config["prior"]),
            likelihood=build_likelihood(config["likelihood"]),
            hidden=config["hidden"],
            arch=config["arch"],
            activation=config["activation"],
        )
