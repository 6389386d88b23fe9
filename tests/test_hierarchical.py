"""The VAE with two stochastic layers (pv.HierarchicalVAE) against closed forms, and through every tool.

A linear-Gaussian two-layer model has its ELBO and its log p(x) in closed
form: with no hidden layers, and the networks' scale outputs cut off from
their inputs, every conditional is a linear-Gaussian map with a constant
covariance,

    z2 ~ N(0, I),  z1 | z2 ~ N(C z2 + c, T),  x | z1 ~ N(W z1 + b, s^2 I),
    q(z1 | x) = N(A1 x + a1, S1),  q(z2 | z1) = N(A2 z1 + a2, S2),

so x ~ N(W c + b, W (C C^T + T) W^T + s^2 I), and the ELBO is a sum of
expected quadratic forms under the Gaussian q(z1, z2 | x).
"""

import math

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.poutine.util import site_is_subsample

import pyro_vae as pv
from pyro_vae.components.nets import inverse_softplus
from pyro_vae.components.priors import PRIORS, build_prior
from pyro_vae.infer.densities import site_log_densities

D, Z1, Z2, S = 5, 3, 2, 0.8


@pytest.fixture
def linear_two_layer():
    """The linear-Gaussian model, its guide near the posterior: the exact means, shifted, and the diagonals too wide.

    The exact posterior is p(z1 | x) p(z2 | z1) (z2 is independent of x given z1), both Gaussian with
    correlated covariances; the guide's are diagonal, 1.2 times the posterior's standard deviations,
    and its means are shifted by 0.2.
    """
    model = pv.HierarchicalVAE(
        (D,),
        z_dims=(Z1, Z2),
        hidden=((), ()),
        likelihood=pv.likelihoods.Gaussian(sigma="fixed", init_sigma=S),
    )
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for net in [*model.encoders, *model.conditionals]:
            layer, size = net.net[0], net.net[0].out_features // 2
            layer.weight.copy_(0.6 * torch.randn(layer.weight.shape, generator=generator))
            layer.weight[size:] = 0.0  # the scale: softplus(bias) + min_scale, constant in the input
            layer.bias.copy_(0.3 * torch.randn(layer.bias.shape, generator=generator))
        decoder = model.decoder.net[0]
        decoder.weight.copy_(torch.randn(decoder.weight.shape, generator=generator))
        C, c, T = affine_gaussian(model.conditionals[0])
        W, b = decoder.weight, decoder.bias
        prior_z1 = C @ C.T + T  # z1 ~ N(c, C C^T + T)
        covariance1 = torch.linalg.inv(torch.linalg.inv(prior_z1) + W.T @ W / S**2)
        set_gaussian(
            model.encoders[0],
            covariance1 @ W.T / S**2,
            covariance1 @ (torch.linalg.solve(prior_z1, c) - W.T @ b / S**2),
            covariance1,
        )
        covariance2 = torch.linalg.inv(torch.eye(Z2) + C.T @ torch.linalg.solve(T, C))
        gain = covariance2 @ C.T @ torch.linalg.inv(T)
        set_gaussian(model.encoders[1], gain, -gain @ c, covariance2)
    return model, torch.randn(6, D, generator=generator)


def set_gaussian(net, weight, bias, covariance):
    """Make a Gaussian MLP without hidden layers the map x -> N(weight x + bias + 0.2, 1.44 diag(covariance))."""
    layer, size = net.net[0], net.net[0].out_features // 2
    layer.weight[:size], layer.bias[:size] = weight, bias + 0.2
    scale = 1.2 * covariance.diagonal().sqrt() - net.head.min_scale
    layer.bias[size:] = inverse_softplus(scale)


def affine_gaussian(net):
    """(M, m, diag covariance) of a Gaussian MLP without hidden layers whose scale is constant."""
    layer, size = net.net[0], net.net[0].out_features // 2
    scale = torch.nn.functional.softplus(layer.bias[size:]) + net.head.min_scale
    return layer.weight[:size], layer.bias[:size], torch.diag(scale**2)


def gaussian_entropy(covariance):
    return 0.5 * torch.logdet(2 * math.pi * math.e * covariance)


def expected_log_normal(mean_residual, residual_covariance, covariance):
    """E log N(r; 0, covariance) for r ~ N(mean_residual, residual_covariance), per row of mean_residual."""
    k, precision = covariance.shape[0], torch.linalg.inv(covariance)
    quadratic = (mean_residual @ precision * mean_residual).sum(-1) + torch.trace(precision @ residual_covariance)
    return -0.5 * (k * math.log(2 * math.pi) + torch.logdet(covariance) + quadratic)


