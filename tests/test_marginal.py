"""The importance-sampled log p(x) against models whose marginal likelihood is known in closed form."""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from conftest import LinearGaussian, delta_method_sd
from pyro.ops.stats import fit_generalized_pareto

import pyro_vae as pv
from pyro_vae.infer import importance
from pyro_vae.infer.importance import fit_generalized_pareto_k
from pyro_vae.infer.iwae import IWAE_ELBO
from pyro_vae.infer.path_derivatives import STL_ELBO, DReG_IWAE_ELBO

Z = 2  # the latent dimension of the linear-Gaussian model


def within_delta_method_error(estimate, truth, num_samples: int, standard_errors: float = 5.0) -> bool:
    """Every point's estimate within ``standard_errors`` of its own delta-method standard deviation, plus its bias.

    Per point, log of the mean of K importance weights has bias ~ r / (2K) and standard deviation
    ~ sqrt(r / K), with r = K / ESS - 1 the weights' relative variance. 5 standard deviations: a false
    alarm about once in 10^6 per point under the normal approximation.
    """
    # the tolerance grows as the reported ESS falls: an ESS under-reported by a bug would widen it, so
    # it must be at least 1/20 of K (r < 19: at K = 20,000 a tolerance of at most about 0.15 nats)
    assert (estimate.ess > num_samples / 20).all(), estimate.ess.min()
    r = num_samples / estimate.ess - 1
    tolerance = standard_errors * delta_method_sd(estimate, num_samples) + r / (2 * num_samples)
    return bool(((estimate.log_px - truth).abs() < tolerance).all())


@pytest.fixture
def linear_gaussian():
    """The closed-form model of conftest (seed 0), 20 points drawn from it, the exact posterior and a poor guide."""
    lg = LinearGaussian(seed=0)
    x = lg.marginal.sample((20,))

    def exact_guide(x, scale=1.0):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(lg.posterior_mean(x), lg.posterior_covariance))

    def poor_guide(x, scale=1.0):
        """Mean-field, shifted and too wide: a loose bound that importance sampling must repair.

        (Wider than the posterior, so the weights stay bounded and the estimator converges.)
        """
        with pyro.plate("data", x.shape[0]):
            pyro.sample(
                "z",
                dist.Normal(lg.posterior_mean(x) + 0.3, 1.6 * lg.posterior_covariance.diagonal().sqrt()).to_event(1),
            )

    return lg.model, exact_guide, poor_guide, x, lg.marginal.log_prob(x)


@pytest.mark.parametrize(
    "num_samples, batch_size, max_samples_per_pass",
    [(1, 100, 4096), (7, 100, 4096), (100, 100, 4096), (1000, 7, 500), (1000, 20, 4096)],
    ids=[
        "K=1",
        "K=7",
        "K=100",
        "K=1000 in uneven passes of 71 over batches of 7 and 6",
        "K=1000 in 4 passes of 204 and one of 184",
    ],
)
def test_exact_posterior_gives_the_truth_with_zero_variance(
    linear_gaussian, num_samples, batch_size, max_samples_per_pass
):
    """Every weight is p(x) itself, so any particle lost or counted twice between passes shows (a last pass
    of 184 of 1000 dropped would shift log p(x) by log(816 / 1000) = -0.2, and the ESS by 184)."""
    model, exact_guide, _, x, truth = linear_gaussian
    estimate = pv.log_marginal_likelihood(
        model, exact_guide, x, num_samples=num_samples, batch_size=batch_size, max_samples_per_pass=max_samples_per_pass
    )
    # every log weight is log p(x) up to float32 rounding of three log densities of size ~10 through an
    # inverted 2 x 2 precision (~1e-5 each), so 1e-4; the ESS exp(2 lse - lse2) doubles that relative error
    # on top of the spread of the weights, which the same rounding leaves at ~1e-5 nats: 1e-3 is loose
    torch.testing.assert_close(estimate.log_px, truth, atol=1e-4, rtol=0)
    torch.testing.assert_close(estimate.ess, torch.full_like(truth, float(num_samples)), rtol=1e-3, atol=0)


