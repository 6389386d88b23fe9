"""The model and guide are ordinary Pyro programs that follow the conventions in DESIGN.md."""

import pyro
import pyro.poutine as poutine
import pytest
import torch
from conftest import small_vae
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from torch import nn

import pyro_vae as pv
from pyro_vae.components.nets import build_nets
from pyro_vae.models import build_model
from pyro_vae.runs.directory import model_config_matches


def test_sites_plates_and_shapes(small_mnist):
    vae = small_vae()
    x = small_mnist.val.x[:5]
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    z, obs = model_trace.nodes["z"], model_trace.nodes["x"]
    for site in (z, obs, guide_trace.nodes["z"]):
        assert [(f.name, f.dim) for f in site["cond_indep_stack"]] == [("data", -1)]
    assert z["fn"].batch_shape == (5,) and z["fn"].event_shape == (8,)
    assert obs["is_observed"] and obs["fn"].batch_shape == (5,) and obs["fn"].event_shape == (1, 28, 28)
    assert guide_trace.nodes["z"]["value"].shape == (5, 8)


def test_svi_by_hand_with_pyro_optim(small_mnist):
    vae = small_vae()
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    x = small_mnist.val.x[:200]
    first = svi.step(x)
    for _ in range(60):
        last = svi.step(x)
    assert last < first - 50 * len(x)  # the untrained loss is ~545 nats per point


def test_two_vaes_never_share_parameters(small_mnist):
    """Each VAE registers its modules under its own name in Pyro's param store: a step of one leaves the other."""
    x = small_mnist.val.x[:64]
    first, second = small_vae(), small_vae()
    untouched = [p.detach().clone() for p in second.parameters()]
    SVI(first.model, first.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO()).step(x)
    assert all(torch.equal(b, p) for b, p in zip(untouched, second.parameters(), strict=True))
    names_of_first = set(pyro.get_param_store().keys())
    svi = SVI(second.model, second.guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())
    svi.step(x)
    names_of_second = set(pyro.get_param_store().keys()) - names_of_first
    assert names_of_first and len(names_of_second) == len(names_of_first)  # the second's own, none reused
    assert all(name.startswith(first.pyro_name) for name in names_of_first)
    assert all(name.startswith(second.pyro_name) for name in names_of_second)
    assert all(not torch.equal(b, p) for b, p in zip(untouched, second.parameters(), strict=True))


def test_predictive_draws_latents_and_new_data(small_mnist):
    vae = small_vae()
    x = small_mnist.val.x[:4]
    posterior = Predictive(vae.model, guide=vae.guide, num_samples=3, return_sites=("z",))(x)
    assert posterior["z"].shape == (3, 4, 8)
    prior = Predictive(vae.model, num_samples=2)(None, batch_size=5)
    assert prior["x"].shape == (2, 5, 1, 28, 28) and set(prior["x"].unique().tolist()) <= {0.0, 1.0}


def test_vectorized_particles_estimate_the_same_elbo(small_mnist):
    """The model and guide under Pyro's particle plate: the vectorised estimate of the loss from 256
    particles agrees with 256 one-particle losses within 5 standard errors of the difference (the
    per-particle spread estimated from the one-particle losses; a false alarm in about one run in 10^6)."""
    vae, x = small_vae(arch="conv", hidden=(32,)), small_mnist.val.x[:6]
    vectorised = Trace_ELBO(num_particles=256, vectorize_particles=True, max_plate_nesting=1).loss(
        vae.model, vae.guide, x
    )
    single = torch.tensor([Trace_ELBO(max_plate_nesting=1).loss(vae.model, vae.guide, x) for _ in range(256)])
    se = single.std().item() * (2 / 256) ** 0.5
    assert abs(vectorised - single.mean().item()) < 5 * se, (vectorised, single.mean().item(), se)


def test_sample_reconstruct_encode(small_mnist):
    vae = small_vae()
    x = small_mnist.val.x[:3]
    loc, scale = vae.encode(x)
    assert loc.shape == scale.shape == (3, 8) and (scale > 0).all()
    assert vae.reconstruct(x).shape == x.shape
    samples = vae.sample(7)
    assert samples.shape == (7, 1, 28, 28) and 0 <= samples.min() and samples.max() <= 1


def test_encoder_scale_stays_positive_for_extreme_inputs():
    encoder = pv.nets.MLPEncoder((4,), 2, hidden=(8,))
    with torch.no_grad():
        for layer in encoder.net:
            if isinstance(layer, nn.Linear):
                layer.weight.fill_(-1e3)
        _, scale = encoder(torch.full((3, 4), 1e3))
    assert torch.isfinite(scale).all() and (scale > 0).all()


