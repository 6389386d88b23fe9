"""Annealed importance sampling (AIS) of log p(x) from the guide, and bidirectional Monte Carlo bounds.

AIS (Neal, *Annealed Importance Sampling*, 2001) in the form Wu, Burda,
Salakhutdinov & Grosse (*On the Quantitative Analysis of Decoder-Based
Generative Models*, ICLR 2017) use for VAEs ("AIS + encoder"): for every
data point x, C independent chains start from the guide, z_0 ~ q(z | x), and
follow the geometric path

    f_t(z) = q(z | x)^(1 - beta_t) p(x, z)^beta_t,   0 = beta_0 < beta_1 < ... < beta_T = 1,

with one Hamiltonian Monte Carlo transition (L leapfrog steps) that leaves
f_t invariant at every step. Each chain's log weight

    log w = sum_{t=1}^T (beta_t - beta_{t-1}) [log p(x, z_{t-1}) - log q(z_{t-1} | x)]

has E[w] = p(x), so log p(x) ~= logmeanexp over the chains of log w, a
stochastic lower bound (Jensen) that tightens as T grows. With
``start="prior"`` the chains start from p(z) instead (f_0 = p(z)).

Bidirectional Monte Carlo (Grosse, Ghahramani & Adams, *Sandwiching the
marginal likelihood using bidirectional Monte Carlo*, 2015): on data
simulated from the model, (z, x) ~ p(z) p(x | z), z is an exact posterior
sample for x. AIS run in reverse from it, from beta = 1 down to 0, gives
log w_rev with E[w_rev] = 1 / p(x), so -logmeanexp(log w_rev) is a
stochastic *upper* bound. The gap between the two bounds bounds, in
expectation, the error of AIS at those settings *on data simulated from the
model*. Carrying the bound over to real test points assumes that their
posteriors are no harder than those of simulated points, as they are when
the model fits the data; Grosse et al. and Wu et al. state the same caveat.

Latent sites with constrained supports are moved to the reals through
``torch.distributions.biject_to`` with the log-Jacobian added; a discrete
latent site is refused. The densities are the unscaled per-site ones of
:mod:`pyro_vae.infer.densities`, so plate scaling and ``poutine.scale``
never change the answer. Every point and chain runs at once (a particle
plate of chains left of the model's plates).

The leapfrog step size is adapted per data point towards a target acceptance
rate from :data:`PILOT_CHAINS` pilot chains that run beside the C chains
along the same path and whose weights are dropped. The C chains' transitions
then depend on nothing that they themselves drew: given the pilots, each
chain follows a fixed sequence of HMC kernels, and E[w] = p(x) (forward) and
E[w_rev] = 1 / p(x) (reverse) hold exactly at any T. The reverse pilots start
from the forward pilots' last states, not from the simulated z that the
reverse chains start from, so that they too are independent of the chains. Adapting from the
chains' own acceptances, as Wu et al.'s code does, would make each
transition depend on the chain's past and leave both bounds exact only in a
limit that a finite schedule never reaches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to, constraints
from tqdm.auto import tqdm

from ..accel.bernoulli import log_density_kernels
from ..checks import whole_number
from .densities import (
    PARTICLE_PLATE,
    _per_point,
    check_points_and_batches,
    check_same_latents,
    guess_max_plate_nesting,
    latent_sites,
    log_mean_exp,
    seeded,
    standard_error,
)
from .importance import log_marginal_likelihood, untrusted

SCHEDULES = ("sigmoid", "linear")
DEFAULT_SCHEDULE = "sigmoid"
REVERSE_SEED_OFFSET = 1_000_003  # BDMC's reverse batches draw streams apart from the forward ones
#: The default settings, checked against quadrature on a trained 2-D VAE (tests/test_ais.py) and by BDMC on
#: the default training run (benchmarks/RESULTS.md).
DEFAULT_STEPS, DEFAULT_CHAINS, DEFAULT_LEAPFROG_STEPS = 400, 16, 2
#: BDMC's points simulated from the model unless told otherwise.
DEFAULT_BDMC_POINTS = 1000
STARTS = ("guide", "prior")
#: Chains per point that adapt the step size and carry no weight (see the module docstring).
PILOT_CHAINS = 4


#: delta of the sigmoidal schedule (:func:`beta_schedule`).
SIGMOID_DELTA = 4.0


def beta_schedule(num_steps: int, kind: str = DEFAULT_SCHEDULE) -> torch.Tensor:
    """beta_0 = 0 < ... < beta_T = 1 (float64): linear, or sigmoidal, dense near both ends.

    Linear: beta_t = t / T. Sigmoidal (Grosse, Ghahramani & Adams, *Sandwiching the marginal likelihood
    using bidirectional Monte Carlo*, 2015, followed by Wu et al. 2017): s_t = sigmoid(delta (2 t / T - 1))
    and beta_t = (s_t - s_0) / (s_T - s_0), with delta = :data:`SIGMOID_DELTA`.
    """
    if num_steps < 1:
        raise ValueError(f"AIS needs num_steps >= 1; got {num_steps}.")
    if kind not in SCHEDULES:
        raise ValueError(f"Unknown schedule {kind!r}; choose one of {SCHEDULES}.")
    t = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    if kind == "linear":
        return t
    s = torch.sigmoid(SIGMOID_DELTA * (2 * t - 1))
    return (s - s[0]) / (s[-1] - s[0])


@dataclass
class AISEstimate:
    """Per-point AIS results, each of shape ``(N,)`` unless said otherwise.

    * ``log_px``: logmeanexp over the chains of the chains' log weights (a lower bound in expectation);
    * ``chain_log_weights``: every chain's log weight, shape ``(C, N)``;
    * ``chain_std``: the spread of the log weights across chains;
    * ``acceptance``: the HMC acceptance rate, averaged over steps and the C chains (not the pilots);
    * ``step_size``: the adapted leapfrog step size at the end;
    * ``is_log_px``, ``is_pareto_k``: the importance-sampling estimate of the same points, for comparison
      (None when not asked for), from ``is_num_samples`` weights a point.
    """

    log_px: torch.Tensor
    chain_log_weights: torch.Tensor
    acceptance: torch.Tensor
    step_size: torch.Tensor
    settings: dict
    is_log_px: torch.Tensor | None = None
    is_pareto_k: torch.Tensor | None = None
    is_num_samples: int = 0

    @property
    def chain_std(self) -> torch.Tensor:
        return self.chain_log_weights.std(0) if self.chain_log_weights.shape[0] > 1 else torch.zeros_like(self.log_px)

    @property
    def mean(self) -> float:
        return float(self.log_px.mean())

    @property
    def stderr(self) -> float:
        return standard_error(self.log_px)

    def summary(self) -> dict:
        out = ais_summary(self.log_px, self.chain_std, self.acceptance, self.step_size, self.settings)
        if self.is_log_px is not None:
            diff = self.log_px - self.is_log_px
            out.update(
                is_log_px=float(self.is_log_px.mean()),
                ais_minus_is=float(diff.mean()),
                ais_minus_is_se=standard_error(diff),
                is_num_unreliable=int(untrusted(self.is_pareto_k, self.is_num_samples).sum()),
            )
        return out


def ais_summary(log_px, chain_std, acceptance, step_size, settings: dict) -> dict:
    """The summary of per-point AIS results (tensors or arrays): the mean estimate and the chains' diagnostics."""
    log_px, chain_std, acceptance, step_size = (torch.as_tensor(v) for v in (log_px, chain_std, acceptance, step_size))
    return {
        "log_px": float(log_px.mean()),
        "log_px_se": standard_error(log_px),
        "nll": -float(log_px.mean()),
        "num_points": log_px.numel(),
        "chain_std_mean": float(chain_std.mean()),
        "acceptance_mean": float(acceptance.mean()),
        "step_size_median": float(step_size.double().quantile(0.5)),  # the middle two's mean, as numpy's
        **{f"ais_{key}": value for key, value in {**settings, "pilot_chains": PILOT_CHAINS}.items()},
    }


