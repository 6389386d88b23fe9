"""Likelihoods p(x | z): from the decoder's output to a Pyro distribution over x.

A likelihood is a small :class:`torch.nn.Module` in the pattern of
``DistributionNet.make_dist`` in ``pyro.contrib.cevae``:

* ``params_per_dim`` says how many decoder outputs it needs per data
  dimension; the decoder returns a tensor of shape
  ``(*batch, params_per_dim, *x_shape)``;
* calling it on that tensor returns a distribution with batch shape
  ``batch`` and event shape ``x_shape``;
* ``support`` declares where x may lie, and :meth:`Likelihood.check_data`
  refuses data outside it with a message that names the fix;
* :meth:`Likelihood.constant_fit` gives the decoder output of the best
  p(x | z) that ignores z, where a fresh decoder's output bias starts.

To add a likelihood, subclass :class:`Likelihood`, set ``name``,
``params_per_dim`` and ``support``, implement :meth:`forward` (and
:meth:`~Likelihood.config` if it takes arguments), and pass the class to
:func:`register_likelihood` so that configs and the command line know it.
"""

from __future__ import annotations

import math
from typing import ClassVar

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import constraints

from ..data import DataError
from ..registry import Registry
from .nets import inverse_softplus


class Likelihood(nn.Module):
    """Base class: ``likelihood(decoder_output)`` returns p(x | z) with event shape ``x_shape``."""

    name: ClassVar[str]
    params_per_dim: ClassVar[int] = 1
    support: ClassVar[constraints.Constraint] = constraints.real
    #: Whether a model was built with this likelihood (set by the model; see :meth:`setup`).
    owned = False

    def setup(self, x_shape: tuple[int, ...]) -> None:
        """Called once by the VAE; builds whatever depends on the data shape.

        A likelihood belongs to one model: once a model is built with it (``owned``), a setup for another model
        is refused.
        """
        if self.owned:
            raise ValueError(
                f"This {type(self).__name__} belongs to a model already; give each model a likelihood of its own "
                f"(build_likelihood({self.config()!r}) builds another)."
            )
        self.x_shape = tuple(x_shape)

    def forward(self, params: torch.Tensor) -> dist.TorchDistribution:
        raise NotImplementedError

    def _param(self, params: torch.Tensor, i: int) -> torch.Tensor:
        """The i-th decoder output per data dimension, shape ``(*batch, *x_shape)``."""
        return params.select(-len(self.x_shape) - 1, i)

    def check_data(self, x: torch.Tensor) -> None:
        """Raise :class:`~pyro_vae.data.DataError` if x lies outside this likelihood's support."""
        checked = self.support.check(x)  # per value, or per vector for a support of vectors (a simplex, say)
        inside = checked.reshape(len(x), -1).all(-1)
        if not bool(inside.all()):
            first = int((~inside).nonzero()[0])
            values = x[first][~checked[first]] if checked.shape == x.shape else x[first]
            raise DataError(
                f"The {self.name} likelihood needs data in {_in_words(self.support)}, but {int((~inside).sum())} of "
                f"the {len(x)} points lie outside it (point {first}, e.g. {float(values.flatten()[0]):g}). "
                f"{self.fix_hint()}"
            )

    def fix_hint(self) -> str:
        return "Transform the data into the likelihood's support or choose another likelihood."

    def constant_fit(self, x: torch.Tensor) -> torch.Tensor | None:
        """The decoder output, shape ``(params_per_dim, *x_shape)``, of the maximum-likelihood p(x | z) that ignores z.

        ``x`` holds the training points, shape ``(N, *x_shape)``. A decoder whose output bias starts
        here starts at the data's marginal statistics instead of having to learn them first (Burda
        et al. 2016's code starts the Bernoulli logits at the training mean's). None, the default,
        means that this likelihood has none and the decoder keeps its random start.
        """
        return None

    def config(self) -> dict:
        """The short name and arguments that rebuild this likelihood (see :func:`build_likelihood`)."""
        return {"name": self.name}