def test_poor_guide_is_below_the_truth_rises_with_k_and_converges(linear_gaussian):
    model, _, poor_guide, x, truth = linear_gaussian
    estimates = {
        k: pv.log_marginal_likelihood(model, poor_guide, x, num_samples=k, seed=1) for k in (1, 10, 100, 20_000)
    }
    gaps = {k: float((truth - e.log_px).mean()) for k, e in estimates.items()}
    # A lower bound in expectation, tightening with K. Measured over seeds 1, 2, 3: the gap at K = 1 is
    # 0.60 to 1.97 nats; at K = 10 and 100, -0.02 to 0.13 and -0.04 to 0.06, so on 20 points their order
    # is within the noise, and only the fall from K = 1 is asserted
    assert gaps[1] > max(gaps[10], gaps[100]) + 0.3
    assert gaps[1] > 0.3  # the guide is really poor
    # Tolerance at K = 20,000: the delta method gives, per point, bias ~ r / (2K) and standard deviation
    # ~ sqrt(r / K), with r = K / ESS - 1 the relative variance of the weights; 4 standard errors of the
    # mean over the points plus the largest bias.
    large = estimates[20_000]
    r = 20_000 / large.ess - 1
    tolerance = 4 * float(delta_method_sd(large, 20_000).square().mean().sqrt() / math.sqrt(len(x)))
    tolerance += float(r.max()) / (2 * 20_000)
    assert abs(gaps[20_000]) < tolerance
    assert within_delta_method_error(large, truth, 20_000)  # and each point alone


def test_estimate_is_at_least_the_elbo(linear_gaussian):
    model, _, poor_guide, x, _ = linear_gaussian
    estimate = pv.log_marginal_likelihood(model, poor_guide, x, num_samples=500)
    assert (estimate.log_px >= estimate.elbo).all()  # Jensen, for the same samples
    elbo = pv.elbo_per_point(model, poor_guide, x, num_particles=2000).elbo
    # the gap, most of the poor guide's mean KL(q || p(z | x)), is about 2.1 nats here; two draws of the
    # ELBO's mean (2,000 particles a point) differ by about 0.02, so 0.2 leaves no room for chance
    assert estimate.mean > float(elbo.mean()) + 0.2


def test_scaling_and_annealing_leave_it_unchanged(linear_gaussian):
    model, _, poor_guide, x, _ = linear_gaussian
    plain = pv.log_marginal_likelihood(model, poor_guide, x, num_samples=300, seed=3)
    annealed = pv.log_marginal_likelihood(model, poor_guide, x, 0.01, num_samples=300, seed=3)
    scaled = pv.log_marginal_likelihood(
        poutine.scale(model, 50.0), poutine.scale(poor_guide, 50.0), x, num_samples=300, seed=3
    )
    torch.testing.assert_close(annealed.log_px, plain.log_px)
    torch.testing.assert_close(scaled.log_px, plain.log_px)


def test_chunking_and_batching_do_not_change_the_answer(linear_gaussian):
    model, _, poor_guide, x, _ = linear_gaussian
    one_pass = pv.log_marginal_likelihood(model, poor_guide, x, num_samples=1000, seed=4, max_samples_per_pass=10**9)
    chunked = pv.log_marginal_likelihood(
        model, poor_guide, x, num_samples=1000, seed=4, batch_size=7, max_samples_per_pass=500
    )
    # Different chunking draws different samples: agreement within Monte Carlo error, not bit for bit.
    # Per point the estimate's standard deviation is about sqrt(r / K), r = K / ESS - 1 (delta method);
    # the difference of two independent estimates gets 5 * sqrt(2) of it.
    sd = delta_method_sd(one_pass, 1000)
    assert ((one_pass.log_px - chunked.log_px).abs() < 5 * math.sqrt(2) * sd).all()
    again = pv.log_marginal_likelihood(
        model, poor_guide, x, num_samples=1000, seed=4, batch_size=7, max_samples_per_pass=500
    )
    assert torch.equal(again.log_px, chunked.log_px)  # deterministic given the seed


