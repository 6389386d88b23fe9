"""Per-data-point log densities of any Pyro model and guide, and the ELBO per point.

For a model p(x, z) and guide q(z | x) that put their data points in a plate
named ``"data"``, :func:`site_log_densities` draws K particles z_k ~ q(z | x)
in one vectorised pass (a particle plate left of every model plate), replays
the model on them, and returns every site's log density per particle and per
data point, shape ``(K, N)``. From these:

* log w_k = log p(x, z_k) - log q(z_k | x)  (the importance weights);
* ELBO(x) ~= mean_k log w_k = E_q[log p(x|z)] - KL(q(z|x) || p(z)).

The densities are the **unscaled** ``site["fn"].log_prob(value)`` (masks
kept), so minibatch plate scaling and ``poutine.scale`` (KL warm-up, beta)
never leak into an evaluation.

With ``hold_fixed=module``, log q(z | x) is evaluated with the module's
parameters held fixed: the guide is replayed on its own draws with detached
parameters, so that a gradient reaches the guide's parameters only through
the reparameterised draws z = g(eps; phi), never through the density's
direct dependence on phi (the score term). This is the path derivative of
Roeder, Wu & Duvenaud (2017) that :mod:`pyro_vae.infer.path_derivatives`
builds its estimators on. In a guide with several sites the replayed
densities still read the draws, so log q(z2 | z1) passes its derivative in
z1 on: the estimator is the path derivative of the whole q(z1, z2 | x).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample
from torch.nn.utils import stateless

from ..checks import whole_number

DATA_PLATE = "data"
PARTICLE_PLATE = "_pyro_vae_particles"


def standard_error(values) -> float:
    """The standard error of the mean of per-point values (a tensor or array); NaN for fewer than two."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = values.numel()
    return float(values.std() / math.sqrt(n)) if n > 1 else float("nan")