def _in_words(support: constraints.Constraint) -> str:
    """A support as a reader would write it: {0, 1} for ``constraints.boolean``, not ``Boolean()``."""
    words = {constraints.boolean: "{0, 1} (binary data)", constraints.unit_interval: "[0, 1]",
             constraints.real: "the real numbers (finite values)"}  # fmt: skip
    return words.get(support, str(support))


LIKELIHOODS: Registry[type[Likelihood]] = Registry("likelihood", Likelihood)
#: Make a likelihood known by its ``name`` to configs and the command line (usable as a decorator).
register_likelihood = LIKELIHOODS.register
#: A likelihood from its short name, or from the dict that :meth:`Likelihood.config` wrote.
build_likelihood = LIKELIHOODS.build


def as_likelihood(likelihood: Likelihood | str | dict | None) -> Likelihood:
    """A model's likelihood from itself, its short name or config dict, or None (the Bernoulli)."""
    return LIKELIHOODS.instance(likelihood, Bernoulli)


class BinaryBernoulli(dist.Independent):
    """Independent Bernoulli pixels, ``dist.Bernoulli(logits=l).to_event(n)``, for x in {0, 1}.

    log p(x | l) = sum_d x_d l_d - softplus(l_d) = -sum_d softplus((1 - 2 x_d) l_d)
    when every x_d is 0 or 1: one multiplication and one softplus per pixel,
    where ``binary_cross_entropy_with_logits`` takes half a dozen elementwise
    passes. The :class:`Bernoulli` likelihood refuses non-binary data, for
    which the two forms differ.
    """

    def flat_logits_and_value(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and ``value`` (checked against the support when validation is on), event dims flattened."""
        if self.base_dist._validate_args:
            self.base_dist._validate_sample(value)
        n = self.reinterpreted_batch_ndims
        if n == 0:  # scalar data: a last dim of one to sum over (flatten(-0) would flatten the batch)
            return self.base_dist.logits.unsqueeze(-1), value.unsqueeze(-1)
        return self.base_dist.logits.flatten(-n), value.flatten(-n)

    def log_prob(self, value):
        return bernoulli_log_prob_sum(*self.flat_logits_and_value(value))


def bernoulli_log_prob_sum(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """sum_d log Bernoulli(value_d; sigmoid(logits_d)) = -sum_d softplus((1 - 2 value_d) logits_d), last dim.

    For binary ``value`` only; shapes broadcast as in ``logits * value``.
    """
    # softplus's gradient needs only its input, so negating the sum in place is safe under autograd
    return F.softplus((1 - 2 * value) * logits).sum(-1).neg_()


@register_likelihood
class Bernoulli(Likelihood):
    """p(x | z) = prod_d Bernoulli(x_d; sigmoid(logit_d(z))), for binary data only."""

    name = "bernoulli"
    support = constraints.boolean

    def forward(self, params):
        return BinaryBernoulli(dist.Bernoulli(logits=self._param(params, 0)), len(self.x_shape))

    def constant_fit(self, x):
        """The logit of each dimension's mean, the mean clipped to [0.001, 0.999] as in Burda et al.'s code.

        For dynamically binarised data the intensities' mean is the binary pixels' mean.
        """
        return torch.logit(x.mean(0, dtype=torch.float64).clamp(1e-3, 1 - 1e-3)).float().unsqueeze(0)

    def fix_hint(self):
        return (
            "A Bernoulli is a density only for binary data: binarise grayscale pixels "
            "(--binarize dynamic or fixed; load_dataset(..., binarize='dynamic')), or use the "
            "continuous-bernoulli likelihood, which is a proper density on [0, 1]."
        )


class LogitContinuousBernoulli(dist.ContinuousBernoulli):
    """The continuous Bernoulli with its log normaliser, mean, CDF and draws computed from the logit l, exact at any l.

    With lambda = sigmoid(l), 2 atanh(1 - 2 lambda) = -l and 2 lambda - 1 = tanh(l / 2), so::

        log C = log(l / tanh(l / 2))              (log 2 + l^2 / 12 for abs(l) < 0.01, error below l^4 / 200)
        E[x]  = sigmoid(l) / tanh(l / 2) - 1 / l   (1 / 2 + l / 12 for abs(l) < 0.1, error below abs(l)^3 / 700)

    log C grows like log abs(l) and E[x] tends to 1 / abs(l) from its side.
    The density is proportional to e^(l x) on [0, 1], so its CDF is
    F(x) = expm1(l x) / expm1(l) and a draw is F^-1(u) for u uniform (:meth:`icdf`).
    As a natural exponential family in x, its variance is the second derivative
    of log(expm1(l) / l), Var[x] = 1 / l^2 - 1 / (4 sinh^2(l / 2))
    (1 / 12 - l^2 / 240 + l^4 / 6048 for abs(l) < 0.5), and its entropy is
    softplus(l) - l E[x] - log C.
    ``torch.distributions.ContinuousBernoulli`` computes all of these from lambda
    clamped to the dtype's eps, so that beyond abs(l) of about 16 in float32
    they stop moving: log C is 0.23 nats per value too low at abs(l) = 20 and
    11 at 10^6, where a decoder of near-constant pixels takes its logits, and its
    draws at l = 100 average 0.937 where the density's mean is 0.990.
    """

    #: Below this abs(l) the CDF and its inverse are their first-order expansions in l (error of order l^2).
    SMALL_LOGIT = 1e-4

    def _cont_bern_log_norm(self):
        logits = self.logits
        small = logits.abs() < 0.01
        safe = torch.where(small, torch.ones_like(logits), logits)  # no 0 / 0, in value or gradient
        return torch.where(small, math.log(2.0) + logits * logits / 12, torch.log(safe / torch.tanh(safe / 2)))

    @property
    def mean(self):
        logits = self.logits
        small = logits.abs() < 0.1
        safe = torch.where(small, torch.ones_like(logits), logits)
        return torch.where(small, 0.5 + logits / 12, torch.sigmoid(safe) / torch.tanh(safe / 2) - 1 / safe)

    @property
    def variance(self):
        logits = self.logits
        small = logits.abs() < 0.5
        safe = torch.where(small, torch.ones_like(logits), logits)
        squared = logits * logits
        series = 1 / 12 - squared / 240 + squared * squared / 6048
        return torch.where(small, series, 1 / (safe * safe) - 1 / (4 * torch.sinh(safe / 2) ** 2))

    def entropy(self):
        return F.softplus(self.logits) - self.logits * self.mean - self._cont_bern_log_norm()

    def _logit_signs(self):
        """abs(l) < SMALL_LOGIT, and l where l > 0 (else 1) and where l < 0 (else -1), each branch free of overflow."""
        logits = self.logits
        small = logits.abs() < self.SMALL_LOGIT
        return small, torch.where(logits > 0, logits, 1.0), torch.where(logits < 0, logits, -1.0)

    def cdf(self, value):
        """F(x) = expm1(l x) / expm1(l), as e^(l (x - 1)) expm1(-l x) / expm1(-l) for l > 0; 0 below 0 and 1 above 1."""
        if self._validate_args:
            self._validate_sample(value)
        small, above, below = self._logit_signs()
        x = value.clamp(0.0, 1.0)
        positive = torch.exp(above * (x - 1)) * torch.expm1(-above * x) / torch.expm1(-above)
        negative = torch.expm1(below * x) / torch.expm1(below)
        return torch.where(small, x + self.logits / 2 * x * (x - 1), torch.where(self.logits > 0, positive, negative))

    #: Above this abs(l), e^-abs(l) is below float32's rounding of 1: :meth:`icdf` goes by logaddexp.
    LARGE_LOGIT = 8.0

    def icdf(self, value):
        """x with F(x) = u: log1p(u expm1(l)) / l, as 1 + log1p((1 - u) expm1(-l)) / l for l > 0; draws are icdf(u).

        For abs(l) > ``LARGE_LOGIT``, expm1(-abs(l)) rounds to -1 and log1p(-1) at u = 0 (which ``torch.rand``
        draws) would give -inf: there the same x is 1 + logaddexp(log u, log(1 - u) - l) / l for l > 0 and
        logaddexp(log(1 - u), log u + l) / l for l < 0, exactly 0 and 1 at the ends.
        """
        small, above, below = self._logit_signs()
        large = self.logits.abs() > self.LARGE_LOGIT
        log_u, log_1mu = torch.log(value), torch.log1p(-value)
        # each branch at logits it is exact for, and finite in value and gradient where torch.where drops it
        moderate_above, moderate_below = torch.where(large, 1.0, above), torch.where(large, -1.0, below)
        positive = torch.where(
            large,
            1 + torch.logaddexp(log_u, log_1mu - above) / above,
            1 + torch.log1p((1 - value) * torch.expm1(-moderate_above)) / moderate_above,
        )
        negative = torch.where(
            large,
            torch.logaddexp(log_1mu, log_u + below) / below,
            torch.log1p(value * torch.expm1(moderate_below)) / moderate_below,
        )
        x = torch.where(
            small, value + self.logits / 2 * value * (1 - value), torch.where(self.logits > 0, positive, negative)
        )
        return x.clamp(0.0, 1.0)  # the support: rounding at the ends can leave it by an ulp


@register_likelihood
class ContinuousBernoulli(Likelihood):
    """p(x | z) = prod_d CB(x_d; sigmoid(logit_d(z))) on [0, 1] (Loaiza-Ganem & Cunningham, NeurIPS 2019).

    CB(x; lambda) = C(lambda) lambda^x (1 - lambda)^(1 - x): the Bernoulli
    formula with the normalising constant C(lambda) that makes it a density
    on [0, 1], so that its log-likelihood of grayscale pixels is a real
    log-density. Its mean is not lambda; :attr:`mean` (used for images) is
    the distribution's own.
    """

    name = "continuous-bernoulli"
    support = constraints.unit_interval

    def forward(self, params):
        return LogitContinuousBernoulli(logits=self._param(params, 0)).to_event(len(self.x_shape))

    def constant_fit(self, x):
        """The logit whose CB mean is each dimension's mean, clipped to [0.01, 0.99]: CB is an exponential
        family in x with natural parameter logit(lambda), so its maximum-likelihood fit matches the mean.

        The mean rises monotonically with the logit (E[x] = 0.99 at l = 100, as 1 - 1 / l), so 60 halvings
        of [-100, 100] find it, with the exact mean of :class:`LogitContinuousBernoulli` (torch's stops
        rising at 0.972 in float64).
        """
        target = x.mean(0, dtype=torch.float64).clamp(0.01, 0.99)
        low, high = torch.full_like(target, -100.0), torch.full_like(target, 100.0)
        for _ in range(60):
            middle = (low + high) / 2
            below = LogitContinuousBernoulli(logits=middle).mean < target
            low, high = torch.where(below, middle, low), torch.where(below, high, middle)
        return ((low + high) / 2).float().unsqueeze(0)

    def fix_hint(self):
        return "Scale the data into [0, 1] (for 8-bit images divide by 255), or use the gaussian or laplace likelihood."


class _LocationScale(Likelihood):
    """p(x | z) = prod_d family(x_d; loc_d(z), scale_d), the decoder giving loc.

    The scale is chosen by ``scale_mode``:

    * ``"fixed"``: ``init_scale`` throughout;
    * ``"shared"``: one learned scale for all dimensions;
    * ``"per-dim"``: one learned scale per data dimension;
    * ``"decoder"``: predicted by the decoder for each x (a second output per dimension).

    Learned and predicted scales are ``min_scale + softplus(raw)``: the
    density stays proper (bounded by 1 / min_scale) however the
    optimiser pushes the raw value.
    """

    family: ClassVar[type[dist.TorchDistribution]]
    SCALE_MODES = ("fixed", "shared", "per-dim", "decoder")

    def __init__(self, scale_mode: str, init_scale: float, min_scale: float):
        super().__init__()
        if scale_mode not in self.SCALE_MODES:
            raise ValueError(f"Unknown scale mode {scale_mode!r} for {self.name}; choose one of {self.SCALE_MODES}.")
        if not init_scale > min_scale > 0:
            raise ValueError(f"Need init > min > 0 for the {self.name} scale; got {init_scale} and {min_scale}.")
        self.scale_mode, self.init_scale, self.min_scale = scale_mode, init_scale, min_scale
        self.params_per_dim = 2 if scale_mode == "decoder" else 1

    def setup(self, x_shape):
        super().setup(x_shape)
        if self.scale_mode == "decoder":
            # an offset on the decoder's raw output, so that a fresh decoder starts near init_scale
            self.register_buffer("raw_scale", inverse_softplus(torch.tensor(self.init_scale - self.min_scale)))
            return
        shape = self.x_shape if self.scale_mode == "per-dim" else ()
        raw = inverse_softplus(torch.full(shape, self.init_scale - self.min_scale))
        if self.scale_mode == "fixed":
            self.register_buffer("raw_scale", raw)
        else:
            self.raw_scale = nn.Parameter(raw)

    def scale(self, params: torch.Tensor | None = None) -> torch.Tensor:
        """The scale; with ``scale_mode="decoder"`` it depends on the decoder output ``params``."""
        if self.scale_mode != "decoder":
            return self.min_scale + F.softplus(self.raw_scale)
        if params is None:
            raise ValueError("A scale predicted by the decoder needs the decoder's output.")
        return self.min_scale + F.softplus(self.raw_scale + self._param(params, 1))

    def forward(self, params):
        loc = self._param(params, 0)
        return self.family(loc, self.scale(params).expand(loc.shape)).to_event(len(self.x_shape))

    def constant_fit(self, x):
        """The maximum-likelihood location of each dimension (:meth:`fit_location`); a predicted scale's
        output 0, where the scale starts at ``init_scale``."""
        loc = self.fit_location(x).float()
        return torch.stack([loc, torch.zeros_like(loc)][: self.params_per_dim])

    def fit_location(self, x: torch.Tensor) -> torch.Tensor:
        """The maximum-likelihood location of each dimension, for any scale."""
        raise NotImplementedError


@register_likelihood
class Gaussian(_LocationScale):
    """p(x | z) = prod_d N(x_d; mu_d(z), sigma_d^2), sigma fixed, learned or predicted (see ``sigma``).

    :param sigma: ``"fixed"``, ``"shared"``, ``"per-dim"`` or ``"decoder"``.
    :param init_sigma: the fixed or initial sigma.
    :param min_sigma: the lower bound of learned and predicted sigmas.
    """

    name = "gaussian"
    family = dist.Normal

    def __init__(self, sigma: str = "fixed", init_sigma: float = 0.1, min_sigma: float = 1e-3):
        super().__init__(sigma, init_sigma, min_sigma)

    def fit_location(self, x):
        """The mean."""
        return x.mean(0, dtype=torch.float64)

    def config(self):
        return {"name": self.name, "sigma": self.scale_mode, "init_sigma": self.init_scale, "min_sigma": self.min_scale}


@register_likelihood
class Laplace(_LocationScale):
    """p(x | z) = prod_d Laplace(x_d; mu_d(z), b_d), b fixed, learned or predicted (see ``scale``).

    Heavier tails than the Gaussian: an L1 reconstruction error, robust to outlying pixels.

    :param scale: ``"fixed"``, ``"shared"``, ``"per-dim"`` or ``"decoder"``.
    :param init_scale: the fixed or initial b.
    :param min_scale: the lower bound of learned and predicted b.
    """

    name = "laplace"
    family = dist.Laplace

    def __init__(self, scale: str = "fixed", init_scale: float = 0.1, min_scale: float = 1e-3):
        super().__init__(scale, init_scale, min_scale)

    def fit_location(self, x):
        """The median."""
        return x.median(0).values

    def config(self):
        return {"name": self.name, "scale": self.scale_mode, "init_scale": self.init_scale, "min_scale": self.min_scale}