def test_two_latent_layers_written_from_scratch():
    """z1 ~ N(0, I), z2 | z1 ~ N(A z1, s2^2 I), x | z2 ~ N(B z2, s^2 I); the guide draws from the exact posterior."""
    g = torch.Generator().manual_seed(5)
    A, B = torch.randn(3, 2, generator=g), torch.randn(4, 3, generator=g)
    s2, s = 0.6, 0.4
    cov_z2 = A @ A.T + s2**2 * torch.eye(3)
    joint_cov = torch.zeros(9, 9)  # (z1, z2, x) jointly Gaussian
    joint_cov[:2, :2] = torch.eye(2)
    joint_cov[2:5, :2], joint_cov[:2, 2:5] = A, A.T
    joint_cov[2:5, 2:5] = cov_z2
    joint_cov[5:, :2], joint_cov[:2, 5:] = B @ A, (B @ A).T
    joint_cov[5:, 2:5], joint_cov[2:5, 5:] = B @ cov_z2, (B @ cov_z2).T
    joint_cov[5:, 5:] = B @ cov_z2 @ B.T + s**2 * torch.eye(4)
    x = dist.MultivariateNormal(torch.zeros(4), joint_cov[5:, 5:]).sample((10,))
    truth = dist.MultivariateNormal(torch.zeros(4), joint_cov[5:, 5:]).log_prob(x)

    def conditional(cov, observed, given):
        """Gaussian conditioning of the block `observed` on the block `given`."""
        gain = cov[observed][:, given] @ torch.linalg.inv(cov[given][:, given])
        conditional_cov = cov[observed][:, observed] - gain @ cov[given][:, observed]
        return gain, (conditional_cov + conditional_cov.T) / 2

    z1_gain, z1_cov = conditional(joint_cov, slice(0, 2), slice(5, 9))
    idx_z1x = torch.tensor([0, 1, 5, 6, 7, 8])
    z2_gain, z2_cov = conditional(
        joint_cov[idx_z1x.tolist() + [2, 3, 4]][:, idx_z1x.tolist() + [2, 3, 4]], slice(6, 9), slice(0, 6)
    )

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            z2 = pyro.sample("z2", dist.Normal(z1 @ A.T, s2).to_event(1))
            pyro.sample("x", dist.Normal(z2 @ B.T, s).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.MultivariateNormal(x @ z1_gain.T, z1_cov))
            z1x = torch.cat([z1, x.expand(z1.shape[:-1] + (4,))], -1)
            pyro.sample("z2", dist.MultivariateNormal(z1x @ z2_gain.T, z2_cov))

    estimate = pv.log_marginal_likelihood(model, guide, x, num_samples=50)
    # the exact posterior again, through two float32 conditionings with 4 x 4 and 6 x 6 inverses (each
    # ~1e-6 relative, amplified by their condition numbers of up to ~100): 1e-3 nats
    torch.testing.assert_close(estimate.log_px, truth, atol=1e-3, rtol=0)


def test_discrete_latent_sampled_by_the_guide():
    """A Gaussian mixture with y ~ Categorical: log p(x) = logsumexp_y log pi_y N(x; mu_y, 1)."""
    pi, mu = torch.tensor([0.2, 0.5, 0.3]), torch.tensor([-2.0, 0.0, 3.0])
    x = torch.tensor([-2.5, 0.1, 1.4, 3.3])
    truth = torch.logsumexp(pi.log() + dist.Normal(mu, 1.0).log_prob(x.unsqueeze(-1)), -1)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(pi))
            pyro.sample("x", dist.Normal(mu[y], 1.0), obs=x)

    def exact_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(logits=pi.log() + dist.Normal(mu, 1.0).log_prob(x.unsqueeze(-1))))

    def uniform_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(torch.ones(3) / 3))

    exact = pv.log_marginal_likelihood(model, exact_guide, x, num_samples=10)
    torch.testing.assert_close(exact.log_px, truth, atol=1e-5, rtol=0)
    rough = pv.log_marginal_likelihood(model, uniform_guide, x, num_samples=20_000)
    assert within_delta_method_error(rough, truth, 20_000)


def test_pareto_k_flags_a_heavy_tailed_guide(linear_gaussian):
    model, exact_guide, poor_guide, x, _ = linear_gaussian

    def wild_guide(x, scale=1.0):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.full((x.shape[0], Z), 4.0), 0.1).to_event(1))

    wild = pv.log_marginal_likelihood(model, wild_guide, x, num_samples=2000)
    poor = pv.log_marginal_likelihood(model, poor_guide, x, num_samples=2000)
    # The wild guide, a narrow Gaussian (scale 0.1) at 4, far from the posterior: measured ESS at most 3.1 of 2000
    # weights and k at least 2.6 at every point; 50 (2.5% of K) leaves a factor of 16.
    assert wild.unreliable.all() and wild.ess.max() < 50
    # The poor guide is shifted but wider than the posterior, so its weights are bounded: measured median k -0.89,
    # far below Vehtari et al.'s 0.7.
    assert float(poor.pareto_k.median()) < 0.7
    exact = pv.log_marginal_likelihood(model, exact_guide, x, num_samples=2000)
    assert not exact.unreliable.any()


