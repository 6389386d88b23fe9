"""The compiled Bernoulli log-density of the evaluators, and its gradient, against the plain formula."""

import warnings

import pytest
import torch

import pyro_vae as pv
from pyro_vae.accel import bernoulli as fused
from pyro_vae.accel.compiling import CompiledOnce
from pyro_vae.components.likelihoods import Bernoulli, bernoulli_log_prob_sum
from pyro_vae.infer.ais import PILOT_CHAINS


def reference(logits, value):
    """sum_d log Bernoulli(value_d; sigmoid(logits_d)) in float64 by torch.distributions, and sum_d |its terms|."""
    terms = torch.distributions.Bernoulli(logits=logits.double()).log_prob(value.double())
    return terms.sum(-1), terms.abs().sum(-1)


def float32_tolerance(magnitude):
    """8 float32 epsilons of the terms' total size: a float32 sum of D terms is only that exact (the eager
    softplus errs by up to 2 epsilons here); the 112-factor products add ~112 eps per group, far below it."""
    return 8 * torch.finfo(torch.float32).eps * magnitude + 1e-5


# D = 784 (MNIST: 7 groups of 112), 2 groups of 64, 127 padded by one, 7 pixels padded to a group of 16
@pytest.mark.parametrize("size", [784, 128, 127, 7])
def test_fused_sum_matches_the_float64_formula(size):
    torch.manual_seed(size)
    logits = 5 * torch.randn(30, 8, size)  # broadcast: (K, N, D) logits, (N, D) data, as in the evaluator
    value = torch.rand(8, size).round()
    with torch.no_grad():
        fast = fused.compiled_bernoulli_log_prob_sum(logits, value)
    assert fast.shape == (30, 8)
    exact, magnitude = reference(logits, value)
    assert ((fast.double() - exact).abs() <= float32_tolerance(magnitude)).all()


def test_fused_sum_is_exact_at_infinite_and_huge_logits():
    logits = torch.tensor([[-torch.inf, torch.inf, 200.0, -200.0]])
    value = torch.tensor([0.0, 1.0, 1.0, 0.0])
    with torch.no_grad():
        assert fused.compiled_bernoulli_log_prob_sum(logits, value).item() == 0.0
        assert fused.compiled_bernoulli_log_prob_sum(logits, 1 - value).item() == -torch.inf