def log_mean_exp(log_weights: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """log (1/K sum_k exp(log w_k)) along ``dim`` of K weights: the log of an importance-sampled (or annealed)
    estimate of p(x), and Burda et al.'s bound L_K where the weights are p(x, z_k) / q(z_k | x)."""
    return log_weights.logsumexp(dim) - math.log(log_weights.shape[dim])


#: Distribution type -> ``log_prob(fn, value)`` used instead of ``fn.log_prob(value)``.
LogDensityKernels = Mapping[type, Callable[[object, torch.Tensor], torch.Tensor]]


@dataclass
class SiteLogDensities:
    """Per-site log densities, each of shape ``(K, N)``."""

    observed: dict[str, torch.Tensor]  # log p(x | ...) of the model's observed sites
    latent_prior: dict[str, torch.Tensor]  # log p(z | ...) of the model's latent sites
    latent_guide: dict[str, torch.Tensor]  # log q(z | ...) of the guide's sites
    reparameterized: bool = True  # whether every guide site was drawn with rsample
    #: The guide's draws as the model and the densities read them, with their guide sites (with
    #: ``hold_fixed``, each draw an alias of the guide's own, so a hook on it sees only the densities' gradient).
    draws: dict[str, tuple[torch.Tensor, dict]] = field(default_factory=dict)

    def as_tuple(self) -> tuple[dict[str, torch.Tensor], ...]:
        """The three groups of densities, the constructor's arguments."""
        return self.observed, self.latent_prior, self.latent_guide

    @property
    def log_weights(self) -> torch.Tensor:
        """log p(x, z_k) - log q(z_k | x), shape ``(K, N)``."""
        return self.reconstruction + sum(self.latent_prior.values()) - sum(self.latent_guide.values())

    @property
    def reconstruction(self) -> torch.Tensor:
        """log p(x | z_k), shape ``(K, N)``."""
        return sum(self.observed.values())

    @property
    def kl(self) -> torch.Tensor:
        """log q(z_k | x) - log p(z_k): a one-sample estimate of KL(q || p) per particle."""
        return sum(self.latent_guide.values()) - sum(self.latent_prior.values())


def negligible_share(dtype: torch.dtype) -> float:
    """The share of a sum below which a term is left out of the objectives' gradients: eps^2 of ``dtype``
    (2^-46 in float32), eps its machine epsilon."""
    return torch.finfo(dtype).eps ** 2


def negligible_shares(log_weights: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Where exp(``log_weights``) normalised along ``dim`` is below :func:`negligible_share` of their dtype.

    The gradient of log sum_k w_k is sum_k wt_k d log w_k with wt_k = w_k / sum_j w_j, and the enumerated
    loss sum_y q(y) c(y) weighs each value's terms by q(y). The largest share is at least 1/K, so a term
    whose share is below eps^2 weighs less than K eps^2 against it: below the sum's rounding (eps) by a
    factor K eps (under 10^-5 in float32 for K <= 50), unless its derivative is that many times larger
    than the largest term's. The objectives leave such terms out of their gradients (M2 out of its loss
    too). In float32 their shares would otherwise reach the backward pass as subnormals (below 2^-126),
    which a CPU multiplies several times more slowly (docs/training.md, "Terms of negligible weight").
    A detached boolean tensor of the shape of ``log_weights``.
    """
    log_weights = log_weights.detach()
    log_shares = log_weights - log_weights.logsumexp(dim, keepdim=True)
    return log_shares < math.log(negligible_share(log_weights.dtype))


def _per_point(site: dict, particle_dim: int, kernels: LogDensityKernels) -> torch.Tensor:
    """A site's unscaled log density reduced to shape ``(K or 1, N or 1)``."""
    kernel = kernels.get(type(site["fn"]))
    log_prob = kernel(site["fn"], site["value"]) if kernel else site["fn"].log_prob(site["value"])
    if site["mask"] is not None:
        log_prob = log_prob.masked_fill(~site["mask"], 0.0)
    data_dims = [f.dim for f in site["cond_indep_stack"] if f.name == DATA_PLATE]
    if not data_dims:
        raise ValueError(
            f"Site {site['name']!r} lies outside the plate named {DATA_PLATE!r}, so its density cannot be split "
            "per data point; put every site of the model and guide inside pyro.plate('data', ...)."
        )
    log_prob = log_prob.reshape((1,) * (-particle_dim - log_prob.dim()) + log_prob.shape)
    keep = {log_prob.dim() + particle_dim, log_prob.dim() + data_dims[0]}
    other = [d for d in range(log_prob.dim()) if d not in keep]
    return log_prob.sum(other) if other else log_prob


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Within the block the torch RNG is seeded, and the caller's state is restored after; None leaves it alone.

    ``torch.manual_seed`` reseeds the CPU and every GPU, so every GPU's state is saved and restored.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[None]:
    """Within the block ``module`` is in evaluation mode; after it, in the mode it was in, even on an error."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@contextlib.contextmanager
def parameters_held_fixed(module: torch.nn.Module) -> Iterator[None]:
    """Within the block, ``module``'s parameters are detached copies: what it computes passes no gradient to them.

    ``pyro.module`` does not register a parameter that does not require a
    gradient (and says so while training); the originals stay registered.
    """
    detached = {name: parameter.detach() for name, parameter in module.named_parameters()}
    with stateless._reparametrize_module(module, detached), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was not registered in the param store")
        yield


def latent_sites(trace) -> Iterator[tuple[str, dict]]:
    """(name, site) of a trace's latent sample sites: not observed, not a plate's subsample."""
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site):
            yield name, site


def check_same_latents(guide_trace, model_trace) -> None:
    """Refuse a guide and model whose latent sites differ: log w = log p(x, z) - log q(z | x) needs each z drawn by
    the guide and scored by the model. A guide's extra site adds its entropy to the bound (which can then pass
    log p(x)); a model's extra latent is drawn from its prior and scored without a q."""
    guide_latents = {name for name, _ in latent_sites(guide_trace)}
    model_latents = {name for name, _ in latent_sites(model_trace)}
    if guide_latents != model_latents:
        guide_only, model_only = guide_latents - model_latents, model_latents - guide_latents
        raise ValueError(
            f"The guide and the model must have the same latent sites; the guide's {sorted(guide_only)} are not "
            f"latent in the model, and the model's {sorted(model_only)} are not drawn by the guide. Draw every latent "
            "of the model in the guide under the same name, and no other."
        )


def check_reparameterized_guide(guide, x: torch.Tensor, estimator: str) -> None:
    """Refuse a guide whose latent sites do not all draw by reparameterisation (``rsample``), as
    ``estimator``'s gradient through the draws needs; one trace of ``guide(x)``, before any training."""
    with torch.no_grad():
        trace = poutine.trace(guide).get_trace(x)
    sites = [name for name, site in latent_sites(trace) if not site["fn"].has_rsample]
    if sites:
        raise ValueError(
            f"{estimator} needs a guide whose every latent site is reparameterisable (has rsample); "
            f"{', '.join(repr(name) for name in sites)} {'is' if len(sites) == 1 else 'are'} not. Train with the "
            "'trace' ELBO and its standard gradient, or with the model's default objective."
        )