class _LatentSpace:
    """The latent sites of a guide, moved to the reals: unconstrained values <-> site values, with log-Jacobians."""

    def __init__(self, guide_trace):
        self.sites = {}
        for name, site in latent_sites(guide_trace):
            fn = site["fn"]
            support = fn.support
            if support.is_discrete:
                raise ValueError(
                    f"AIS needs continuous latent sites, but the guide's site {name!r} is discrete ({support}). "
                    "Sum it out of the model (ais_log_marginal_likelihood_by_label does for a class label y), or "
                    "estimate log p(x) by importance sampling (method 'is')."
                )
            self.sites[name] = (biject_to(support), fn.event_dim)
        if not self.sites:
            raise ValueError("The guide has no latent sample site; there is nothing to anneal.")

    def unconstrain(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: transform.inv(values[name]) for name, (transform, _) in self.sites.items()}

    def constrain(self, u: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Site values from unconstrained ones, and sum of log |det Jacobian| per (chain, point)."""
        values, log_det = {}, 0.0
        for name, (transform, event_dim) in self.sites.items():
            values[name] = transform(u[name])
            if transform is not biject_to(constraints.real):
                jac = transform.log_abs_det_jacobian(u[name], values[name])
                extra = event_dim - (u[name].dim() - jac.dim())  # dims the Jacobian did not sum
                log_det = log_det + (jac.sum(list(range(-extra, 0))) if extra > 0 else jac)
        return values, log_det


class _Densities:
    """log q(z | x) and log p(x, z) per (chain, point) at given latent values, unscaled.

    The likelihood's compiled kernels serve batches whose annealing evaluates enough elements to repay
    compiling them (:func:`~pyro_vae.accel.bernoulli.log_density_kernels`): the batch's ``x.numel()`` times
    C chains and the :data:`PILOT_CHAINS` times T steps of L leapfrog steps.
    """

    def __init__(self, model, guide, x, args, kwargs, settings: dict, max_plate_nesting: int):
        self.model, self.guide, self.x, self.args, self.kwargs = model, guide, x, args, kwargs
        self.num_chains, self.particle_dim = settings["num_chains"] + PILOT_CHAINS, -max_plate_nesting - 1
        evaluations = self.num_chains * settings["num_steps"] * settings["leapfrog_steps"]
        self.kernels = log_density_kernels(x.numel() * evaluations)

    def _plate(self):
        return pyro.plate(PARTICLE_PLATE, self.num_chains, dim=self.particle_dim)

    def trace_guide(self):
        """One draw of the guide for every chain and point, as a trace."""
        with torch.no_grad(), self._plate():
            return poutine.trace(self.guide).get_trace(self.x, *self.args, **self.kwargs)

    def draw_guide(self) -> dict[str, torch.Tensor]:
        """The values of a fresh draw of the guide (:meth:`trace_guide`), by site."""
        trace = self.trace_guide()
        return {name: site["value"] for name, site in trace.nodes.items() if site["type"] == "sample"}

    def __call__(self, values: dict[str, torch.Tensor], prior_start: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(log f_0, log p(x, z)): f_0 is q(z | x), or p(z) when the chains start from the prior."""
        with self._plate():
            model_trace = poutine.trace(poutine.condition(self.model, data=values)).get_trace(
                self.x, *self.args, **self.kwargs
            )
        shape = (self.num_chains, self.x.shape[0])
        log_p = log_prior = torch.zeros(shape, device=self.x.device)
        for name, site in model_trace.nodes.items():
            if site["type"] == "sample" and not site_is_subsample(site):
                term = _per_point(site, self.particle_dim, self.kernels)
                log_p = log_p + term
                if name in values:
                    log_prior = log_prior + term
        if prior_start:
            return log_prior.expand(shape), log_p.expand(shape)
        with self._plate():
            guide_trace = poutine.trace(poutine.condition(self.guide, data=values)).get_trace(
                self.x, *self.args, **self.kwargs
            )
        log_q = torch.zeros(shape, device=self.x.device)
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and name in values:
                log_q = log_q + _per_point(site, self.particle_dim, {})
        return log_q.expand(shape), log_p.expand(shape)


@dataclass
class _State:
    """The chains at one point of their path: unconstrained values, log f_0 and log p(x, z) (with the
    log-Jacobian) per (chain, point), and the gradients of both in u.

    Keeping the two gradients apart lets the next transition, at another beta, start from
    (1 - beta) grad log f_0 + beta grad log p without evaluating the densities again.
    """

    u: dict[str, torch.Tensor]
    log_f0: torch.Tensor
    log_p: torch.Tensor
    grad_f0: dict[str, torch.Tensor]
    grad_p: dict[str, torch.Tensor]

    def log_f(self, beta: float) -> torch.Tensor:
        return (1 - beta) * self.log_f0 + beta * self.log_p

    def grad(self, beta: float) -> dict[str, torch.Tensor]:
        return {name: (1 - beta) * self.grad_f0[name] + beta * self.grad_p[name] for name in self.u}

    def where(self, accept: torch.Tensor, other: _State) -> _State:
        """This state where ``accept`` (per chain and point) holds, ``other`` elsewhere."""
        pick = lambda new, old: torch.where(_align(accept, new), new, old)  # noqa: E731
        pick_all = lambda new, old: {name: pick(new[name], old[name]) for name in new}  # noqa: E731
        return _State(
            pick_all(self.u, other.u),
            pick(self.log_f0, other.log_f0),
            pick(self.log_p, other.log_p),
            pick_all(self.grad_f0, other.grad_f0),
            pick_all(self.grad_p, other.grad_p),
        )


class _Annealer:
    """The chains of one batch of points: HMC transitions along the path, and the weights they carry."""

    def __init__(self, space: _LatentSpace, densities: _Densities, prior_start: bool, leapfrog_steps: int):
        self.space, self.densities = space, densities
        self.prior_start, self.leapfrog_steps = prior_start, leapfrog_steps
        self.validate = is_validation_enabled()

    def evaluate(self, u: dict[str, torch.Tensor]) -> _State:
        """log f_0 and log p(x, z), both with the log-Jacobian, and their gradients in u.

        Pyro's argument and support checks run on the first evaluation only: a leapfrog trajectory that
        diverges may leave the support in floating point (exp(u) = 0), and its energy is then not finite,
        which rejects the proposal, as it should.
        """
        u = {name: value.detach().requires_grad_(True) for name, value in u.items()}
        validate, self.validate = self.validate, False
        with torch.enable_grad(), pyro.validation_enabled(validate):
            values, log_det = self.space.constrain(u)
            log_f0, log_p = self.densities(values, self.prior_start)
            log_f0, log_p = log_f0 + log_det, log_p + log_det
            leaves = list(u.values())
            grad_f0 = torch.autograd.grad(log_f0.sum(), leaves, retain_graph=True, allow_unused=True)
            grad_p = torch.autograd.grad(log_p.sum(), leaves, allow_unused=True)
        gradients = lambda grads: {  # noqa: E731
            name: torch.zeros_like(value) if g is None else g for (name, value), g in zip(u.items(), grads, strict=True)
        }
        detached = {name: value.detach() for name, value in u.items()}
        return _State(detached, log_f0.detach(), log_p.detach(), gradients(grad_f0), gradients(grad_p))

    def transition(self, state: _State, beta: float, step_size: torch.Tensor) -> tuple[_State, torch.Tensor]:
        """One HMC transition leaving f_beta invariant: the new state and the acceptance probability.

        Hamiltonian Monte Carlo (Neal, *MCMC using Hamiltonian dynamics*, 2011) on the unconstrained u with
        H(u, m) = -log f_beta(u) + |m|^2 / 2, m ~ N(0, I): L leapfrog steps of size epsilon,
        m <- m + epsilon/2 grad log f_beta(u), u <- u + epsilon m, m <- m + epsilon/2 grad log f_beta(u),
        then the proposal is accepted with probability min(1, exp(H_0 - H_1)).
        It takes L evaluations of the densities: the gradient at the start is the previous state's.
        """
        # each chain's step size jittered by up to 50%, so that no trajectory length resonates with the
        # target's periods (which on a Gaussian can bring a trajectory back to where it started)
        step_size = _align(step_size, state.log_f0) * (0.5 + torch.rand_like(state.log_f0))
        momentum = {name: torch.randn_like(value) for name, value in state.u.items()}
        kinetic = lambda m: sum(v.pow(2).reshape(*v.shape[:2], -1).sum(-1) for v in m.values()) / 2  # noqa: E731
        h0 = -state.log_f(beta) + kinetic(momentum)
        grad = state.grad(beta)
        position = state.u
        p = {name: m + _align(step_size, m) / 2 * grad[name] for name, m in momentum.items()}
        for step in range(self.leapfrog_steps):
            position = {name: value + _align(step_size, value) * p[name] for name, value in position.items()}
            proposal = self.evaluate(position)
            grad = proposal.grad(beta)
            scale = 1.0 if step + 1 < self.leapfrog_steps else 0.5
            p = {name: m + scale * _align(step_size, m) * grad[name] for name, m in p.items()}
        log_accept = log_acceptance(h0, -proposal.log_f(beta) + kinetic(p))
        accept = torch.rand_like(log_accept).log() < log_accept
        return proposal.where(accept, state), log_accept.exp()


def log_acceptance(h0: torch.Tensor, h1: torch.Tensor) -> torch.Tensor:
    """Metropolis' log min(1, exp(H_0 - H_1)), and -inf where the proposal's energy H_1 is NaN or +inf (outside the
    support), so that no uniform draw accepts it: log(0) = -inf is not below -inf."""
    return (h0 - h1).nan_to_num(nan=-math.inf, neginf=-math.inf).clamp(max=0.0)


def _align(t: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A per-point ``(N,)`` or per-chain-and-point ``(C, N)`` tensor, shaped to broadcast against ``(C, N, ...)``."""
    if t.dim() == 1:
        t = t.unsqueeze(0)
    return t.reshape(t.shape + (1,) * (value.dim() - t.dim()))


def _anneal(annealer: _Annealer, u, betas, step_size, target_acceptance, progress_bar):
    """Run the path forwards (betas increasing) or backwards from ``u``, whose last :data:`PILOT_CHAINS`
    chains are the pilots; returns the other chains' log weights and acceptance rate, the step size, and
    the pilots' last states (unconstrained, by site)."""
    num_chains, n = next(iter(u.values())).shape[:2]
    weighted = num_chains - PILOT_CHAINS
    device = step_size.device
    log_w = torch.zeros(weighted, n, dtype=torch.float64, device=device)
    accepted = torch.zeros(n, dtype=torch.float64, device=device)
    state = annealer.evaluate(u)
    for t in range(1, len(betas)):
        increment = (state.log_p - state.log_f0)[:weighted]  # at the state before the step
        log_w += (betas[t] - betas[t - 1]) * increment.double()
        state, accept = annealer.transition(state, float(betas[t]), step_size)
        accepted += accept[:weighted].mean(0).double()
        # per point, from the pilots alone, towards the target acceptance rate: log epsilon moves by
        # 0.5 (rate - target), less than 0.5 a step
        step_size = step_size * torch.exp(0.5 * (accept[weighted:].mean(0) - target_acceptance))
        progress_bar.update(1)
    pilots = {name: value[weighted:] for name, value in state.u.items()}
    return log_w, accepted / (len(betas) - 1), step_size, pilots


def _check_settings(num_steps, num_chains, leapfrog_steps, step_size, target_acceptance, schedule, start, batch_size):
    counts = {"num_steps": num_steps, "num_chains": num_chains, "leapfrog_steps": leapfrog_steps,
              "batch_size": batch_size}  # fmt: skip
    for name, value in counts.items():
        whole_number(value, name)
    checks = [
        (step_size > 0 and math.isfinite(step_size), f"step_size must be > 0; got {step_size}"),
        (0 < target_acceptance < 1, f"target_acceptance must lie in (0, 1); got {target_acceptance}"),
        (schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}; got {schedule!r}"),
        (start in STARTS, f"start must be one of {STARTS}; got {start!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message + ".")


def ais_log_marginal_likelihood(
    model,
    guide,
    x: torch.Tensor,
    *args,
    num_steps: int = DEFAULT_STEPS,
    num_chains: int = DEFAULT_CHAINS,
    leapfrog_steps: int = DEFAULT_LEAPFROG_STEPS,
    step_size: float = 0.05,
    target_acceptance: float = 0.65,
    schedule: str = DEFAULT_SCHEDULE,
    start: str = "guide",
    batch_size: int = 100,
    max_plate_nesting: int | None = None,
    compare_is_samples: int = 0,
    seed: int | None = 0,
    progress: bool = False,
    **kwargs,
) -> AISEstimate:
    """log p(x) per data point by annealed importance sampling from the guide (see the module docstring).

    :param num_steps: T, intermediate distributions (HMC transitions) per chain.
    :param num_chains: C, independent chains per point.
    :param leapfrog_steps: L, leapfrog steps per HMC transition.
    :param step_size: initial leapfrog step size, then adapted per point.
    :param target_acceptance: the acceptance rate the step size is adapted towards.
    :param schedule: ``"sigmoid"`` or ``"linear"`` spacing of beta.
    :param start: ``"guide"`` (q(z | x), Wu et al.'s AIS + encoder) or ``"prior"`` (p(z)).
    :param batch_size: points annealed at once (memory grows with ``batch_size * (num_chains + PILOT_CHAINS)``).
    :param compare_is_samples: K of an importance-sampling estimate of the same points; 0 skips it.
    :param seed: makes the estimate deterministic (each batch is seeded on its own, so a batch's result does
        not depend on the others); None uses the global RNG.
    """
    _check_settings(num_steps, num_chains, leapfrog_steps, step_size, target_acceptance, schedule, start, batch_size)
    whole_number(compare_is_samples, "compare_is_samples", minimum=0, note="(0 skips it)")
    check_points_and_batches(x, num_chains, batch_size, "num_chains")
    if max_plate_nesting is None:
        with seeded(seed):  # one trace, drawn without touching the caller's RNG
            max_plate_nesting = guess_max_plate_nesting(model, guide, x[:batch_size], *args, **kwargs)
    _check_one_plate(max_plate_nesting)
    settings = _settings(num_steps, num_chains, leapfrog_steps, schedule, start, target_acceptance)
    betas = beta_schedule(num_steps, schedule)
    results = []
    batches = range(0, x.shape[0], batch_size)
    with tqdm(total=len(batches) * num_steps, desc="AIS", disable=not progress, leave=False) as bar:
        for index, begin in enumerate(batches):
            with seeded(None if seed is None else seed + index):
                results.append(
                    _forward_batch(
                        model,
                        guide,
                        x[begin : begin + batch_size],
                        args,
                        kwargs,
                        betas,
                        settings,
                        step_size,
                        max_plate_nesting,
                        bar,
                    )[:3]  # fmt: skip
                )
    log_w, acceptance, final_step = (torch.cat(column, dim=-1).cpu() for column in zip(*results, strict=True))
    estimate = AISEstimate(log_mean_exp(log_w).float(), log_w, acceptance, final_step, settings)
    if compare_is_samples:
        is_estimate = log_marginal_likelihood(
            model, guide, x, *args, num_samples=compare_is_samples, seed=seed, max_plate_nesting=max_plate_nesting,
            **kwargs,
        )  # fmt: skip
        estimate.is_log_px, estimate.is_pareto_k = is_estimate.log_px, is_estimate.pareto_k
        estimate.is_num_samples = compare_is_samples
    return estimate


def ais_log_marginal_likelihood_by_label(
    model, guide, x: torch.Tensor, num_classes: int, *, batch_size: int = 100, seed: int | None = 0, **ais
) -> AISEstimate:
    """log p(x) = log sum_y p(x, y) for a model with a discrete label y, each p(x, y) by AIS with y given.

    For Kingma et al.'s (2014) M2 and M1+M2: ``model(x, y=...)`` and ``guide(x, y=...)`` take
    the label as the keyword ``y`` (class indices, one per point); given y, every latent site is
    continuous and the chains anneal from q(z | x, y) to p(z | x, y), and their log weights include
    log p(y), the observed site. For every chain index j, w_j = sum_y w_{y, j} is an unbiased estimate
    of p(x), as each w_{y, j} is of p(x, y); so :attr:`AISEstimate.chain_log_weights` holds log w_j,
    shape ``(C, N)``, and ``log_px`` is their logmeanexp, a stochastic lower bound as before.
    ``acceptance`` and ``step_size`` are averaged over the labels.

    Every label of a point is annealed in the same vectorised pass: a point is ``num_classes`` rows
    (the point with each label), and ``batch_size`` counts rows, so memory grows with
    ``batch_size * (num_chains + PILOT_CHAINS)`` as for :func:`ais_log_marginal_likelihood`, to which
    ``ais`` (its keyword settings) is passed; a batch holds ``batch_size // num_classes`` points (at least
    one). ``seed`` seeds the whole estimate, whose batches draw one stream in turn.
    """
    whole_number(num_classes, "num_classes", minimum=2)
    if ais.get("compare_is_samples"):
        raise ValueError(
            "compare_is_samples would compare each label's AIS with importance sampling given that label; "
            "estimate log p(x) by pv.log_marginal_likelihood (which draws y from the guide) and compare the two."
        )
    check_points_and_batches(x, ais.get("num_chains", DEFAULT_CHAINS), batch_size, "num_chains")
    _check_label_count(model, x, num_classes, seed)
    points = max(1, batch_size // num_classes)
    labels = torch.arange(num_classes, device=x.device)
    chains, acceptance, step_size = [], [], []
    with seeded(seed):
        for begin in range(0, x.shape[0], points):
            xb = x[begin : begin + points]
            n = xb.shape[0]
            rows = xb.repeat(num_classes, *(1,) * (xb.dim() - 1))  # label-major: every point with label 0, ...
            estimate = ais_log_marginal_likelihood(
                model, guide, rows, y=labels.repeat_interleave(n), batch_size=rows.shape[0], seed=None, **ais
            )
            split = (num_classes, n)  # rows back to (label, point)
            chains.append(estimate.chain_log_weights.unflatten(-1, split).logsumexp(-2))
            acceptance.append(estimate.acceptance.unflatten(-1, split).mean(-2))
            step_size.append(estimate.step_size.unflatten(-1, split).mean(-2))
    chain_log_weights = torch.cat(chains, dim=-1)
    log_px = log_mean_exp(chain_log_weights).float()
    return AISEstimate(log_px, chain_log_weights, torch.cat(acceptance), torch.cat(step_size), estimate.settings)


def _check_label_count(model, x, num_classes: int, seed: int | None) -> None:
    """Refuse a ``num_classes`` other than the number of values of the model's label site ``y`` (traced once
    with the first point and label 0), which would sum p(x, y) over only some labels, or over labels that
    the model does not have."""
    with seeded(seed), torch.no_grad():
        trace = poutine.trace(model).get_trace(x[:1], y=torch.zeros(1, dtype=torch.long, device=x.device))
    site = trace.nodes.get("y")
    if site is None or site["type"] != "sample" or not site["fn"].has_enumerate_support:
        return
    count = site["fn"].enumerate_support(expand=False).shape[0]
    if count != num_classes:
        raise ValueError(
            f"num_classes={num_classes}, but the model's label site 'y' takes {count} values; give "
            f"num_classes={count}, so that log p(x) = log sum_y p(x, y) sums over every label."
        )


def _settings(num_steps, num_chains, leapfrog_steps, schedule, start, target_acceptance) -> dict:
    """The settings an estimate records, by name."""
    return {
        "num_steps": num_steps,
        "num_chains": num_chains,
        "leapfrog_steps": leapfrog_steps,
        "schedule": schedule,
        "start": start,
        "target_acceptance": target_acceptance,
        "pilot_chains": PILOT_CHAINS,
    }


def _check_one_plate(max_plate_nesting: int) -> None:
    if max_plate_nesting != 1:
        raise ValueError(
            f"AIS takes models whose sites lie in the one plate 'data' (max_plate_nesting = 1); this one nests "
            f"{max_plate_nesting}. Estimate its log p(x) by importance sampling (method 'is')."
        )


def _densities_and_space(model, guide, xb, args, kwargs, settings, max_plate_nesting):
    """The densities of a batch's chains (pilots included) and the guide's latent space, which must be the model's
    (:func:`~pyro_vae.infer.densities.check_same_latents`: a model's latent that the chains do not move would be
    drawn afresh at every density, a guide's site that the model does not score would add to every weight)."""
    densities = _Densities(model, guide, xb, args, kwargs, settings, max_plate_nesting)
    guide_trace = densities.trace_guide()
    with torch.no_grad(), densities._plate():
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(xb, *args, **kwargs)
    check_same_latents(guide_trace, model_trace)
    return densities, _LatentSpace(guide_trace)


def _run_chains(densities, space, u, betas, settings, step_size, bar, prior_start=False):
    """Anneal the chains from ``u`` (unconstrained values by site, one per chain and point, the pilots last)
    along ``betas``; as :func:`_anneal`."""
    annealer = _Annealer(space, densities, prior_start, settings["leapfrog_steps"])
    step = torch.full((densities.x.shape[0],), float(step_size), device=densities.x.device)
    return _anneal(annealer, u, betas, step, settings["target_acceptance"], bar)


def _forward_batch(model, guide, xb, args, kwargs, betas, settings, step_size, max_plate_nesting, bar):
    densities, space = _densities_and_space(model, guide, xb, args, kwargs, settings, max_plate_nesting)
    prior_start = settings["start"] == "prior"
    if prior_start:
        with torch.no_grad(), densities._plate():
            trace = poutine.trace(model).get_trace(xb, *args, **kwargs)
        values = {name: trace.nodes[name]["value"] for name in space.sites}
    else:
        values = densities.draw_guide()
    u = space.unconstrain({name: values[name] for name in space.sites})
    return _run_chains(densities, space, u, betas, settings, step_size, bar, prior_start)


@dataclass
class BDMCEstimate:
    """Sandwich bounds of log p(x) per simulated point, each of shape ``(N,)``.

    ``lower`` is forward AIS, ``upper`` is reverse AIS from the exact posterior sample; ``gap = upper - lower``.
    """

    lower: torch.Tensor
    upper: torch.Tensor
    x: torch.Tensor
    settings: dict

    @property
    def gap(self) -> torch.Tensor:
        return self.upper - self.lower

    def summary(self) -> dict:
        """The mean bounds and gap with their standard errors over the points (the gap's is the paired one),
        the largest gap, and how many points have a negative gap (noise: each bound holds only in
        expectation)."""
        return {
            "bdmc_lower": float(self.lower.mean()),
            "bdmc_lower_se": standard_error(self.lower),
            "bdmc_upper": float(self.upper.mean()),
            "bdmc_upper_se": standard_error(self.upper),
            "bdmc_gap_mean": float(self.gap.mean()),
            "bdmc_gap_se": standard_error(self.gap),
            "bdmc_gap_max": float(self.gap.max()),
            "bdmc_num_negative_gaps": int((self.gap < 0).sum()),
            "bdmc_num_points": self.lower.numel(),
            **{f"ais_{key}": value for key, value in self.settings.items()},
        }


def simulate(model, num_points: int, *args, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(x, latent values) drawn from the model p(z) p(x | z): z is an exact posterior sample for its x."""
    with torch.no_grad():
        trace = poutine.trace(model).get_trace(None, *args, batch_size=num_points, **kwargs)
    latents = {name: site["value"] for name, site in latent_sites(trace)}
    observed = [site["value"] for site in trace.nodes.values() if site["type"] == "sample" and site["is_observed"]]
    x = trace.nodes["x"]["value"] if "x" in trace.nodes else observed[0]
    return x, latents


class BDMC:
    """Bidirectional Monte Carlo on ``num_points`` points simulated from the model, batch by batch.

    The model must draw data when called with ``x=None`` and ``batch_size=N`` (the convention of
    :class:`pyro_vae.VAE`). The points are simulated at once, seeded by ``seed``; :meth:`bounds`
    gives the lower and upper bound of one batch, seeded by its index alone, so a batch's
    result never depends on which others were computed (an interrupted evaluation can go on
    where it stopped and give the same numbers). The forward chains start from the guide; the
    reverse chains start from the simulated z, an exact sample of p(z | x), and anneal from
    beta = 1 to 0. :func:`bdmc` runs every batch.
    """

    def __init__(
        self,
        model,
        guide,
        num_points: int = DEFAULT_BDMC_POINTS,
        *args,
        num_steps: int = DEFAULT_STEPS,
        num_chains: int = DEFAULT_CHAINS,
        leapfrog_steps: int = DEFAULT_LEAPFROG_STEPS,
        step_size: float = 0.05,
        target_acceptance: float = 0.65,
        schedule: str = DEFAULT_SCHEDULE,
        batch_size: int = 100,
        seed: int | None = 0,
        **kwargs,
    ):
        _check_settings(
            num_steps, num_chains, leapfrog_steps, step_size, target_acceptance, schedule, "guide", batch_size
        )
        whole_number(num_points, "num_points")
        self.model, self.guide, self.args, self.kwargs, self.seed = model, guide, args, kwargs, seed
        self.step_size, self.batch_size = step_size, batch_size
        self.settings = _settings(num_steps, num_chains, leapfrog_steps, schedule, "guide", target_acceptance)
        with seeded(seed):
            self.x, self.latents = simulate(model, num_points, *args, **kwargs)
        with seeded(seed):
            self.max_plate_nesting = guess_max_plate_nesting(model, guide, self.x[:batch_size], *args, **kwargs)
        _check_one_plate(self.max_plate_nesting)
        #: The first point of every batch.
        self.batches = range(0, num_points, batch_size)

    def bounds(self, index: int, bar=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The (lower, upper) bounds of batch ``index``, each of shape ``(batch,)``; ``bar`` counts the steps."""
        bar = tqdm(disable=True) if bar is None else bar
        begin = self.batches[index]
        xb = self.x[begin : begin + self.batch_size]
        settings = self.settings
        with seeded(None if self.seed is None else self.seed + 1 + index):  # the forward stream of batch index
            log_w, _, _, pilots = _forward_batch(
                self.model, self.guide, xb, self.args, self.kwargs, beta_schedule(settings["num_steps"],
                settings["schedule"]), settings, self.step_size, self.max_plate_nesting, bar,
            )  # fmt: skip
        with seeded(None if self.seed is None else self.seed + REVERSE_SEED_OFFSET + index):
            densities, space = _densities_and_space(
                self.model, self.guide, xb, self.args, self.kwargs, settings, self.max_plate_nesting
            )
            # the chains start from the simulated latents, exact posterior draws; the pilots from the forward
            # pilots' last states, which are independent of them given x, so that the step sizes they adapt
            # are too
            exact = space.unconstrain(
                {name: self.latents[name][begin : begin + self.batch_size] for name in space.sites}
            )
            u = {
                name: torch.cat([value.expand(settings["num_chains"], *value.shape), pilots[name]])
                for name, value in exact.items()
            }
            betas = beta_schedule(settings["num_steps"], settings["schedule"]).flip(0)
            log_w_rev, _, _, _ = _run_chains(densities, space, u, betas, settings, self.step_size, bar)
        lower = log_mean_exp(log_w)
        # the reverse weights estimate 1 / p(x): log p(x) <= -logmeanexp(log w_rev) in expectation
        upper = -log_mean_exp(log_w_rev)
        return lower.float().cpu(), upper.float().cpu()


def bdmc(model, guide, num_points: int = DEFAULT_BDMC_POINTS, *args, progress: bool = False, **kwargs) -> BDMCEstimate:
    """Bidirectional Monte Carlo on ``num_points`` points simulated from the model: AIS lower and upper bounds.

    Takes the settings of :class:`BDMC` (``num_steps``, ``num_chains``, ``leapfrog_steps``,
    ``step_size``, ``target_acceptance``, ``schedule``, ``batch_size``, ``seed``).
    """
    plan = BDMC(model, guide, num_points, *args, **kwargs)
    total = 2 * len(plan.batches) * plan.settings["num_steps"]
    with tqdm(total=total, desc="BDMC", disable=not progress, leave=False) as bar:
        lowers, uppers = zip(*(plan.bounds(index, bar) for index in range(len(plan.batches))), strict=True)
    return BDMCEstimate(torch.cat(lowers), torch.cat(uppers), plan.x.cpu(), plan.settings)
