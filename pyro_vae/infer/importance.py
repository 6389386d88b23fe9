"""The importance-sampled marginal likelihood log p(x) of any Pyro model and guide, with diagnostics.

    log p(x) ~= logsumexp_k [log p(x, z_k) - log q(z_k | x)] - log K,  z_k ~ q(z | x),

a lower bound in expectation that tightens as K grows (Burda, Grosse &
Salakhutdinov, *Importance Weighted Autoencoders*, ICLR 2016). The densities are
the unscaled per-site ones of :mod:`pyro_vae.infer.densities`, so minibatch
scaling and ``poutine.scale`` never leak into the estimate. Each point's
weights are diagnosed by their effective sample size and by the Pareto-k of
their tail (Vehtari et al., *Pareto Smoothed Importance Sampling*).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import torch
from pyro.infer.util import is_validation_enabled
from tqdm.auto import tqdm

from ..accel.bernoulli import log_density_kernels
from ..accel.replay import record
from ..checks import whole_number
from .densities import (
    SiteLogDensities,
    check_points_and_batches,
    guess_max_plate_nesting,
    seeded,
    site_log_densities,
    standard_error,
)

#: Above this Pareto-k an importance-sampled estimate cannot be trusted, however many samples (Vehtari et al.,
#: *Pareto Smoothed Importance Sampling*); fewer than about 2,154 lower it (:func:`pareto_threshold`).
PARETO_THRESHOLD = 0.7
#: K, the importance samples per data point unless told otherwise: the literature's standard since Burda et al.
DEFAULT_NUM_SAMPLES = 5000
#: The fewest weights in a Pareto tail that the fit takes (as in Pyro's psis_diagnostic).
MIN_TAIL = 10


def pareto_k_assessable(num_samples: int) -> bool:
    """Whether K weights have a tail (``_tail_size(K)``, K >= 46) long enough to fit Pareto-k at all."""
    return _tail_size(num_samples) >= MIN_TAIL


def pareto_threshold(num_samples: int) -> float:
    """The Pareto-k above which K importance weights cannot be trusted: min(1 - 1 / log10 K, 0.7) (Vehtari,
    Simpson, Gelman, Yao & Gabry 2024, *Pareto Smoothed Importance Sampling*, JMLR, section 3.2.4). Below
    K = 10^(10/3), about 2,154, a tail of shape k needs more samples than K for a reliable estimate already
    below 0.7: 0.67 at K = 1000, 0.5 at K = 100; 0.7 at the default K = 5000. (Below K = 46 no k is fitted.)"""
    return min(1 - 1 / math.log10(num_samples), PARETO_THRESHOLD) if num_samples > 1 else -math.inf


def untrusted(pareto_k, num_samples: int):
    """Points whose estimate from K = ``num_samples`` importance weights cannot be trusted: Pareto-k above
    :func:`pareto_threshold`, or not assessable (NaN: too few samples). Tensors or arrays."""
    return ~(pareto_k <= pareto_threshold(num_samples))


MIN_REPLAYED_PASSES = 500  # with fewer passes, recording and compiling costs more than the replays save


@dataclass
class MarginalLikelihoodEstimate:
    """Importance-sampled log p(x) per data point, with diagnostics, all of shape ``(N,)``.

    * ``log_px``: logsumexp_k log w_k - log K;
    * ``elbo``, ``reconstruction``, ``kl``: the ELBO and its terms averaged over the same K samples;
    * ``ess``: effective sample size of the normalised weights, (sum_k w_k)^2 / sum_k w_k^2, in [1, K];
    * ``pareto_k``: the Pareto-k of the weights' tail (Vehtari et al., *Pareto Smoothed Importance
      Sampling*): below 0.5 the estimate is reliable, above 0.7 it cannot be trusted. It is -inf when
      the largest weights are all equal (bounded weights) and NaN when K < 46 leaves a tail too short to
      fit (fewer than 10 weights): then it cannot be assessed, and :attr:`unreliable` counts the point.
    """

    log_px: torch.Tensor
    elbo: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor
    ess: torch.Tensor
    pareto_k: torch.Tensor
    num_samples: int

    @property
    def mean(self) -> float:
        return float(self.log_px.mean())

    @property
    def stderr(self) -> float:
        """Standard error of the mean over data points (the spread of log p(x) across the test set)."""
        return standard_error(self.log_px)

    @property
    def unreliable(self) -> torch.Tensor:
        """Points whose Pareto-k exceeds K's threshold, or cannot be assessed: their estimate cannot be trusted."""
        return untrusted(self.pareto_k, self.num_samples)

    def summary(self) -> dict:
        n = self.log_px.numel()
        return {
            "log_px": self.mean,
            "log_px_se": self.stderr,
            "nll": -self.mean,
            "elbo": float(self.elbo.mean()),
            "elbo_se": standard_error(self.elbo),
            "reconstruction": float(self.reconstruction.mean()),
            "kl": float(self.kl.mean()),
            "num_samples": self.num_samples,
            "num_points": n,
            "ess_mean": float(self.ess.mean()),
            "ess_min": float(self.ess.min()),
            "pareto_k_max": float(self.pareto_k.max()),  # NaN where K is too small to assess it
            "num_unreliable": int(self.unreliable.sum()),
            "pareto_threshold": pareto_threshold(self.num_samples),  # the bar num_unreliable counts above
        }