def test_pareto_k_needs_ten_weights_in_its_tail_and_without_them_nothing_is_trusted():
    """The tail is the ceil(min(0.2 K, 3 sqrt K)) largest weights; the fit takes at least 10 (Pyro's rule), so
    below K = 46 Pareto-k cannot be assessed: NaN, and every such point counts as untrusted (an estimate at
    K = 20 was reported as trusted everywhere before)."""
    assert not importance.pareto_k_assessable(45) and importance.pareto_k_assessable(46)
    log_weights = torch.randn(45, 4, generator=torch.Generator().manual_seed(0))
    assert importance._pareto_k(log_weights.topk(importance._tail_size(45) + 1, dim=0).values, 45).isnan().all()
    k = torch.tensor([float("nan"), 0.5, 0.8, -math.inf, math.inf])
    assert importance.untrusted(k, 5000).tolist() == [True, False, True, False, True]


def test_the_pareto_threshold_falls_with_k_as_vehtari_et_al_2024_give_it():
    """min(1 - 1 / log10 K, 0.7): 0.7 from K = 10^(10/3) (about 2,154) on, 2/3 at K = 1000, 1/2 at K = 100."""
    assert importance.pareto_threshold(5000) == importance.pareto_threshold(2155) == 0.7
    assert importance.pareto_threshold(1000) == pytest.approx(2 / 3) and importance.pareto_threshold(100) == 0.5
    k = torch.tensor([0.6, 0.68, 0.75])
    assert importance.untrusted(k, 1000).tolist() == [False, True, True]
    assert importance.untrusted(k, 5000).tolist() == [False, False, True]


def test_batched_pareto_fit_matches_pyro():
    g = torch.Generator().manual_seed(0)
    rows = []
    for k in (0.1, 0.5, 0.9):
        u = torch.rand(300, generator=g)
        rows.append(((u.pow(-k) - 1) / k).sort().values)
    ours = fit_generalized_pareto_k(torch.stack(rows))
    theirs = torch.tensor([fit_generalized_pareto(r)[0] for r in rows], dtype=torch.double)
    torch.testing.assert_close(ours, theirs)


def test_streamed_statistics_equal_those_of_all_the_weights_at_once():
    # 5000 heavy-tailed log weights per point, in chunks of 40: the candidates for the Pareto tail are
    # pruned many times, yet the tail, ESS, log p(x) and ELBO are those of the whole (K, N) tensor.
    g = torch.Generator().manual_seed(0)
    num_samples, num_points = 5000, 7
    log_weights = torch.rand(num_samples, num_points, generator=g).pow(-0.6).log() - 90.0
    reconstruction = log_weights - 20.0  # so that kl = reconstruction - log_weights = -20 exactly
    stats = importance._Accumulator(num_samples)
    for chunk in range(0, num_samples, 40):
        stats.add(
            importance.SiteLogDensities(
                {"x": reconstruction[chunk : chunk + 40]},
                {"z": torch.zeros(40, num_points)},
                {"z": torch.full((40, num_points), -20.0)},
            )
        )
    log_px, elbo, _, kl, ess, pareto_k = stats.result()
    tail = log_weights.topk(importance._tail_size(num_samples) + 1, dim=0).values
    torch.testing.assert_close(pareto_k, importance._pareto_k(tail, num_samples))
    torch.testing.assert_close(log_px, log_weights.logsumexp(0) - math.log(num_samples))
    # ESS = exp(2 lse - lse2): chunked logsumexps round differently from one over all K, by a few float32
    # ulps of |2 log w| ~ 180 (2e-5 each), which the exp turns into a relative error; 8 ulps leave room.
    ulps = 8 * torch.finfo(torch.float32).eps * float(2 * log_weights.abs().max())
    full_ess = (2 * log_weights.logsumexp(0) - (2 * log_weights).logsumexp(0)).exp()
    torch.testing.assert_close(ess, full_ess, rtol=ulps, atol=0)
    torch.testing.assert_close(elbo, log_weights.mean(0))
    torch.testing.assert_close(kl, torch.full((num_points,), -20.0))


