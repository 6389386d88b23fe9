"""Every prior with every likelihood, and each density against a computation by hand."""

import math
import re

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import continuous_bernoulli_log_density
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

import pyro_vae as pv
from pyro_vae.components.likelihoods import LIKELIHOODS, LogitContinuousBernoulli, build_likelihood
from pyro_vae.components.priors import PRIORS, DiagonalNormalMixture, build_prior
from pyro_vae.models.base import device_of

X_SHAPE, Z_DIM = (1, 4, 4), 3
SMALL_PRIORS = {
    "standard-normal": {},
    "learned-gaussian": {},
    "mixture": {"num_components": 3},
    "vamp": {"num_components": 4},
    "flow": {"num_layers": 2},
}


def data_for(likelihood: str, n: int = 6) -> torch.Tensor:
    """A batch inside the likelihood's support, edges included."""
    x = torch.rand(n, *X_SHAPE)
    if likelihood == "bernoulli":
        return x.round()
    x.view(n, -1)[:, :2] = torch.tensor([0.0, 1.0])
    return x


def test_every_prior_and_likelihood_is_tested():
    assert set(SMALL_PRIORS) == set(PRIORS) and set(LIKELIHOODS) == {
        "bernoulli",
        "continuous-bernoulli",
        "gaussian",
        "laplace",
    }