def _tail_size(num_samples: int) -> int:
    """M = ceil(min(0.2 K, 3 sqrt(K))) largest weights form the Pareto tail (as in Pyro's psis_diagnostic)."""
    return math.ceil(min(0.2 * num_samples, 3.0 * math.sqrt(num_samples)))


def fit_generalized_pareto_k(x: torch.Tensor) -> torch.Tensor:
    """The shape k of a generalized Pareto fitted to each row of ``x`` (ascending, positive), shape ``(B, M)``.

    Zhang & Stephens (2009) as in Vehtari et al. (PSIS), batched over rows: the
    same estimator as ``pyro.ops.stats.fit_generalized_pareto``, for many data points at once.
    """
    x = x.double()
    n = x.shape[-1]
    m = 30 + int(math.sqrt(n))
    grid = 1.0 - math.sqrt(m) / (torch.arange(1, m + 1, dtype=torch.double, device=x.device) - 0.5).sqrt()
    b = grid / (3.0 * x[:, int(n / 4 - 0.5)]).unsqueeze(-1) + (1.0 / x[:, -1]).unsqueeze(-1)  # (B, m)
    k = torch.log1p(-b.unsqueeze(-1) * x.unsqueeze(-2)).mean(-1)  # (B, m)
    profile_log_lik = n * (torch.log(-b / k) - (k + 1.0))
    b_hat = (b * torch.softmax(profile_log_lik, -1)).sum(-1)
    k_hat = torch.log1p(-b_hat.unsqueeze(-1) * x).mean(-1)
    return k_hat * n / (n + 10.0) + 5.0 / (n + 10.0)