def test_vae_estimate_bounds_the_elbo_is_deterministic_and_leaves_the_global_rng(small_mnist):
    vae = pv.VAE((1, 28, 28), 4, hidden=(32,))
    x = small_mnist.test.x[:20]
    state = torch.get_rng_state()
    first = pv.log_marginal_likelihood(vae.model, vae.guide, x, num_samples=200, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left where it was
    second = pv.log_marginal_likelihood(vae.model, vae.guide, x, num_samples=200, seed=0)
    assert torch.equal(first.log_px, second.log_px)
    assert (first.log_px > first.elbo).all()
    assert set(first.summary()) >= {"log_px", "log_px_se", "elbo", "kl", "reconstruction", "ess_mean", "pareto_k_max"}


def test_a_guide_and_a_model_of_other_latent_sites_are_refused_by_every_estimator():
    """log w = log p(x, z) - log q(z | x) needs the same latents on both sides. A guide's extra site once added its
    entropy (a 'bound' of +0.70 where log p(x) is -1.52, and a gradient widening q(u) for ever); a model's extra
    latent was drawn from its prior and scored without a q (the bound off by log 2)."""
    loc = torch.nn.Parameter(torch.zeros(()))

    def model(x=None, extra_latent=False, extra_guide_site=False, batch_size=None):
        with pyro.plate("data", batch_size if x is None else x.shape[0]):  # x None: BDMC simulates batch_size
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            if extra_latent:
                pyro.sample("y", dist.Normal(0.0, 1.0))
            return pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x, extra_latent=False, extra_guide_site=False, batch_size=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc.expand(x.shape[0]), 1.0))
            if extra_guide_site:
                pyro.sample("u", dist.Normal(0.0, 1.0))

    x = torch.ones(4)
    module = torch.nn.Module()
    module.loc = loc
    estimators = [
        lambda m, g, **kw: pv.log_marginal_likelihood(m, g, x, num_samples=5, **kw),
        lambda m, g, **kw: IWAE_ELBO(5).differentiable_loss(m, g, x, **kw),
        lambda m, g, **kw: DReG_IWAE_ELBO(module, 5).differentiable_loss(m, g, x, **kw),
        lambda m, g, **kw: STL_ELBO(module, 2).differentiable_loss(m, g, x, **kw),
        lambda m, g, **kw: pv.ais_log_marginal_likelihood(m, g, x, num_steps=2, num_chains=2, **kw),
        lambda m, g, **kw: pv.bdmc(m, g, 4, num_steps=2, num_chains=2, **kw),
    ]  # importance sampling, IWAE, DReG, STL, AIS (once 1.3 nats above log p(x) with the guide's extra site), BDMC
    for estimate in estimators:
        estimate(model, guide)  # the same latents: fine
        with pytest.raises(ValueError, match=r"the guide's \['u'\] are not latent in the model, and the model's \[\]"):
            estimate(model, guide, extra_guide_site=True)
        with pytest.raises(ValueError, match=r"the guide's \[\] are not latent in the model, and the model's \['y'\]"):
            estimate(model, guide, extra_latent=True)


def test_data_outside_the_support_is_refused_in_any_batch():
    """Pyro's support checks ran on the first pass of the first batch alone: grayscale points in a later batch
    were scored by the Bernoulli's binary formula, log sigmoid((2x - 1) l), without a word. Now every point is
    checked by one particle whose draws are given back, so the estimate of binary data is unchanged."""
    vae = pv.VAE((1, 4, 4), 2, hidden=(8,))
    binary = torch.bernoulli(torch.full((20, 1, 4, 4), 0.3), generator=torch.Generator().manual_seed(0))
    grayscale = binary.clone()
    grayscale[15] = 0.5
    with pytest.raises(ValueError, match="Bernoulli"):
        pv.log_marginal_likelihood(vae.model, vae.guide, grayscale, num_samples=8, batch_size=10)
    with pyro.validation_enabled(False):  # the checks give back their draws: the same numbers with or without them
        unchecked = pv.log_marginal_likelihood(vae.model, vae.guide, binary, num_samples=8, batch_size=10)
    checked = pv.log_marginal_likelihood(vae.model, vae.guide, binary, num_samples=8, batch_size=10)
    assert torch.equal(checked.log_px, unchecked.log_px)
