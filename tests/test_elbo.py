"""The ELBO that Pyro computes on our model and guide against closed forms."""

import math

import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import nn

import pyro_vae as pv


class LinearEncoder(nn.Module):
    """q(z|x) = N(A x + a, diag(exp(s))^2): a Gaussian encoder whose moments we can read off."""

    def __init__(self, d, z_dim):
        super().__init__()
        self.lin = nn.Linear(d, z_dim)
        self.log_scale = nn.Parameter(torch.randn(z_dim) * 0.3)

    def forward(self, x):
        loc = self.lin(x)
        return loc, self.log_scale.exp().expand_as(loc)


class LinearDecoder(nn.Module):
    """The mean W z + b, as one decoder output per data dimension."""

    def __init__(self, z_dim, d):
        super().__init__()
        self.lin = nn.Linear(z_dim, d)

    def forward(self, z):
        return self.lin(z).unsqueeze(-2)


def closed_form_elbo(vae, x):
    """E_q[log N(x; Wz+b, s^2 I)] - KL(N(mu, diag sigma^2) || N(0, I)), per data point."""
    mu, sigma = vae.encoder(x)
    W, b = vae.decoder.lin.weight, vae.decoder.lin.bias
    s = float(vae.likelihood.scale())
    d = x.shape[-1]
    mean_sq = ((x - mu @ W.T - b) ** 2).sum(-1) + (W**2 @ sigma.T**2).sum(0)
    expected_log_lik = -0.5 * d * math.log(2 * math.pi * s**2) - mean_sq / (2 * s**2)
    kl = 0.5 * (mu**2 + sigma**2 - torch.log(sigma**2) - 1).sum(-1)
    return expected_log_lik - kl, kl


@pytest.fixture
def linear_vae():
    d, z_dim = 6, 3
    vae = pv.VAE(
        (d,),
        z_dim,
        likelihood=pv.likelihoods.Gaussian(sigma="fixed", init_sigma=0.7),
        encoder=LinearEncoder(d, z_dim),
        decoder=LinearDecoder(z_dim, d),
    )
    return vae, torch.randn(8, d)


@torch.no_grad()
def test_trace_elbo_matches_closed_form(linear_vae):
    vae, x = linear_vae
    truth, _ = closed_form_elbo(vae, x)
    particles = 20_000
    estimate = -Trace_ELBO(num_particles=particles, vectorize_particles=True).loss(vae.model, vae.guide, x)
    # Monte Carlo tolerance: 4 standard errors of the particle mean of the summed ELBO
    # (the spread per particle comes from the same traces Pyro uses).
    per_particle = pv.site_log_densities(vae.model, vae.guide, x, num_particles=particles).log_weights.sum(-1)
    tolerance = 4 * float(per_particle.std()) / math.sqrt(particles)
    assert abs(estimate - float(truth.sum())) < tolerance


@torch.no_grad()
def test_meanfield_elbo_uses_the_closed_form_kl(linear_vae):
    """TraceMeanField_ELBO's KL is exact, so only the reconstruction term is Monte Carlo."""
    vae, x = linear_vae
    truth, kl = closed_form_elbo(vae, x)
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    pyro_kl = torch.distributions.kl_divergence(guide_trace.nodes["z"]["fn"], model_trace.nodes["z"]["fn"])
    torch.testing.assert_close(pyro_kl, kl)
    particles = 20_000
    estimate = -TraceMeanField_ELBO(num_particles=particles, vectorize_particles=True).loss(vae.model, vae.guide, x)
    recon = pv.site_log_densities(vae.model, vae.guide, x, num_particles=particles).reconstruction.sum(-1)
    assert abs(estimate - float(truth.sum())) < 4 * float(recon.std()) / math.sqrt(particles)


@torch.no_grad()
def test_elbo_per_point_matches_closed_form(linear_vae):
    vae, x = linear_vae
    truth, _ = closed_form_elbo(vae, x)
    particles = 20_000
    estimate = pv.elbo_per_point(vae.model, vae.guide, x, num_particles=particles).elbo
    spread = pv.site_log_densities(vae.model, vae.guide, x, num_particles=particles).log_weights.std(0)
    # the largest of the 8 points' errors, each against the largest spread: at 4.5 standard errors the
    # chance that any point strays past it is about 5e-5 under the normal approximation
    assert (estimate - truth).abs().max() < 4.5 * spread.max() / math.sqrt(particles)


@torch.no_grad()
def test_kl_weight_scales_only_the_kl_term(linear_vae):
    """With an exact KL, loss(w) = -E[log p(x|z)] + w * KL: the weight reaches z through poutine.scale."""
    vae, x = linear_vae
    _, kl = closed_form_elbo(vae, x)
    elbo = TraceMeanField_ELBO()
    torch.manual_seed(1)
    loss_full = elbo.loss(vae.model, vae.guide, x)
    torch.manual_seed(1)
    loss_weighted = elbo.loss(vae.model, vae.guide, x, kl_weight=0.25)
    # the same draws: only the float32 rounding of the two losses separates the difference from 0.75 KL
    assert loss_full - loss_weighted == pytest.approx(0.75 * float(kl.sum()), rel=1e-4)


@torch.no_grad()
def test_evaluation_ignores_kl_weight_and_minibatch_scaling(linear_vae):
    vae, x = linear_vae
    results = []
    for kwargs in ({}, {"kl_weight": 0.1}, {"num_data": 1000}):
        torch.manual_seed(3)
        results.append(pv.elbo_per_point(vae.model, vae.guide, x, num_particles=10, **kwargs).elbo)
    torch.testing.assert_close(results[0], results[1])
    torch.testing.assert_close(results[0], results[2])


def test_minibatch_plate_scales_the_loss(linear_vae):
    vae, x = linear_vae
    elbo = TraceMeanField_ELBO()
    torch.manual_seed(2)
    loss = elbo.loss(vae.model, vae.guide, x)
    torch.manual_seed(2)
    scaled = elbo.loss(vae.model, vae.guide, x, num_data=10 * len(x))
    assert scaled == pytest.approx(10 * loss, rel=1e-5)