def test_the_likelihood_stays_eager_and_the_evaluators_kernel_is_compiled_with_its_gradient(monkeypatch):
    calls = []
    compiled = fused._compiled_log_sigmoid_sum
    monkeypatch.setattr(fused, "_compiled_log_sigmoid_sum", lambda *args: calls.append(1) or compiled(*args))
    likelihood = Bernoulli()
    likelihood.setup((1, 28, 28))
    params = (4 * torch.randn(6, 5, 1, 1, 28, 28)).requires_grad_()
    x = torch.rand(5, 1, 28, 28).round()
    kernel = fused.LOG_DENSITY_KERNELS[type(likelihood(params))]
    eager = likelihood(params).log_prob(x)  # the likelihood itself, as training uses it: eager softplus
    assert not calls
    evaluated = kernel(likelihood(params), x)
    plated = kernel(likelihood(params).expand((2, 6, 5)), x)  # Pyro's plates expand the distribution
    assert len(calls) == 2 and eager.shape == evaluated.shape == (6, 5)
    assert torch.allclose(evaluated, eager, rtol=2e-6, atol=0)  # ~16 float32 eps of |log p| ~ 1000
    # a kernel compiled for another shape may sum in another order: equal up to float32 rounding
    assert torch.allclose(plated, evaluated.expand(2, 6, 5), rtol=2e-6, atol=0)
    weights = torch.randn(6, 5)
    (eager_grad,) = torch.autograd.grad((eager * weights).sum(), params)
    (kernel_grad,) = torch.autograd.grad((evaluated * weights).sum(), params)
    expected = weights[..., None, None, None, None] * (
        x[:, None] - torch.sigmoid(params.detach())
    )  # d/dl [xl - softplus(l)]
    assert torch.allclose(eager_grad, expected, atol=1e-5) and torch.allclose(kernel_grad, expected, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(kernel(likelihood(params), x), evaluated)  # no gradient: the same kernel


def test_the_evaluators_compile_from_a_size_on_and_agree_with_the_eager_density(monkeypatch):
    """Importance sampling and AIS use the compiled kernel for evaluations of at least MIN_COMPILED_ELEMENTS
    data elements times density evaluations, and the eager density below: the same numbers either way."""
    vae = pv.VAE((1, 28, 28), 4, hidden=(16,))
    x = torch.rand(6, 1, 28, 28).round()
    calls = []
    kernel = fused._compiled_log_sigmoid_sum
    monkeypatch.setattr(fused, "_compiled_log_sigmoid_sum", lambda *args: calls.append(1) or kernel(*args))
    assert x.numel() * 50 < fused.MIN_COMPILED_ELEMENTS  # a small evaluation, at the library's threshold
    eager = pv.log_marginal_likelihood(vae.model, vae.guide, x, num_samples=50)
    assert not calls
    monkeypatch.setattr(fused, "MIN_COMPILED_ELEMENTS", x.numel() * 50)  # this evaluation is just large enough
    compiled = pv.log_marginal_likelihood(vae.model, vae.guide, x, num_samples=50)
    assert calls
    assert torch.allclose(compiled.log_px, eager.log_px, rtol=2e-6, atol=0)
    calls.clear()
    assert pv.log_marginal_likelihood(vae.model, vae.guide, x, num_samples=49).log_px.isfinite().all()
    assert not calls  # one particle fewer: below it
    # replayed passes take the kernel's definition into their recording; the few passes outside the replay
    # (the first, validating one; one of another shape) do not compile the kernel for themselves
    replayed = pv.log_marginal_likelihood(vae.model, vae.guide, x, num_samples=50, replay=True, batch_size=4)
    assert not calls
    traced = pv.log_marginal_likelihood(vae.model, vae.guide, x, num_samples=50, replay=False, batch_size=4)
    assert calls and torch.allclose(replayed.log_px, traced.log_px, rtol=2e-6, atol=0)  # the same draws
    calls.clear()
    # AIS: C chains and the pilots x T steps x L leapfrog steps evaluate the densities (and their gradients)
    ais = dict(num_steps=5, num_chains=3, leapfrog_steps=2, seed=0)
    chains = 3 + PILOT_CHAINS
    monkeypatch.setattr(fused, "MIN_COMPILED_ELEMENTS", x.numel() * chains * 5 * 2 + 1)
    eager = pv.ais_log_marginal_likelihood(vae.model, vae.guide, x, **ais)
    assert not calls
    monkeypatch.setattr(fused, "MIN_COMPILED_ELEMENTS", x.numel() * chains * 5 * 2)
    compiled = pv.ais_log_marginal_likelihood(vae.model, vae.guide, x, **ais)
    assert calls
    assert torch.allclose(compiled.log_px, eager.log_px, rtol=1e-5, atol=0)


def test_a_failed_compile_warns_once_and_falls_back_to_the_same_numbers():
    def broken(*args):
        raise RuntimeError("no C++ compiler\nsecond line")

    kernel = CompiledOnce(fused.grouped_log_sigmoid_sum, bernoulli_log_prob_sum, "the Bernoulli log-density")
    kernel.compiled = broken
    logits, value = torch.randn(4, 784), torch.rand(4, 784).round()
    with pytest.warns(RuntimeWarning, match="no C.. compiler.*falls back to eager"):
        first = kernel(logits, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        second = kernel(logits, value)
    assert kernel.failed and torch.equal(first, second)
    exact, magnitude = reference(logits, value)
    assert ((first.double() - exact).abs() <= float32_tolerance(magnitude)).all()


def test_an_error_of_the_inputs_is_raised_and_keeps_the_compiled_code():
    """Shapes that fail eagerly too are no compiler failure: the eager error, no warning, the compiled code kept."""

    def compiled(*args):
        raise RuntimeError("the compiled kernel's own message for the same bad shapes")

    kernel = CompiledOnce(fused.grouped_log_sigmoid_sum, bernoulli_log_prob_sum, "the Bernoulli log-density")
    kernel.compiled = compiled
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="must match the size"):
            kernel(torch.randn(4, 784), torch.rand(4, 783).round())
    assert not kernel.failed and kernel.compiled is compiled