@pytest.mark.parametrize("family", [pv.likelihoods.Gaussian, pv.likelihoods.Laplace])
@pytest.mark.parametrize("mode, trainable", [("fixed", 0), ("shared", 1), ("per-dim", 784), ("decoder", 0)])
def test_location_scale_modes(family, mode, trainable):
    likelihood = family(mode, 0.2)
    vae = pv.VAE((1, 28, 28), 4, likelihood=likelihood, hidden=(16,))
    assert sum(p.numel() for p in likelihood.parameters()) == trainable
    assert vae.decoder(torch.zeros(2, 4)).shape == (2, 2 if mode == "decoder" else 1, 1, 28, 28)
    if mode == "decoder":
        # a decoder output of zero gives the initial scale; huge negative outputs stop at the lower bound
        torch.testing.assert_close(likelihood.scale(torch.zeros(2, 2, 1, 28, 28)).min(), torch.tensor(0.2))
        assert likelihood.scale(torch.full((2, 2, 1, 28, 28), -1e4)).min() == likelihood.min_scale
    else:
        torch.testing.assert_close(likelihood.scale().min(), torch.tensor(0.2))
    x = torch.rand(3, 1, 28, 28)
    loss = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    loss.backward()
    assert torch.isfinite(loss)
    if trainable:
        assert (likelihood.raw_scale.grad != 0).all()  # every learned scale gets a gradient
    assert pv.likelihoods.build_likelihood(likelihood.config()).config() == likelihood.config()


def test_config_round_trip():
    vae = pv.VAE(
        (1, 28, 28),
        6,
        likelihood=pv.likelihoods.Gaussian(sigma="per-dim", init_sigma=0.3),
        hidden=(32, 16),
        arch="mlp",
    )
    rebuilt = pv.VAE.from_config(vae.config())
    assert rebuilt.config() == vae.config()
    rebuilt.load_state_dict(vae.state_dict())


def test_a_conv_run_recorded_with_several_hidden_sizes_still_loads_with_its_first():
    """The command line once accepted --arch conv --hidden 64 32 and built the dense layer of 64."""
    with pytest.raises(ValueError, match="one dense layer"):
        pv.VAE((1, 28, 28), 4, hidden=(64, 32), arch="conv")
    old = {**pv.VAE((1, 28, 28), 4, hidden=(64,), arch="conv").config(), "hidden": [64, 32]}
    rebuilt = build_model(old)
    assert rebuilt.config()["hidden"] == [64] and model_config_matches(old, rebuilt.config())


def test_custom_networks_follow_the_documented_signature():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x):
            loc, raw = self.lin(x).chunk(2, -1)
            return loc, nn.functional.softplus(raw) + 1e-3

    decoder = nn.Sequential(nn.Linear(2, 3), nn.Unflatten(-1, (1, 3)))
    vae = pv.VAE((3,), 2, likelihood=pv.likelihoods.Gaussian(), encoder=Encoder(), decoder=decoder)
    assert torch.isfinite(torch.tensor(Trace_ELBO().loss(vae.model, vae.guide, torch.randn(5, 3))))
    with pytest.raises(ValueError, match="custom encoder"):
        vae.config()


def test_custom_networks_of_the_wrong_shape_are_refused_at_construction():
    """A decoder without the params_per_dim axis would be read along the batch axis: every point decoded from
    the first one's code, and no error. Refused when the VAE is built, with the shape it needs."""
    flat = nn.Sequential(nn.Linear(2, 784), nn.Unflatten(-1, (1, 28, 28)))  # (batch, 1, 28, 28): the axis left out
    with pytest.raises(ValueError, match=r"gives \(2, 1, 28, 28\) for 2 latent codes.*\(2, 1, 1, 28, 28\)"):
        pv.VAE((1, 28, 28), 2, decoder=flat)
    one_output = nn.Sequential(nn.Flatten(), nn.Linear(784, 2))  # returns loc only

    with pytest.raises(ValueError, match=r"encoder gives Tensor for 2 points; q\(z \| x\) reads \(loc, scale\)"):
        pv.VAE((1, 28, 28), 2, encoder=one_output)
    decoder = nn.Sequential(nn.Linear(2, 784), nn.BatchNorm1d(784), nn.Unflatten(-1, (1, 1, 28, 28)))
    pv.VAE((1, 28, 28), 2, decoder=decoder)
    assert decoder.training and decoder[1].num_batches_tracked == 0  # the probe left the batch statistics alone


def test_conv_architecture_rejects_non_image_shapes():
    with pytest.raises(ValueError, match="divisible by 4"):
        pv.VAE((1, 30, 30), 4, arch="conv")


def test_the_networks_take_any_number_of_leading_batch_dimensions_none_included():
    """The conv encoder failed on one image without a batch dimension (unflatten of an empty shape)."""
    for arch in ("mlp", "conv"):
        encoder, decoder = build_nets(arch, (1, 28, 28), 3, (16,), params_per_dim=1)
        x = torch.rand(2, 5, 1, 28, 28)
        loc, scale = encoder(x)
        single_loc, single_scale = encoder(x[0, 0])
        assert loc.shape == scale.shape == (2, 5, 3) and single_loc.shape == single_scale.shape == (3,)
        torch.testing.assert_close(single_loc, loc[0, 0])
        assert decoder(loc).shape == (2, 5, 1, 1, 28, 28) and decoder(single_loc).shape == (1, 1, 28, 28)