@torch.no_grad()
def closed_form_elbo(model, x):
    A1, a1, S1 = affine_gaussian(model.encoders[0])
    A2, a2, S2 = affine_gaussian(model.encoders[1])
    C, c, T = affine_gaussian(model.conditionals[0])
    W, b = model.decoder.net[0].weight, model.decoder.net[0].bias
    m1 = x @ A1.T + a1
    m2 = m1 @ A2.T + a2
    cov2 = A2 @ S1 @ A2.T + S2
    log_lik = expected_log_normal(x - m1 @ W.T - b, W @ S1 @ W.T, S**2 * torch.eye(D))
    # z1 - C z2 - c = (I - C A2) z1 - C a2 - c - C (z2 - A2 z1 - a2)
    M = torch.eye(Z1) - C @ A2
    log_p_z1 = expected_log_normal(m1 - m2 @ C.T - c, M @ S1 @ M.T + C @ S2 @ C.T, T)
    log_p_z2 = expected_log_normal(m2, cov2, torch.eye(Z2))
    return log_lik + log_p_z1 + log_p_z2 + gaussian_entropy(S1) + gaussian_entropy(S2)


@torch.no_grad()
def closed_form_log_px(model, x):
    C, c, T = affine_gaussian(model.conditionals[0])
    W, b = model.decoder.net[0].weight, model.decoder.net[0].bias
    covariance = W @ (C @ C.T + T) @ W.T + S**2 * torch.eye(D)
    return torch.distributions.MultivariateNormal(W @ c + b, covariance).log_prob(x)


@torch.no_grad()
def test_the_elbo_matches_its_closed_form(linear_two_layer):
    """The Monte Carlo ELBO of 200,000 particles per point is within 4 of its standard errors of the closed form.

    4 standard errors: a false alarm has probability 6e-5 per point (normal approximation); the
    standard errors are about 0.005 nats, so an error of a few hundredths of a nat in any term fails.
    """
    model, x = linear_two_layer
    log_weights = site_log_densities(model.model, model.guide, x, num_particles=200_000).log_weights
    estimate, se = log_weights.mean(0), log_weights.std(0) / math.sqrt(log_weights.shape[0])
    exact = closed_form_elbo(model, x)
    assert ((estimate - exact).abs() < 4 * se).all(), (estimate - exact) / se
    # and Pyro's own Trace_ELBO on the same programs estimates the same sum: with 20,000 particles its standard
    # error is sqrt(10) times that of 200,000, and the bound is 4 of them
    loss = Trace_ELBO(num_particles=20_000, vectorize_particles=True, max_plate_nesting=1).loss(
        model.model, model.guide, x
    )
    assert -loss == pytest.approx(float(exact.sum()), abs=4 * float(se.square().sum().sqrt()) * math.sqrt(10))


@torch.no_grad()
def test_importance_sampling_and_ais_find_the_closed_form_log_px(linear_two_layer):
    """Unchanged estimators on the two-layer model: IS at K = 100,000 and AIS (T = 1000) agree with log p(x).

    Both within 0.02 nats, the AIS tolerance of the one-layer linear-Gaussian tests (tests/test_ais.py):
    IS on every point (measured 0.009 at most; 0.1 at K = 1,000, whose weights are too heavy-tailed
    for that), AIS on average over the points (0.013; its chains' spread leaves 0.024 at one point).
    """
    model, x = linear_two_layer
    exact = closed_form_log_px(model, x)
    importance = pv.log_marginal_likelihood(model.model, model.guide, x, num_samples=100_000, batch_size=6)
    assert (importance.log_px - exact).abs().max() < 0.02
    annealed = pv.ais_log_marginal_likelihood(model.model, model.guide, x, num_steps=1000, num_chains=16, seed=0)
    assert (annealed.log_px - exact).abs().mean() < 0.02


def test_every_prior_fits_at_the_top_and_every_objective_trains(small_mnist, tmp_path):
    data = small_mnist.subset(train=256, val=64, test=64)
    for prior in sorted(PRIORS):
        model = pv.HierarchicalVAE((1, 28, 28), z_dims=(6, 3), hidden=((32,), (16,)), prior=build_prior(prior))
        history = pv.fit(model, data, epochs=1, batch_size=64, progress=False, compile=False)
        assert history[1]["val_elbo"] > history[0]["val_elbo"], prior  # four steps of Adam already help
    objectives = [
        {"name": "trace", "gradient": "stl"},
        {"name": "iwae", "num_particles": 3},
        {"name": "iwae", "num_particles": 3, "gradient": "dreg"},
    ]
    for objective in objectives:
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        run = tmp_path / "-".join(map(str, objective.values()))
        history = pv.fit(
            model, data, objective=objective, epochs=1, batch_size=64, run_dir=run, progress=False, compile=False
        )
        metric = "val_iwae" if objective["name"] == "iwae" else "val_elbo"
        assert history[1][metric] > history[0][metric], objective  # its own bound, on held-out points, rose
        # The best checkpoint may still be epoch 0's (the model trained before under another objective), so
        # what is checked next is that this objective's steps moved every layer: the last weights.
        last = pv.load_run(run, checkpoint="last").model
        for name, p in last.named_parameters():
            if name.startswith(("encoders.", "conditionals.", "decoder.")):
                assert not torch.equal(before[name], p), (objective, name)
    with pytest.raises(ValueError, match="independent given x"):
        pv.fit(model, data, objective="meanfield", epochs=1, progress=False)