@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
@pytest.mark.parametrize("prior", sorted(SMALL_PRIORS))
def test_trains_evaluates_and_samples(prior, likelihood):
    vae = pv.VAE(
        X_SHAPE, Z_DIM, prior=build_prior({"name": prior, **SMALL_PRIORS[prior]}),
        likelihood=build_likelihood(likelihood), hidden=(16,),
    )  # fmt: skip
    x = data_for(likelihood)
    vae.check_data(x)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
    for elbo in (Trace_ELBO(), TraceMeanField_ELBO()):  # the mean-field ELBO falls back to a Monte Carlo KL
        before = {name: p.detach().clone() for name, p in vae.named_parameters()}
        with pyro.validation_enabled():
            loss = elbo.differentiable_loss(vae.model, vae.guide, x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
        # every parameter, the prior's and the likelihood's included, gets a gradient and moves
        assert [name for name, p in vae.named_parameters() if torch.equal(before[name], p)] == []
    assert any(name.startswith("prior.") for name in before) == (prior != "standard-normal")
    estimate = pv.log_marginal_likelihood(vae.model, vae.guide, x, num_samples=256)
    assert torch.isfinite(estimate.log_px).all()
    # The sampler's ELBO (unscaled densities summed over each point's event) against Pyro's own, each a mean of
    # independent draws of the same quantity: agreement within 5 standard errors of the difference (a false
    # alarm in about one run in 10^6); a density summed over the wrong dimensions is off by many nats.
    pyro_elbo = torch.tensor([-Trace_ELBO(num_particles=8).loss(vae.model, vae.guide, x) / len(x) for _ in range(32)])
    se = math.sqrt(pyro_elbo.var().item() / 32 * (1 + 32 * 8 / 256))  # ours has 256 draws a point to Pyro's 256
    assert abs(estimate.elbo.mean().item() - pyro_elbo.mean().item()) < 5 * se + 1e-3
    samples = vae.sample(5)
    assert samples.shape == (5, *X_SHAPE) and torch.isfinite(samples).all()
    rebuilt = pv.VAE.from_config(vae.config())
    rebuilt.load_state_dict(vae.state_dict())
    assert rebuilt.config() == vae.config()


def normal_log_density(z, loc, scale):
    """log N(z; loc, diag(scale^2)) written out, summed over the last dimension."""
    return (-0.5 * ((z - loc) / scale) ** 2 - torch.log(scale) - 0.5 * math.log(2 * math.pi)).sum(-1)


def test_vamp_prior_is_the_mean_of_the_encoder_posteriors_at_the_pseudo_inputs():
    vae = pv.VAE(X_SHAPE, Z_DIM, prior=pv.priors.VampPrior(num_components=5), hidden=(16,))
    prior = vae.prior
    z = 2 * torch.randn(7, Z_DIM, dtype=torch.float64)
    by_hand = []
    for z_n in z:
        densities = []
        for u in prior.pseudo_inputs:
            loc, scale = vae.encoder(u.clamp(0, 1).unsqueeze(0))  # hardtanh(0, 1) is a clamp
            densities.append(normal_log_density(z_n, loc[0].double(), scale[0].double()).exp())
        by_hand.append(torch.stack(densities).mean().log())
    torch.testing.assert_close(prior.log_prob(z.float()).double(), torch.stack(by_hand), atol=1e-4, rtol=1e-5)
    # the encoder is shared with the guide, not copied: its weights are saved once
    assert not any(name.startswith("prior.encoder") for name in vae.state_dict())
    assert prior.encoder is vae.encoder


@pytest.mark.parametrize("bounds", [None, (-3.0, 3.0)])
def test_vamp_prior_keeps_its_pseudo_inputs_in_the_data_s_range_or_leaves_them_free(bounds):
    """Data outside [0, 1] (M1+M2's standardised features) need pseudo-inputs there too."""
    prior = pv.priors.VampPrior(num_components=6, bounds=bounds)
    vae = pv.VAE(X_SHAPE, Z_DIM, prior=prior, hidden=(16,), likelihood=pv.likelihoods.Gaussian("fixed"))
    with torch.no_grad():
        prior.pseudo_inputs.copy_(5 * torch.randn_like(prior.pseudo_inputs))  # outside [0, 1] and [-3, 3]
        inputs = prior.pseudo_inputs if bounds is None else prior.pseudo_inputs.clamp(*bounds)
        loc, scale = vae.encoder(inputs)
        torch.testing.assert_close(prior().locs, loc)
    config = vae.config()["prior"]
    assert config["bounds"] == (None if bounds is None else list(bounds))
    assert pv.priors.VampPrior(**{k: v for k, v in config.items() if k != "name"}).bounds == bounds
    assert "bounds" not in pv.priors.VampPrior().config()  # images' [0, 1], as runs before bounds wrote it
    with pytest.raises(ValueError, match="bounds must be .low, high. with low < high"):
        pv.priors.VampPrior(bounds=(1.0, 0.0))


def test_a_vamp_prior_whose_pseudo_inputs_cannot_reach_the_data_is_refused_before_training():
    """Standardised data under the default bounds, [0, 1] for images: the pseudo-inputs could not follow."""
    x = torch.randn(40, *X_SHAPE)
    data = pv.make_dataset(x, val_size=5, test_size=5)
    for bounds, refused in ((pv.priors.VampPrior.IMAGE_BOUNDS, True), (None, False), ((-10.0, 10.0), False)):
        prior = pv.priors.VampPrior(num_components=3, bounds=bounds)
        vae = pv.VAE(X_SHAPE, Z_DIM, prior=prior, hidden=(16,), likelihood=pv.likelihoods.Gaussian("fixed"))
        if refused:
            with pytest.raises(pv.DataError, match=r"keeps its pseudo-inputs in \[0, 1\].*spans \[-.*bounds=None"):
                vae.check_dataset(data)
        else:
            vae.check_dataset(data)


def test_mixture_log_prob_is_the_brute_force_sum():
    prior = pv.priors.MixtureOfGaussians(num_components=4)
    prior.setup(Z_DIM, x_shape=X_SHAPE, encoder=None)
    with torch.no_grad():
        prior.logits.copy_(torch.randn(4))
        prior.raw_scales.copy_(torch.randn(4, Z_DIM))
    z = 3 * torch.randn(50, Z_DIM)
    weights = prior.logits.softmax(-1)
    scales = torch.nn.functional.softplus(prior.raw_scales)
    brute_force = sum(weights[k] * normal_log_density(z, prior.locs[k], scales[k]).exp() for k in range(4)).log()
    torch.testing.assert_close(prior.log_prob(z), brute_force, atol=1e-4, rtol=1e-5)
    # the matrix-product form against Pyro's MixtureSameFamily, far out in the tails too, where log densities
    # reach -2,000 nats: float32 rounding of either form stays within rtol 1e-5 of them (20 random mixtures
    # checked), and atol 2e-3 covers the few values near 0
    reference = dist.MixtureSameFamily(dist.Categorical(weights), dist.Normal(prior.locs, scales).to_event(1))
    z = 10 * torch.randn(200, Z_DIM)
    torch.testing.assert_close(prior.log_prob(z), reference.log_prob(z), atol=2e-3, rtol=1e-5)


def test_mixture_log_prob_is_exact_at_the_small_scales_an_encoder_gives():
    """The VampPrior's components are the encoder's posteriors, whose scales go down to its min_scale. The
    expanded square cancels by about the float's epsilon times (|z| / s)^2 per dimension: in float32, 1.4 nats
    on average over 40 dimensions with scales of 0.001 to 0.01 (12.9 at the worst point); in float64 below
    1e-6. What is left is float32's rounding of log densities near 150 nats, about 1e-5; 2e-4 leaves room."""
    generator = torch.Generator().manual_seed(0)
    locs = 1.5 * torch.randn(500, 40, generator=generator)
    scales = 0.001 + 0.009 * torch.rand(500, 40, generator=generator)
    component = torch.randint(500, (256,), generator=generator)
    z = locs[component] + scales[component] * torch.randn(256, 40, generator=generator)
    mixture = DiagonalNormalMixture(torch.zeros(500), locs, scales)
    exact = dist.MixtureSameFamily(
        dist.Categorical(logits=torch.zeros(500, dtype=torch.float64)),
        dist.Normal(locs.double(), scales.double()).to_event(1),
    ).log_prob(z.double())
    torch.testing.assert_close(mixture.log_prob(z).double(), exact, rtol=0, atol=2e-4)


def test_mixture_samples_follow_the_weights():
    prior = pv.priors.MixtureOfGaussians(num_components=2)
    prior.setup(1, x_shape=X_SHAPE, encoder=None)
    with torch.no_grad():
        prior.logits.copy_(torch.tensor([math.log(0.8), math.log(0.2)]))
        prior.locs.copy_(torch.tensor([[-10.0], [10.0]]))
    fraction = (prior.sample(20000) > 0).float().mean()
    assert abs(float(fraction) - 0.2) < 0.015  # 5 binomial standard errors (0.0028 each)


def test_flow_prior_density_integrates_to_one():
    prior = pv.priors.FlowPrior(num_layers=3, hidden=16)
    prior.setup(2, x_shape=X_SHAPE, encoder=None)
    with torch.no_grad():  # a clearly non-Gaussian flow, not the near-identity of a fresh one
        for p in prior.parameters():
            p.add_(0.3 * torch.randn_like(p))
    step = 0.025
    grid = torch.arange(-9, 9, step) + step / 2
    z = torch.cartesian_prod(grid, grid)
    with torch.no_grad():
        total = prior.log_prob(z).exp().sum() * step**2
    # Measured: 1 - 3.0e-5 at steps of 0.05, 0.025 and 0.0125 alike, so the midpoint rule's O(step^2) error
    # is below that and the rest is mass outside the box, below 1e-3 (checked with samples): 2e-3 is the sum
    outside = (prior.sample(4000).abs() > 9).any(-1).float().mean()
    assert float(outside) < 1e-3
    assert abs(float(total) - 1) < 2e-3


@pytest.mark.parametrize(
    "likelihood, bad, hint",
    [
        ("bernoulli", 0.5, "continuous-bernoulli"),
        ("continuous-bernoulli", 1.5, "divide by 255"),
        ("continuous-bernoulli", -0.1, "[0, 1]"),
        ("gaussian", float("nan"), "holds 1 NaN and 0 infinite values (the first in data point 2)"),
        ("laplace", float("inf"), "holds 0 NaN and 1 infinite values (the first in data point 2)"),
    ],
)
def test_data_outside_the_support_is_refused_with_the_fix(likelihood, bad, hint):
    vae = pv.VAE(X_SHAPE, Z_DIM, likelihood=build_likelihood(likelihood), hidden=(16,))
    x = data_for(likelihood)
    x[2, 0, 1, 1] = bad
    with pytest.raises(pv.DataError, match=re.escape(hint)):
        vae.check_data(x)


def test_continuous_bernoulli_is_a_density_on_the_unit_interval():
    likelihood = pv.likelihoods.ContinuousBernoulli()
    likelihood.setup((1,))
    grid = (torch.arange(2000) + 0.5) / 2000
    for logit in (-100.0, -8.0, -1.0, 0.0, 0.3, 5.0, 30.0):
        p = likelihood(torch.full((2000, 1, 1), logit))
        density = p.log_prob(grid.unsqueeze(-1)).exp()
        # the midpoint rule's relative error is about (h l)^2 / 24 for a density like exp(-|l| x): 1e-4 at l = 100
        assert abs(float(density.mean()) - 1) < 1e-3
        assert abs(float((grid * density).mean()) - float(p.mean[0])) < 1e-3  # the mean of the images


def test_continuous_bernoulli_log_normaliser_is_exact_at_saturated_logits():
    """log CB(x; l) = x l - softplus(l) + log(l / tanh(l / 2)), in float64, against float32 from any logit.

    torch's own ContinuousBernoulli clamps sigmoid(l) to eps and is 0.23 nats low at |l| = 20, 11 at 1e6.
    """
    likelihood = pv.likelihoods.ContinuousBernoulli()
    likelihood.setup((1,))
    logits = torch.tensor([-1e6, -100.0, -20.0, -1.0, -1e-3, 0.0, 1e-5, 0.5, 20.0, 1e6])
    x = torch.tensor([0.0, 0.3, 1.0])
    truth = continuous_bernoulli_log_density(x, logits.unsqueeze(-1))
    log_p = likelihood(logits.reshape(-1, 1, 1)).log_prob(x.reshape(-1, 1, 1)).double()
    # float32 rounds x l - softplus(l) to about 6e-8 of its size (6e-2 at 1e6); log C itself to 1e-6
    torch.testing.assert_close(log_p.T, truth, rtol=1e-6, atol=1e-5)  # log_p is (value, logit)
    # what the custom log normaliser is for: torch's is 0.23 nats low at |l| = 20 and 11 at 1e6 (docs/theory.md)
    saturated = torch.tensor([20.0, -20.0, 1e6, -1e6]).unsqueeze(-1)
    torch_error = torch.distributions.ContinuousBernoulli(logits=saturated).log_prob(x).double()
    torch_error = torch_error - continuous_bernoulli_log_density(x, saturated)
    assert (-0.24 < torch_error[:2]).all() and (torch_error[:2] < -0.22).all()
    assert (-11.2 < torch_error[2:]).all() and (torch_error[2:] < -10.9).all()


def test_continuous_bernoulli_draws_follow_its_density_at_any_logit():
    """The CDF against the density integrated on a grid, the inverse CDF against the CDF, and the draws' mean
    against the density's: torch's sampler, from lambda clamped to eps, averages 0.937 at l = 100 where the
    density's mean is 0.990, so that BDMC's simulated data did not come from the model."""
    logits = torch.tensor([-100.0, -20.0, -1.0, -1e-5, 0.0, 1e-5, 3.0, 20.0, 100.0])
    exact = LogitContinuousBernoulli(logits=logits.double())
    edges = torch.linspace(0, 1, 20001, dtype=torch.float64)
    middles = ((edges[1:] + edges[:-1]) / 2).unsqueeze(-1)
    integrated = (exact.log_prob(middles).exp() / 20000).cumsum(0)
    # the midpoint rule's error is about (h l)^2 / 24 of the mass: 1e-6 at l = 100, h = 5e-5
    torch.testing.assert_close(exact.cdf(edges[1:].unsqueeze(-1)), integrated, rtol=0, atol=1e-5)
    u = torch.rand(1000, len(logits), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(exact.cdf(exact.icdf(u)), u, rtol=0, atol=1e-10)
    # in float32 too, just above the small-logit expansion, where 1 + log(u + (1 - u) e^-l) / l cancelled by 1e-3
    near_zero = torch.tensor([1.01e-4, -1.01e-4, 3e-4, 1e-3])
    u = torch.rand(10_000, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    in_float64 = LogitContinuousBernoulli(logits=near_zero.double()).icdf(u)
    in_float32 = LogitContinuousBernoulli(logits=near_zero).icdf(u.float()).double()
    torch.testing.assert_close(in_float32, in_float64, rtol=0, atol=1e-6)  # float32's rounding of x: 6e-8
    pyro.set_rng_seed(0)
    float32 = LogitContinuousBernoulli(logits=logits)
    draws = float32.sample((100_000,))
    assert ((0 <= draws) & (draws <= 1)).all()
    # a draw's sd is at most 1 / sqrt(12): the mean of 100,000 within 5 standard errors, 0.0046
    assert ((draws.mean(0) - float32.mean).abs() < 5 / math.sqrt(12 * 100_000)).all()
    logits.requires_grad_(True)
    LogitContinuousBernoulli(logits=logits).rsample((10,)).sum().backward()
    assert torch.isfinite(logits.grad).all()  # the branches not taken give no NaN gradient


def test_continuous_bernoulli_draws_at_the_ends_of_the_uniform_stay_in_the_support_at_any_logit():
    """torch.rand draws exactly 0 about once in 2^24: above abs(l) of 16.6 expm1(-abs(l)) rounds to -1 in float32,
    and 1 + log1p(expm1(-l)) / l was -inf. The draws at u = 0 and u = 1 are the ends of [0, 1], with finite
    gradients; between them the float32 draws agree with float64's formula."""
    logits = torch.tensor([-100.0, -20.0, -17.0, -9.0, -3.0, 3.0, 9.0, 17.0, 20.0, 100.0], requires_grad=True)
    ends = LogitContinuousBernoulli(logits=logits).icdf(torch.tensor([[0.0], [1.0]]))
    assert torch.equal(ends.detach(), torch.tensor([[0.0], [1.0]]).expand(2, 10))
    ends.sum().backward()
    assert torch.isfinite(logits.grad).all()
    u = torch.linspace(0, 1, 2001, dtype=torch.float64).unsqueeze(-1)
    grid = torch.linspace(-30, 30, 601, dtype=torch.float64)
    exact = torch.log1p(u * torch.expm1(grid)) / grid  # float64: exact to about 1e-15 away from l = 0
    in_float32 = LogitContinuousBernoulli(logits=grid.float()).icdf(u.float()).double()
    # float32 rounding of u itself moves x by up to dx/du * 6e-8, which reaches 2e-6 at abs(l) = 30, u near 1 or 0
    torch.testing.assert_close(in_float32, exact, rtol=0, atol=2e-5)


@pytest.mark.parametrize("logit", [-100.0, -10.0, -0.4, 0.0, 0.1, 0.6, 2.0, 16.0, 100.0])
def test_continuous_bernoulli_variance_and_entropy_are_exact_at_any_logit(logit):
    """Against the density integrated on a grid in float64 (the trapezoid rule's error is about (h l)^2 / 12
    relative: 2e-8 at l = 100 with h = 5e-6); torch's, from lambda clamped to eps, stop moving beyond abs(l) of
    16 (variance 0.0039 at l = 100, where it is 1e-4)."""
    x = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    density = torch.exp(logit * x - (logit * x).max())
    density = density / torch.trapezoid(density, x)
    mean = torch.trapezoid(x * density, x)
    variance = torch.trapezoid((x - mean) ** 2 * density, x)
    entropy = -torch.trapezoid(density * torch.log(density.clamp_min(1e-300)), x)
    cb = LogitContinuousBernoulli(logits=torch.tensor(logit))
    # float32: the variance loses 7e-6 relative to cancellation just above the series' range (l = 0.5)
    assert cb.variance.item() == pytest.approx(variance.item(), rel=2e-5)
    assert cb.stddev.item() == pytest.approx(variance.sqrt().item(), rel=2e-5)
    assert cb.entropy().item() == pytest.approx(entropy.item(), abs=2e-6)


def test_the_bernoulli_of_scalar_data_gives_one_density_per_point():
    """x_shape = (): no event dims to flatten; flatten(-0) had flattened the batch into one number."""
    logits, x = torch.randn(5), torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
    likelihood = build_likelihood("bernoulli")
    likelihood.setup(())
    log_prob = likelihood(logits.unsqueeze(-1)).log_prob(x)
    assert log_prob.shape == (5,)
    torch.testing.assert_close(log_prob, dist.Bernoulli(logits=logits).log_prob(x))


def test_a_class_that_is_no_prior_or_likelihood_is_refused_when_registered():
    class NotAPrior:
        name = "not-a-prior"

    for register in (pv.priors.register_prior, pv.likelihoods.register_likelihood):
        with pytest.raises(TypeError, match="must subclass pyro_vae.components.*; .*NotAPrior.* does not"):
            register(NotAPrior)
    assert "not-a-prior" not in PRIORS


class StudentT(pv.likelihoods.Likelihood):
    """A user's own likelihood: heavy-tailed, with a fixed scale and 3 degrees of freedom."""

    name = "student-t"

    def forward(self, params):
        loc = self._param(params, 0)
        return dist.StudentT(3.0, loc, 0.1).to_event(len(self.x_shape))


def test_a_likelihood_of_your_own_is_one_small_class():
    pv.likelihoods.register_likelihood(StudentT)
    try:
        vae = pv.VAE(X_SHAPE, Z_DIM, likelihood=StudentT(), hidden=(16,))
        x = data_for("gaussian")
        pv.fit(vae, pv.make_dataset(torch.cat([x, x]), val_size=2, test_size=2), epochs=1, batch_size=3, progress=False)
        assert pv.VAE.from_config(vae.config()).likelihood.name == "student-t"
        assert torch.isfinite(pv.log_marginal_likelihood(vae.model, vae.guide, x, num_samples=8).log_px).all()
    finally:
        del LIKELIHOODS["student-t"]


class WideNormal(pv.priors.Prior):
    """A user's prior with a constructor argument that its config() (the base class's, the name only) leaves out."""

    name = "wide-normal"

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self):
        return dist.Normal(torch.zeros(self.z_dim), self.scale).to_event(1)


def test_a_component_whose_config_does_not_rebuild_it_is_refused_before_a_run_starts(tmp_path):
    """It would reload, evaluate and resume as another distribution (scale 1), without an error."""
    pv.priors.register_prior(WideNormal)
    try:
        data = pv.make_dataset(data_for("bernoulli", n=24), val_size=4, test_size=4)
        with pytest.raises(ValueError, match=r"prior 'wide-normal' is not rebuilt by its config\(\) \{'name'"):
            pv.fit(pv.VAE(X_SHAPE, Z_DIM, prior=WideNormal(5.0), hidden=(8,)), data, epochs=1, run_dir=tmp_path / "r")
        assert not (tmp_path / "r").exists()
        assert pv.VAE(X_SHAPE, Z_DIM, prior=WideNormal(1.0)).config()["prior"] == {"name": "wide-normal"}  # it does
    finally:
        del pv.priors.PRIORS["wide-normal"]
    for name in sorted(LIKELIHOODS):  # every built-in component rebuilds itself from its config
        pv.VAE(X_SHAPE, Z_DIM, likelihood=build_likelihood(name)).config()
    for name in sorted(pv.priors.PRIORS):
        pv.VAE(X_SHAPE, Z_DIM, prior=pv.priors.build_prior(name)).config()


@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
def test_a_config_s_check_draws_from_its_own_device_s_generator_and_leaves_every_state_as_it_was(
    likelihood, monkeypatch
):
    """The check that a config rebuilds its likelihood draws data once: it reseeded with torch.manual_seed, which
    reseeds every GPU's generator too, and restored the CPU's and the model's device's alone."""
    vae = pv.VAE((1, 4, 4), z_dim=2, hidden=(8,), likelihood=likelihood)

    def reseeds_every_device(seed):
        raise AssertionError("torch.manual_seed reseeds the generator of every GPU")

    monkeypatch.setattr(torch, "manual_seed", reseeds_every_device)
    state = torch.get_rng_state()
    assert vae.config() == vae.config()  # the same draw each time
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
def test_the_constant_fit_maximises_the_likelihood_of_the_data(likelihood):
    """The output bias a fresh decoder starts at: the p(x | .) that ignores z and fits x best.

    Skewed data, so that the Gaussian's mean, the Laplace's median and the continuous Bernoulli's
    logit (not the Bernoulli's) differ; means well inside the clipping range. The fit is the closed
    form where there is one (the Bernoulli's logit of the mean, the Gaussian's mean, the Laplace's
    median; the continuous Bernoulli's is a bisection, checked against its exact mean below), and any
    step of 0.05 in the location outputs lowers the log-likelihood.
    """
    torch.manual_seed(0)
    lik = build_likelihood({"name": "gaussian", "sigma": "decoder"} if likelihood == "gaussian" else likelihood)
    lik.setup(X_SHAPE)
    x = 0.05 + 0.9 * torch.rand(400, *X_SHAPE) ** 2
    x = x.bernoulli() if likelihood == "bernoulli" else x
    fit = lik.constant_fit(x)
    assert fit.shape == (lik.params_per_dim, *X_SHAPE)
    if likelihood == "bernoulli":
        torch.testing.assert_close(fit[0], torch.logit(x.mean(0)), rtol=1e-5, atol=1e-5)
    elif likelihood == "gaussian":
        torch.testing.assert_close(fit[0], x.mean(0), rtol=1e-5, atol=1e-5)
    elif likelihood == "laplace":  # 400 points: any value between the middle two is a maximum
        middle = x.sort(0).values[199:201]
        assert ((middle[0] <= fit[0]) & (fit[0] <= middle[1])).all()

    def log_likelihood(params):
        return float(lik(params.expand(len(x), *params.shape)).log_prob(x).mean())

    best = log_likelihood(fit)
    for _ in range(20):
        step = torch.zeros_like(fit)
        step[0] = 0.05 * torch.randn(X_SHAPE).sign()  # the location outputs; a predicted scale stays at its start
        assert log_likelihood(fit + step) < best
    if likelihood == "gaussian":
        assert torch.allclose(lik.scale(fit.expand(2, *fit.shape)), torch.tensor(lik.init_scale))


def test_the_continuous_bernoulli_fit_matches_means_near_the_clipping_range():
    """Its mean is exact at any logit (torch's stops rising at 0.972, where the logit is about 36)."""
    target = torch.tensor([0.01, 0.02, 0.5, 0.975, 0.98, 0.99])
    x = target.expand(3, 6).double()
    fit = build_likelihood("continuous-bernoulli").constant_fit(x)
    mean = LogitContinuousBernoulli(logits=fit.double()).mean.squeeze(0)
    torch.testing.assert_close(mean, target.double(), atol=1e-6, rtol=0)  # float32 logits near 100: 1e-7 apart


def test_a_likelihood_without_a_constant_fit_leaves_the_decoder_as_initialised():
    vae = pv.VAE(X_SHAPE, Z_DIM, likelihood=StudentT(), hidden=(16,))
    bias = vae.decoder.net[-1].bias.detach().clone()
    assert not vae.start_output_bias(data_for("gaussian"))
    assert torch.equal(vae.decoder.net[-1].bias, bias)


def test_a_component_of_buffers_alone_is_found_where_its_buffers_are():
    """``device_of``, by which the config check probes a prior or likelihood on its own device, finds components
    of buffers alone (the standard-normal prior, fixed scales), which were probed on the CPU wherever they were.
    The GPU path itself (a run on CUDA writing its config) needs a GPU, which this machine lacks."""
    prior = build_prior("standard-normal")
    prior.setup(3, x_shape=(2,), encoder=None)
    assert not list(prior.parameters())
    assert device_of(prior.to("meta")) == torch.device("meta")
    likelihood = build_likelihood({"name": "gaussian", "sigma": "fixed"})
    likelihood.setup((2,))
    assert device_of(likelihood.to("meta")) == torch.device("meta")
    assert device_of(torch.nn.Identity()) == torch.device("cpu")


def test_a_prior_or_likelihood_given_to_a_second_model_is_refused():
    """Set up again, the first model's VampPrior would read the second model's encoder, outside its parameters."""
    prior, likelihood = pv.priors.VampPrior(num_components=3), pv.likelihoods.Bernoulli()
    pv.VAE(X_SHAPE, Z_DIM, prior=prior, likelihood=likelihood, hidden=(8,))
    with pytest.raises(ValueError, match="This VampPrior belongs to a model already; give each model a prior of its"):
        pv.VAE(X_SHAPE, Z_DIM, prior=prior, hidden=(8,))
    with pytest.raises(ValueError, match="This Bernoulli belongs to a model already; give each model a likelihood"):
        pv.VAE(X_SHAPE, Z_DIM, likelihood=likelihood, hidden=(8,))


def test_a_model_takes_its_prior_and_likelihood_by_name_or_config_and_refuses_other_things():
    vae = pv.VAE(X_SHAPE, Z_DIM, prior="vamp", likelihood={"name": "gaussian", "sigma": "shared"}, hidden=(8,))
    assert isinstance(vae.prior, pv.priors.VampPrior) and vae.likelihood.config()["sigma"] == "shared"
    with pytest.raises(TypeError, match="The prior must be a Prior, its short name .*standard-normal.* or its config"):
        pv.VAE(X_SHAPE, Z_DIM, prior=dist.Normal(0.0, 1.0), hidden=(8,))
    with pytest.raises(TypeError, match="The likelihood must be a Likelihood, .*; got a Bernoulli"):
        pv.SSVAE(X_SHAPE, Z_DIM, likelihood=dist.Bernoulli(0.5), hidden=(8,))
    with pytest.raises(ValueError, match="Unknown prior 'laplace'"):
        pv.HierarchicalVAE(X_SHAPE, (2, 1), ((8,), (4,)), prior="laplace")


@pytest.mark.parametrize("bad", [0, 2.5, True, "10"])
def test_prior_sizes_that_are_not_whole_are_refused_when_built(bad):
    """They failed at setup with a TypeError from torch, or (a flow's hidden=0) were replaced silently."""
    with pytest.raises(ValueError, match="A mixture's num_components must be a whole number >= 1"):
        pv.priors.MixtureOfGaussians(bad)
    with pytest.raises(ValueError, match=r"A VampPrior's num_components \(pseudo-inputs\) must be a whole number >= 1"):
        pv.priors.VampPrior(bad)
    with pytest.raises(ValueError, match="A flow prior's num_layers must be a whole number >= 1"):
        pv.priors.FlowPrior(bad)
    with pytest.raises(ValueError, match=r"A flow prior's hidden must be a whole number >= 1 \(None: 4 z_dim\)"):
        pv.priors.FlowPrior(2, hidden=bad)


def test_data_outside_the_support_is_refused_naming_a_point_and_a_value():
    likelihood = pv.likelihoods.Bernoulli()
    likelihood.setup((2, 2))
    x = torch.zeros(5, 2, 2)
    x[3, 1, 0], x[4, 0, 0] = 0.5, 2.0
    with pytest.raises(pv.DataError, match=r"but 2 of the 5 points lie outside it \(point 3, e.g. 0.5\)"):
        likelihood.check_data(x)

    class OnTheSimplex(pv.likelihoods.Bernoulli):  # a support of vectors, checked a point at a time
        support = dist.constraints.simplex

    simplex = OnTheSimplex()
    simplex.setup((3,))
    with pytest.raises(pv.DataError, match=r"but 1 of the 2 points lie outside it \(point 1, e.g. 0.5\)"):
        simplex.check_data(torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.6, 0.1]]))


