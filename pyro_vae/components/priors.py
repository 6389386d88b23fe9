"""Priors p(z) over the latent code.

A prior is a small :class:`torch.nn.Module` that, called with no arguments,
hands back a Pyro distribution over z with event shape ``(z_dim,)``. Its
learnable parts are ordinary parameters, so the VAE registers them with
``pyro.module`` and every Pyro ELBO trains them. The VAE calls
:meth:`Prior.setup` once, telling the prior the latent size (and, for priors
that need them, the encoder and the data shape).

The priors here:

* :class:`StandardNormal`, N(0, I) (Kingma & Welling 2014);
* :class:`LearnedGaussian`, N(m, diag(s^2)) with learned m and s;
* :class:`MixtureOfGaussians`, sum_k pi_k N(m_k, diag(s_k^2)), all learned;
* :class:`VampPrior`, (1/K) sum_k q(z | u_k) at K learned pseudo-inputs u_k
  (Tomczak & Welling, *VAE with a VampPrior*, AISTATS 2018);
* :class:`FlowPrior`, N(0, I) pushed through a masked autoregressive flow
  built from ``pyro.distributions.transforms`` (Papamakarios et al. 2017).

Only the two Gaussians have a closed-form KL(q || p). With the mixtures and
the flow, ``TraceMeanField_ELBO`` falls back to the Monte Carlo estimate
log q(z|x) - log p(z) at the sampled z, which is what ``Trace_ELBO`` uses
for every prior; both stay unbiased.

To add a prior, subclass :class:`Prior`, set ``name``, implement
:meth:`forward` (and :meth:`config` if it takes arguments), and pass the
class to :func:`register_prior` so that configs and the command line know it.
"""

from __future__ import annotations

import math
from typing import ClassVar

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import constraints

from ..checks import whole_number
from ..registry import Registry
from .nets import inverse_softplus


class Prior(nn.Module):
    """Base class: ``prior()`` returns a distribution with event shape ``(z_dim,)``."""

    name: ClassVar[str]
    #: Whether a model was built with this prior (set by the model; see :meth:`setup`).
    owned = False

    def setup(self, z_dim: int, *, x_shape: tuple[int, ...], encoder: nn.Module) -> None:
        """Called once by the VAE before use; builds whatever depends on the sizes.

        ``encoder`` maps points x to q(z | x): ``(loc, scale)`` of a diagonal Gaussian, or ``(loc, scale,
        log_weights)`` of a mixture of them (M2's, summed over its label: locs and scales of shape
        ``(N, C, z_dim)``, log-weights ``(N, C)``).

        A prior belongs to one model: once a model is built with it (``owned``), a setup for another model is
        refused, since it would rebuild the first model's prior for the second's sizes and encoder.
        """
        if self.owned:
            raise ValueError(
                f"This {type(self).__name__} belongs to a model already; give each model a prior of its own "
                f"(build_prior({self.config()!r}) builds another)."
            )
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


PRIORS: Registry[type[Prior]] = Registry("prior", Prior)
#: Make a prior known by its ``name`` to configs and the command line (usable as a decorator).
register_prior = PRIORS.register
#: A prior from its short name, or from the dict that :meth:`Prior.config` wrote.
build_prior = PRIORS.build


def as_prior(prior: Prior | str | dict | None) -> Prior:
    """A model's prior from itself, its short name or config dict, or None (the standard normal)."""
    return PRIORS.instance(prior, StandardNormal)


@register_prior
class StandardNormal(Prior):
    """p(z) = N(0, I), the prior of Kingma & Welling (2014)."""

    name = "standard-normal"

    def setup(self, z_dim, *, x_shape, encoder):
        super().setup(z_dim, x_shape=x_shape, encoder=encoder)
        self.register_buffer("loc", torch.zeros(z_dim))
        self.register_buffer("scale", torch.ones(z_dim))

    def forward(self):
        return dist.Normal(self.loc, self.scale).to_event(1)