def check_points_and_batches(x: torch.Tensor, num_samples: int, batch_size: int, samples: str) -> None:
    """Refuse, before any work, an empty ``x`` or fewer than one draw (named ``samples``) or point per batch."""
    whole_number(num_samples, samples)
    whole_number(batch_size, "batch_size")
    if x.shape[0] == 0:
        raise ValueError("x is empty: give at least one data point.")


def site_log_densities(
    model,
    guide,
    *args,
    num_particles: int = 1,
    max_plate_nesting: int = 1,
    kernels: LogDensityKernels | None = None,
    hold_fixed: torch.nn.Module | None = None,
    **kwargs,
) -> SiteLogDensities:
    """Trace the guide with ``num_particles`` vectorised particles, replay the model on them.

    :param max_plate_nesting: how many plates the model nests (the particle
        plate goes one dim further left).
    :param kernels: faster log densities by distribution type, for the evaluators' passes
        (:func:`pyro_vae.accel.bernoulli.log_density_kernels`).
    :param hold_fixed: the module that holds the guide's parameters: log q(z | x)
        is then evaluated with them held fixed, for the path derivative (see the module's docstring).
    :returns: :class:`SiteLogDensities` with tensors of shape ``(num_particles, N)``.
    """
    whole_number(num_particles, "num_particles")
    particle_dim = -max_plate_nesting - 1
    with pyro.plate(PARTICLE_PLATE, num_particles, dim=particle_dim):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        if hold_fixed is not None:
            for _, site in latent_sites(guide_trace):
                site["value"] = site["value"].view_as(site["value"])
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        check_same_latents(guide_trace, model_trace)
        density_trace = guide_trace
        if hold_fixed is not None:
            with parameters_held_fixed(hold_fixed):
                density_trace = poutine.trace(poutine.replay(guide, trace=guide_trace)).get_trace(*args, **kwargs)
    out = SiteLogDensities({}, {}, {})
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            target = out.observed if site["is_observed"] else out.latent_prior
            target[name] = _per_point(site, particle_dim, kernels or {})
    for name, site in latent_sites(density_trace):
        out.latent_guide[name] = _per_point(site, particle_dim, kernels or {})
        out.reparameterized &= bool(guide_trace.nodes[name]["fn"].has_rsample)
        out.draws[name] = (site["value"], site)
    k = num_particles
    n = out.log_weights.shape[-1]
    for group in (out.observed, out.latent_prior, out.latent_guide):
        for name in group:
            group[name] = group[name].expand(k, n)
    return out


@dataclass
class ELBOEstimate:
    """Per-point ELBO and its two terms, each of shape ``(N,)``, in nats."""

    elbo: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor

    def summary(self, prefix: str = "") -> dict[str, float]:
        """Means over the data points, with the standard error of the ELBO's mean."""
        return {
            f"{prefix}elbo": float(self.elbo.mean()),
            f"{prefix}elbo_se": standard_error(self.elbo),
            f"{prefix}reconstruction": float(self.reconstruction.mean()),
            f"{prefix}kl": float(self.kl.mean()),
        }


@torch.no_grad()
def elbo_per_point(
    model, guide, x: torch.Tensor, *, num_particles: int = 1, batch_size: int = 1000, **kwargs
) -> ELBOEstimate:
    """ELBO(x_n) for every data point, averaged over ``num_particles`` draws from the guide."""
    check_points_and_batches(x, num_particles, batch_size, "num_particles")
    parts = []
    for start in range(0, x.shape[0], batch_size):
        d = site_log_densities(model, guide, x[start : start + batch_size], num_particles=num_particles, **kwargs)
        parts.append((d.log_weights.mean(0), d.reconstruction.mean(0), d.kl.mean(0)))
    return ELBOEstimate(*(torch.cat(column) for column in zip(*parts, strict=True)))


def guess_max_plate_nesting(model, guide, *args, **kwargs) -> int:
    """How many plates the model and guide nest, read off one trace."""
    with torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    dims = [
        -frame.dim
        for trace in (guide_trace, model_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims, default=1)