def _pareto_k(top_log_weights: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Pareto-k per point from its M + 1 largest log weights, shape ``(M + 1, B)`` descending."""
    num_points = top_log_weights.shape[1]
    if not pareto_k_assessable(num_samples):
        return torch.full((num_points,), float("nan"), device=top_log_weights.device)
    lw = (top_log_weights - top_log_weights[0]).double()  # the largest weight becomes 1
    cutoff = lw[-1].clamp(min=math.log(1e-15))
    tail = (lw[:-1].exp() - cutoff.exp()).flip(0).T  # ascending, (B, M)
    k = torch.full((num_points,), -math.inf, dtype=torch.double, device=lw.device)
    # As in Pyro's psis_diagnostic: fewer than MIN_TAIL weights above a cutoff of 1e-15 times the largest
    # means a few samples carry all the weight (k = inf). Largest weights equal up to rounding
    # (spanning less than 1e-3 nats) are bounded: k = -inf. Unlike Pyro, which fits the weights above the
    # cutoff alone, the fit takes all M, those at or below the cutoff as 1e-300, as PSIS without the cutoff
    # would: the two differ on ties with the cutoff and where it is clamped at 1e-15, where a few weights
    # carry all the mass; there Pyro's fit of those few can give a small k, and this one gives k far above 0.7.
    in_tail = (tail > 0).sum(-1)
    flat = -lw[-1] < 1e-3
    k[(in_tail < MIN_TAIL) & ~flat] = math.inf
    fit = (in_tail >= MIN_TAIL) & ~flat
    if fit.any():
        k[fit] = fit_generalized_pareto_k(tail[fit].clamp(min=1e-300))
    return k.float()


class _Accumulator:
    """Streaming statistics over chunks of particles, for one batch of points: memory does not grow with K.

    The Pareto fit needs each point's M + 1 largest log weights. Chunks are
    kept as candidates until they hold several times that many rows, then
    pruned to the largest in one ``topk``. Its cost depends little on how many
    rows it chooses from, so pruning every few chunks costs a fraction of
    pruning each one.
    """

    PRUNE_FACTOR = 4  # prune the candidates when they exceed this many times the M + 1 rows kept

    def __init__(self, num_samples: int):
        self.num_samples, self.tail = num_samples, _tail_size(num_samples) + 1
        self.lse = self.lse2 = None
        self.candidates, self.num_candidates = [], 0
        self.sums = [0.0, 0.0, 0.0]

    def add(self, d: SiteLogDensities) -> None:
        lw = d.log_weights
        chunk_lse, chunk_lse2 = lw.logsumexp(0), (2 * lw).logsumexp(0)
        if self.lse is None:
            self.lse, self.lse2 = chunk_lse, chunk_lse2
        else:
            self.lse, self.lse2 = torch.logaddexp(self.lse, chunk_lse), torch.logaddexp(self.lse2, chunk_lse2)
        self.candidates.append(lw)
        self.num_candidates += lw.shape[0]
        if self.num_candidates > self.PRUNE_FACTOR * self.tail:
            self._prune()
        for i, term in enumerate((lw, d.reconstruction, d.kl)):
            self.sums[i] = self.sums[i] + term.sum(0)

    def _prune(self) -> None:
        """Keep the M + 1 largest candidate log weights of every point, in descending order."""
        merged = torch.cat(self.candidates)
        self.candidates = [merged.topk(min(self.tail, merged.shape[0]), dim=0).values]
        self.num_candidates = self.candidates[0].shape[0]

    def result(self) -> tuple[torch.Tensor, ...]:
        self._prune()
        k = self.num_samples
        log_px = self.lse - math.log(k)
        ess = (2 * self.lse - self.lse2).exp()
        elbo, reconstruction, kl = (total / k for total in self.sums)
        return log_px, elbo, reconstruction, kl, ess, _pareto_k(self.candidates[0], k)


class _Passes:
    """The evaluator's particle passes over one batch shape: eager, or recorded once and replayed compiled."""

    def __init__(self, model, guide, args, kwargs, max_plate_nesting: int, replayed_shape: tuple | None, kernels):
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.max_plate_nesting, self.replayed_shape, self.kernels = max_plate_nesting, replayed_shape, kernels
        self.replay, self.recorded = None, False

    def __call__(self, xb: torch.Tensor, num_particles: int) -> SiteLogDensities:
        if (xb.shape[0], num_particles) != self.replayed_shape:
            return self.eager(xb, num_particles)
        if not self.recorded:
            self.replay = record(lambda data: self.traced(data, num_particles, self.kernels).as_tuple(), xb)
            self.recorded = True
        if self.replay is None:  # the program cannot be recorded
            return self.traced(xb, num_particles, self.kernels)
        return SiteLogDensities(*self.replay(xb))

    def eager(self, xb: torch.Tensor, num_particles: int) -> SiteLogDensities:
        """A pass through Pyro outside the replay: one of another shape than the replayed passes'.

        Where the full passes are replayed, these few do without the compiled kernels: compiling those for
        them would cost seconds (a recording takes the kernels' definitions in, without compiling them).
        """
        return self.traced(xb, num_particles, {} if self.replayed_shape else self.kernels)

    def traced(self, xb: torch.Tensor, num_particles: int, kernels) -> SiteLogDensities:
        """A pass through Pyro with these log-density ``kernels``."""
        return site_log_densities(
            self.model,
            self.guide,
            xb,
            *self.args,
            num_particles=num_particles,
            max_plate_nesting=self.max_plate_nesting,
            kernels=kernels,
            **self.kwargs,
        )


def _check_points(passes: _Passes, x: torch.Tensor, points_per_pass: int) -> None:
    """Pyro's argument and support checks on every point (data outside the likelihood's support raises), by one
    eager particle a point, ``points_per_pass`` points at a time, whose random draws are given back: the
    estimate draws what it draws without the checks. The passes themselves run unchecked, since a recording
    cannot take the checks' decisions on tensor values."""
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []), pyro.validation_enabled(True):
        for start in range(0, x.shape[0], points_per_pass):
            passes.traced(x[start : start + points_per_pass], 1, {})  # no kernels to compile for one pass