class DiagonalNormalMixture(dist.TorchDistribution):
    """p(z) = sum_k w_k N(z; m_k, diag(s_k^2)), with a log-density computed by matrix products.

    ``MixtureSameFamily`` broadcasts z against every component, which makes
    (batch, K, z_dim) temporaries and a dozen elementwise passes over them,
    costly with the VampPrior's K = 500. Expanding the square instead,

        sum_d (z_d - m_kd)^2 / s_kd^2 = z^2 . (1/s_k^2) - 2 z . (m_k/s_k^2) + sum_d m_kd^2 / s_kd^2,

    needs two (batch, z_dim) x (z_dim, K) products. They run in float64: the
    expansion cancels, with a rounding error of about the float's epsilon times
    (abs(z) / s)^2 per dimension, which in float32 reached nats at the small
    scales an encoder can give (1.4 nats on average over 40 dimensions with s
    of 0.001 to 0.01), and tens of nats where float32 products round their
    inputs to TensorFloat-32 or bfloat16 (``matmul_precision``); in float64
    it is below 1e-6 nats per dimension down to the encoder's smallest scale.
    """

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = False

    def __init__(self, logits: torch.Tensor, locs: torch.Tensor, scales: torch.Tensor, validate_args=None):
        self.log_weights = logits.log_softmax(-1)
        self.locs, self.scales = locs, scales
        super().__init__(event_shape=locs.shape[-1:], validate_args=validate_args)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        z64, locs, precision = z.double(), self.locs.double(), self.scales.double().pow(-2)
        squared_distance = (
            (z64.square() @ precision.T - 2 * z64 @ (locs * precision).T + (locs.square() * precision).sum(-1))
            .clamp(min=0)
            .to(z.dtype)
        )
        log_normaliser = -self.scales.log().sum(-1) - 0.5 * self.locs.shape[-1] * math.log(2 * math.pi)
        return torch.logsumexp(self.log_weights + log_normaliser - 0.5 * squared_distance, dim=-1)

    def sample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        with torch.no_grad():
            k = dist.Categorical(logits=self.log_weights).sample(sample_shape)
            return torch.normal(self.locs[k], self.scales[k])

    def expand(self, batch_shape, _instance=None):
        return dist.ExpandedDistribution(self, batch_shape)


@register_prior
class LearnedGaussian(Prior):
    """p(z) = N(m, diag(s^2)) with learned m and s = softplus(raw) (closed-form KL)."""

    name = "learned-gaussian"

    def setup(self, z_dim, *, x_shape, encoder):
        super().setup(z_dim, x_shape=x_shape, encoder=encoder)
        self.loc = nn.Parameter(torch.zeros(z_dim))
        self.raw_scale = nn.Parameter(inverse_softplus(torch.ones(z_dim)))

    def forward(self):
        return dist.Normal(self.loc, F.softplus(self.raw_scale)).to_event(1)


@register_prior
class MixtureOfGaussians(Prior):
    """p(z) = sum_k pi_k N(z; m_k, diag(s_k^2)), with learned weights, locs and scales.

    The locs start as draws from N(0, I) and the scales at 1, so the initial
    prior is close to N(0, 2 I) but the components are already distinct.
    """

    name = "mixture"

    def __init__(self, num_components: int = 10):
        super().__init__()
        self.num_components = whole_number(num_components, "A mixture's num_components")

    def setup(self, z_dim, *, x_shape, encoder):
        super().setup(z_dim, x_shape=x_shape, encoder=encoder)
        self.logits = nn.Parameter(torch.zeros(self.num_components))
        self.locs = nn.Parameter(torch.randn(self.num_components, z_dim))
        self.raw_scales = nn.Parameter(inverse_softplus(torch.ones(self.num_components, z_dim)))

    def forward(self):
        return DiagonalNormalMixture(self.logits, self.locs, F.softplus(self.raw_scales))

    def config(self):
        return {"name": self.name, "num_components": self.num_components}