def test_sites_config_samples_and_active_units_per_layer(small_mnist):
    model = pv.HierarchicalVAE((1, 28, 28), z_dims=(6, 3), hidden=((32,), (16,)), prior=build_prior("vamp"))
    trace = pyro.poutine.trace(model.model).get_trace(small_mnist.test.x[:4])
    sites = [name for name, site in trace.nodes.items() if site["type"] == "sample" and not site_is_subsample(site)]
    assert sites == ["z2", "z1", "x"]
    rebuilt = pv.models.build_model(model.config())
    assert rebuilt.config() == model.config() and isinstance(rebuilt, pv.HierarchicalVAE)
    assert model.sample(5).shape == (5, 1, 28, 28) and model.reconstruct(small_mnist.test.x[:3]).shape == (3, 1, 28, 28)
    with torch.no_grad():  # z1: units 0, 2 and 4 follow x strongly, 1, 3 and 5 ignore it; z2: unit 0 only
        for encoder, (used, ignored) in zip(model.encoders, (([0, 2, 4], [1, 3, 5]), ([0], [1, 2])), strict=True):
            encoder.net[-1].weight[used] *= 20.0
            encoder.net[-1].weight[ignored] = 0.0
    assert pv.active_units_per_layer(model, small_mnist.test.x) == [3, 1]
    assert pv.active_units(model, small_mnist.test.x) == 4
    assert model.latent_means(small_mnist.test.x[:7]).shape == (7, 9) and model.z_dim == 9
    for z_dims, hidden in [((3,), ((8,),)), ((3, 2.5), ((8,), (4,))), ((3, True), ((8,), (4,))), (50, ((8,),)),
                           ((3, 2), (8, 4)), ((3, 2), ((8,),)), ((3, 2), ((8,), (0,)))]:  # fmt: skip
        with pytest.raises(ValueError, match="two or more layer sizes and one tuple of hidden sizes per layer, whole"):
            pv.HierarchicalVAE((4,), z_dims=z_dims, hidden=hidden)
    sizes = pv.HierarchicalVAE((4,), z_dims=np.array([3, 2]), hidden=[np.array([8]), [np.int64(4)]])
    assert sizes.z_dims == (3, 2) and sizes.hidden == ((8,), (4,)) and type(sizes.hidden[1][0]) is int
    with pytest.raises(ValueError, match="Unknown activation"):
        pv.HierarchicalVAE((4,), activation="sigmoid")


def test_latent_means_average_each_layer_over_the_layers_below():
    """E_q[z_l | x] = E_{z_{l-1} ~ q}[loc_l(z_{l-1})], not loc_l at the mean below: with tanh networks and a broad
    q(z_1 | x) (a collapsed first layer) the two differ by far more than the estimate's Monte Carlo error."""
    torch.manual_seed(0)
    model = pv.HierarchicalVAE((5,), z_dims=(4, 3, 2), hidden=((8,), (8,), (8,)), activation="tanh")
    with torch.no_grad():
        for encoder in model.encoders:
            encoder.net[-1].weight *= 3.0
        model.encoders[0].net[-1].bias[4:] = inverse_softplus(torch.tensor(2.0))  # q(z_1 | x) with scales near 2
    x = torch.randn(6, 5)
    state = torch.get_rng_state()
    means = model.latent_means(x, batch_size=4)
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is left alone
    torch.testing.assert_close(model.latent_means(x), means, rtol=0, atol=0)  # the same means at every call

    # Brute force: 100,000 ancestral draws per point, the networks called directly.
    with torch.no_grad():
        loc1, scale1 = model.encoders[0](x)
        z1 = loc1 + scale1 * torch.randn(100_000, *loc1.shape)
        loc2, scale2 = model.encoders[1](z1)
        loc3 = model.encoders[2](loc2 + scale2 * torch.randn_like(loc2))[0]
    truth = torch.cat([loc1, loc2.mean(0), loc3.mean(0)], -1)
    # The 100 draws of latent_means give each layer's mean with a standard error of sd(loc_l | x) / 10.
    stderr = torch.cat([torch.zeros_like(loc1), loc2.std(0) / 10, loc3.std(0) / 10], -1)
    assert ((means - truth).abs() <= 4 * stderr + 1e-6).all(), (means - truth) / stderr
    plug_in = model.encode(x)[0].detach()  # loc_l at the means below, what latent_means gave before
    error, plug_in_error = (means - truth)[:, 4:].abs().mean(), (plug_in - truth)[:, 4:].abs().mean()
    assert plug_in_error > 2 * error, (plug_in_error, error)  # seeded: 0.19 against 0.067 (the means' units)