@torch.no_grad()
def log_marginal_likelihood(
    model,
    guide,
    x: torch.Tensor,
    *args,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    batch_size: int = 100,
    max_samples_per_pass: int = 4096,
    max_plate_nesting: int | None = None,
    seed: int | None = 0,
    replay: bool | None = None,
    progress: bool = False,
    **kwargs,
) -> MarginalLikelihoodEstimate:
    """Importance-sampled log p(x) for every data point of any Pyro model and guide.

    log p(x_n) ~= logsumexp_k [log p(x_n, z_k) - log q(z_k | x_n)] - log K, z_k ~ q(z | x_n).

    The model and guide must take the data as first argument and put every
    site inside a plate named ``"data"`` over it; they may have several
    latent sites, discrete ones included, as long as the guide samples them.
    The densities are unscaled, so ``poutine.scale`` and minibatch scaling
    leave the answer unchanged.

    Particles are drawn in vectorised chunks (a particle plate left of the
    model's plates) of at most ``max_samples_per_pass`` particle x point
    evaluations, and the statistics are accumulated in a streaming logsumexp,
    so memory does not grow with K. The Bernoulli likelihood's log-density
    runs compiled here where the evaluation is large enough to repay compiling
    (:mod:`pyro_vae.accel.bernoulli`), and the passes over full batches are
    recorded once and replayed compiled (:mod:`pyro_vae.accel.replay`).

    :param num_samples: K, importance samples per data point (:data:`DEFAULT_NUM_SAMPLES`).
    :param batch_size: data points per batch.
    :param max_samples_per_pass: the most particle x point evaluations in one vectorised pass (at least one
        particle a pass, whatever the batch).
    :param seed: makes the estimate deterministic (the caller's RNG state is left untouched); None uses the global RNG.
        The points draw their particles from one stream, batch after batch and chunk after chunk, so another
        ``batch_size``, ``max_samples_per_pass`` or order of the points gives other draws: another estimate of
        the same quantity, which differs within its standard error.
    :param replay: record the pass over a full batch and chunk of particles and replay it compiled. None
        does so when there are at least ``MIN_REPLAYED_PASSES`` such passes; False always runs Pyro, for
        programs whose Python reads state that changes between calls.
    :returns: :class:`MarginalLikelihoodEstimate`.
    """
    check_points_and_batches(x, num_samples, batch_size, "num_samples")
    whole_number(max_samples_per_pass, "max_samples_per_pass")
    full_chunk = max(1, min(num_samples, max_samples_per_pass // batch_size))
    replayed_passes = (x.shape[0] // batch_size) * (num_samples // full_chunk)
    if replay is None:
        replay = replayed_passes >= MIN_REPLAYED_PASSES
    if max_plate_nesting is None:
        with seeded(seed):  # its draws are discarded; the estimate's draws start from the seed
            max_plate_nesting = guess_max_plate_nesting(model, guide, x[:batch_size], *args, **kwargs)
    replayed_shape = (batch_size, full_chunk) if replay else None
    kernels = log_density_kernels(x.numel() * num_samples)
    passes = _Passes(model, guide, args, kwargs, max_plate_nesting, replayed_shape, kernels)
    if is_validation_enabled():
        _check_points(passes, x, max_samples_per_pass)
    with seeded(seed), pyro.validation_enabled(False):
        results = []
        batches = range(0, x.shape[0], batch_size)
        for start in tqdm(batches, desc=f"log p(x), K={num_samples}", disable=not progress, leave=False):
            xb = x[start : start + batch_size]
            chunk = max(1, min(num_samples, max_samples_per_pass // xb.shape[0]))
            stats = _Accumulator(num_samples)
            for done in range(0, num_samples, chunk):
                stats.add(passes(xb, min(chunk, num_samples - done)))
            results.append(stats.result())
    columns = [torch.cat([r[i].cpu() for r in results]) for i in range(6)]
    return MarginalLikelihoodEstimate(*columns, num_samples=num_samples)