@register_prior
class VampPrior(Prior):
    """The VampPrior of Tomczak & Welling (2018): p(z) = (1/K) sum_k q(z | u_k).

    The mixture of the encoder's own posteriors at K learned pseudo-inputs
    u_k, which approximates the aggregate posterior (1/N) sum_n q(z | x_n),
    the prior that maximises the ELBO. Pseudo-inputs live in the data space;
    as in the paper they start at N(0.05, 0.01^2) and are kept in the data's
    range by a hardtanh: ``bounds``, [0, 1] for images; None leaves them free
    (data of any range, such as M1+M2's standardised features). The encoder is
    shared with the guide, not copied: it is held by reference and trained by both.
    """

    name = "vamp"
    #: The pseudo-inputs' range of images, which the config leaves out (as runs written before ``bounds`` did).
    IMAGE_BOUNDS = (0.0, 1.0)

    def __init__(
        self,
        num_components: int = 500,
        init_mean: float = 0.05,
        init_std: float = 0.01,
        bounds: tuple[float, float] | None = IMAGE_BOUNDS,
    ):
        super().__init__()
        num_components = whole_number(num_components, "A VampPrior's num_components (pseudo-inputs)")
        if bounds is not None and not (len(bounds) == 2 and bounds[0] < bounds[1]):
            raise ValueError(f"bounds must be (low, high) with low < high, or None; got {bounds!r}.")
        self.num_components, self.init_mean, self.init_std = num_components, init_mean, init_std
        self.bounds = None if bounds is None else (float(bounds[0]), float(bounds[1]))

    def setup(self, z_dim, *, x_shape, encoder):
        super().setup(z_dim, x_shape=x_shape, encoder=encoder)
        self._encoder = [encoder]  # a reference, not a submodule: the VAE owns and saves the encoder
        self.pseudo_inputs = nn.Parameter(self.init_mean + self.init_std * torch.randn(self.num_components, *x_shape))

    @property
    def encoder(self) -> nn.Module:
        return self._encoder[0]

    def forward(self):
        inputs = self.pseudo_inputs if self.bounds is None else F.hardtanh(self.pseudo_inputs, *self.bounds)
        posterior = self.encoder(inputs)
        loc, scale = posterior[:2]
        # an encoder whose q(z | u) is itself a mixture, sum_c w_c N(loc_c, scale_c^2) (M2's, over the label),
        # gives log w of shape (K, C) after locs and scales of (K, C, z_dim): each component joins at w_c / K
        log_weights = posterior[2] if len(posterior) == 3 else torch.zeros(loc.shape[:-1], device=loc.device)
        return DiagonalNormalMixture(log_weights.flatten(), loc.flatten(0, -2), scale.flatten(0, -2))

    def config(self):
        config = {
            "name": self.name,
            "num_components": self.num_components,
            "init_mean": self.init_mean,
            "init_std": self.init_std,
        }
        if self.bounds != self.IMAGE_BOUNDS:
            config["bounds"] = None if self.bounds is None else list(self.bounds)
        return config


@register_prior
class FlowPrior(Prior):
    """p(z): N(0, I) pushed through a masked autoregressive flow (MAF, Papamakarios et al. 2017).

    Each layer is Pyro's ``affine_autoregressive`` transform used in its
    inverse direction, so that log p(z), which training evaluates at every
    step, takes one pass per layer; sampling, needed only for new images,
    takes z_dim passes per layer. The variables are reversed between layers.
    """

    name = "flow"

    def __init__(self, num_layers: int = 4, hidden: int | None = None):
        super().__init__()
        self.num_layers = whole_number(num_layers, "A flow prior's num_layers")
        self.hidden = None if hidden is None else whole_number(hidden, "A flow prior's hidden", note="(None: 4 z_dim)")

    def setup(self, z_dim, *, x_shape, encoder):
        super().setup(z_dim, x_shape=x_shape, encoder=encoder)
        hidden = 4 * z_dim if self.hidden is None else self.hidden
        self.layers = nn.ModuleList(
            T.affine_autoregressive(z_dim, hidden_dims=[hidden, hidden]) for _ in range(self.num_layers)
        )
        self.register_buffer("loc", torch.zeros(z_dim))
        self.register_buffer("scale", torch.ones(z_dim))
        self.register_buffer("reverse", torch.arange(z_dim - 1, -1, -1))

    def forward(self):
        """The flow's distribution, its transforms made anew around the layers' networks at every call.

        A Pyro transform keeps its last input and output and answers the same input tensor from them: a z
        scored again after an optimiser step was given the density before the step (and, first scored
        without gradients, none). The new transforms' memory lasts as long as the distribution.
        """
        transforms = []
        for i, layer in enumerate(self.layers):
            if i:
                transforms.append(T.Permute(self.reverse))
            transforms.append(T.AffineAutoregressive(layer.arn).inv)
        return dist.TransformedDistribution(dist.Normal(self.loc, self.scale).to_event(1), transforms)

    def config(self):
        return {"name": self.name, "num_layers": self.num_layers, "hidden": self.hidden}