def test_a_model_that_fails_to_build_leaves_its_prior_and_likelihood_free():
    prior, likelihood = pv.priors.VampPrior(num_components=3), pv.likelihoods.Bernoulli()
    with pytest.raises(ValueError, match="Unknown activation"):
        pv.VAE(X_SHAPE, Z_DIM, prior=prior, likelihood=likelihood, hidden=(8,), activation="sigmoid")
    vae = pv.VAE(X_SHAPE, Z_DIM, prior=prior, likelihood=likelihood, hidden=(8,))  # the same two, once it builds
    assert vae.prior is prior and prior.owned and likelihood.owned


def test_the_flow_scores_a_z_again_after_a_step_with_the_new_weights():
    """Pyro's autoregressive transform answered the same z tensor from its last call: after an in-place step
    the flow gave the density before it, and a z first scored without gradients gave the last layer none."""
    prior = pv.priors.FlowPrior(num_layers=2)
    prior.setup(4, x_shape=X_SHAPE, encoder=None)
    z = torch.randn(5, 4)
    prior().log_prob(z)
    with torch.no_grad():
        for parameter in prior.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    torch.testing.assert_close(prior().log_prob(z), prior().log_prob(z.clone()))
    with torch.no_grad():
        prior().log_prob(z)
    prior().log_prob(z).sum().backward()
    assert all(layer.arn.layers[0].weight.grad.abs().sum() > 0 for layer in prior.layers)
