"""The evaluator's recorded, compiled passes against Pyro's eager passes."""

import logging

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import small_vae

import pyro_vae as pv
from pyro_vae.infer import importance


class Counted:
    """A guide that counts its calls: an eager pass calls it, a replayed pass does not."""

    def __init__(self, guide):
        self.guide, self.calls = guide, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.guide(*args, **kwargs)


def linear_gaussian():
    """Continuous latent, Gaussian likelihood; the guide is a learned-looking affine map of x."""
    W, b = torch.randn(4, 2), torch.randn(4)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + b, 0.7).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.3 * (x - b) @ W, 0.8).to_event(1))

    return model, guide, torch.randn(20, 4)


def two_layers_and_a_discrete_site():
    """y ~ Categorical, z1 ~ N(mu_y, I), z2 | z1 ~ N(A z1, 0.5^2 I), x | z2 ~ N(z2, I); the guide samples all three."""
    mu, A = torch.randn(3, 2), torch.randn(3, 2)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(torch.ones(3) / 3))
            z1 = pyro.sample("z1", dist.Normal(mu[y], 1.0).to_event(1))
            z2 = pyro.sample("z2", dist.Normal(z1 @ A.T, 0.5).to_event(1))
            pyro.sample("x", dist.Normal(z2, 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(logits=x[..., :3]))
            z1 = pyro.sample("z1", dist.Normal(mu[y] + 0.1 * x[..., :2], 0.9).to_event(1))
            pyro.sample("z2", dist.Normal(z1 @ A.T, 0.6).to_event(1))

    return model, guide, torch.randn(20, 3)


def bernoulli_vae():
    vae = small_vae(hidden=(32,), z_dim=4)
    return vae.model, vae.guide, torch.rand(20, 1, 28, 28).round()


def evaluate(model, guide, x, replay):
    """20 points in 2 full batches, 4 passes of 50 particles each, after one checked pass of a particle a point."""
    return pv.log_marginal_likelihood(
        model, guide, x, num_samples=200, batch_size=10, max_samples_per_pass=500, seed=3, replay=replay
    )


@pytest.mark.parametrize("program", [linear_gaussian, two_layers_and_a_discrete_site, bernoulli_vae])
def test_a_replay_draws_the_eager_samples_and_gives_the_eager_numbers(program):
    model, guide, x = program()
    eager_guide, replayed_guide = Counted(guide), Counted(guide)
    eager = evaluate(model, eager_guide, x, replay=False)
    replayed = evaluate(model, replayed_guide, x, replay=True)
    # 1 call to find the plate nesting, 1 to check the points, 8 passes eagerly; with replay: the nesting, the
    # check and the recording (on fake tensors), and no call for the 8 replayed passes.
    assert (eager_guide.calls, replayed_guide.calls) == (10, 3)
    # The same draws (fallback_random), so the same numbers up to the rounding of fused float32 kernels.
    for name in ("log_px", "elbo", "reconstruction", "kl"):
        torch.testing.assert_close(getattr(replayed, name), getattr(eager, name), rtol=1e-5, atol=1e-4)
    # ESS = exp(2 lse - lse2) turns a rounding of the logsumexps, one float32 ulp of |log w| (6e-5 at the
    # VAE's |log w| ~ 550), into a relative error of twice that; 4 ulps leave room.
    ulps = 4 * torch.finfo(torch.float32).eps * float(eager.log_px.abs().max())
    torch.testing.assert_close(replayed.ess, eager.ess, rtol=max(ulps, 1e-5), atol=0)
    # k is fitted to the largest weights, which move with them by rounding: measured at most 8e-5 apart.
    torch.testing.assert_close(replayed.pareto_k, eager.pareto_k, rtol=0, atol=1e-3)


def test_python_that_decides_on_tensor_values_is_not_recorded_but_runs_eagerly(caplog):
    model, guide, x = linear_gaussian()

    def branching_guide(x):
        if x.sum() > 0:  # a decision on a value: a recording would freeze it, so recording refuses
            return guide(x)
        return guide(-x)

    counted = Counted(branching_guide)
    with caplog.at_level(logging.INFO, logger="pyro_vae.accel.replay"):
        replayed = evaluate(model, counted, x, replay=True)
    assert "cannot be recorded" in caplog.text
    assert counted.calls == 1 + 1 + 1 + 8  # the nesting, the check, the failed recording, every pass eagerly
    eager = evaluate(model, branching_guide, x, replay=False)
    assert torch.equal(replayed.log_px, eager.log_px)


def test_replay_is_chosen_by_the_amount_of_work(monkeypatch):
    model, guide, x = linear_gaussian()
    counted = Counted(guide)
    pv.log_marginal_likelihood(model, counted, x, num_samples=200, batch_size=10, max_samples_per_pass=500)
    assert counted.calls == 10  # the nesting, the check, 8 passes: below MIN_REPLAYED_PASSES, not worth compiling
    monkeypatch.setattr(importance, "MIN_REPLAYED_PASSES", 8)
    counted.calls = 0
    pv.log_marginal_likelihood(model, counted, x, num_samples=200, batch_size=10, max_samples_per_pass=500)
    assert counted.calls == 3


def test_a_compiler_failure_warns_and_runs_every_pass_eagerly(monkeypatch):
    model, guide, x = linear_gaussian()

    def broken_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch._inductor, "compile", broken_compiler)
    counted = Counted(guide)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler.*run eagerly"):
        replayed = evaluate(model, counted, x, replay=True)
    assert counted.calls == 1 + 1 + 1 + 8  # the nesting, the check, the recording, every pass eagerly
    assert torch.equal(replayed.log_px, evaluate(model, guide, x, replay=False).log_px)


def test_each_call_records_the_parameters_it_is_given():
    # A recording freezes the parameters it reads; a later call, after training changed them, records anew.
    vae, x = small_vae(hidden=(32,), z_dim=4), torch.rand(20, 1, 28, 28).round()
    before = evaluate(vae.model, vae.guide, x, replay=True)
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.mul_(1.5)
    after = evaluate(vae.model, vae.guide, x, replay=True)
    assert not torch.allclose(after.log_px, before.log_px, rtol=1e-3)
    eager = evaluate(vae.model, vae.guide, x, replay=False)
    torch.testing.assert_close(after.log_px, eager.log_px, rtol=1e-5, atol=1e-4)
