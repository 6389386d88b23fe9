"""The IWAE training objective against Pyro's ELBOs where they must agree."""

import math

import pytest
import torch
from conftest import discrete_latent_program, small_vae
from pyro.infer import RenyiELBO, Trace_ELBO

import pyro_vae as pv
from pyro_vae.infer.densities import negligible_share, negligible_shares, site_log_densities
from pyro_vae.infer.iwae import IWAE_ELBO


def test_one_particle_is_the_elbo(small_mnist):
    vae, x = small_vae(), small_mnist.val.x[:16]
    torch.manual_seed(0)
    ours = IWAE_ELBO(num_particles=1).loss(vae.model, vae.guide, x)
    torch.manual_seed(0)
    pyros = Trace_ELBO().loss(vae.model, vae.guide, x)
    assert ours == pytest.approx(pyros, rel=1e-5)


def test_one_data_point_matches_renyi_alpha_zero(small_mnist):
    """On one point Pyro's RenyiELBO(alpha=0) is the IWAE bound; on a batch it is the joint bound of the batch."""
    vae, x = small_vae(), small_mnist.val.x[:1]
    torch.manual_seed(1)
    ours = IWAE_ELBO(num_particles=8).loss(vae.model, vae.guide, x)
    torch.manual_seed(1)
    renyi = RenyiELBO(alpha=0, num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    assert ours == pytest.approx(renyi.loss(vae.model, vae.guide, x), rel=1e-5)


def test_bound_tightens_with_k(small_mnist):
    vae, x = small_vae(), small_mnist.val.x[:50]
    bounds = []
    for k in (1, 10, 100):
        torch.manual_seed(2)
        bounds.append(-sum(IWAE_ELBO(num_particles=k).loss(vae.model, vae.guide, x) for _ in range(5)))
    # Sums over 5 x 50 points, measured with seeds 2, 3, 4: L_1 -137,654 to -137,673, L_10 -137,315 to
    # -137,320, L_100 -137,229 to -137,234; the steps (about 350 and 85) dwarf the seeds' spread (20 and 5)
    assert bounds[0] + 100 < bounds[1] and bounds[1] + 30 < bounds[2], bounds


def test_iwae_training_improves_and_refuses_warmup(small_mnist):
    # From the random output-bias start (about -545 nats) one epoch gains over 200 nats, unmistakably.
    history = pv.fit(
        small_vae(),
        small_mnist,
        epochs=1,
        objective=pv.IWAEBound(num_particles=5),
        output_bias="random",
        progress=False,
    )
    assert history[1]["val_elbo"] > history[0]["val_elbo"] + 200
    with pytest.raises(ValueError, match="warm-up"):
        pv.fit(small_vae(), small_mnist, epochs=1, objective="iwae", warmup_epochs=1, progress=False)


def test_non_reparameterised_guide_is_refused():
    model, guide = discrete_latent_program()
    with pytest.raises(ValueError, match="reparameterisable"):
        IWAE_ELBO(num_particles=3).differentiable_loss(model, guide, torch.zeros(4))


def test_the_best_checkpoint_of_an_iwae_run_is_that_of_its_bound(small_mnist, tmp_path):
    data = small_mnist.subset(train=500, val=100, test=50)
    history = pv.fit(small_vae(), data, epochs=3, objective=pv.IWAEBound(num_particles=5), run_dir=tmp_path,
                     progress=False)  # fmt: skip
    assert all("val_iwae" in row for row in history)
    best = max(history, key=lambda row: row["val_iwae"])["epoch"]
    assert pv.RunDirectory(tmp_path).read_metrics()["best_epoch"] == best
    # the bound L_5 of the validation points, against L_5 computed here from the log weights of 5 particles,
    # over 20 independent draws: within 4 of their standard deviations (one draw's mean over the 100 points;
    # measured -205.43 against -205.41 +- 0.14, where L_1, the ELBO, is 1.4 nats lower)
    run = pv.load_run(tmp_path, checkpoint="last")
    with torch.no_grad():
        bounds = torch.stack([
            (site_log_densities(run.model.model, run.model.guide, data.val.x, num_particles=5).log_weights
             .logsumexp(0) - math.log(5)).mean()
            for _ in range(20)
        ])  # fmt: skip
    assert abs(history[-1]["val_iwae"] - bounds.mean()) < 4 * bounds.std() * math.sqrt(1 + 1 / 20)
    # L_5 >= L_1 in expectation; measured 1.4 and 1.7 nats above it here (seeds 0 and 1)
    assert history[-1]["val_iwae"] > history[-1]["val_elbo"]


def test_negligible_shares_are_those_below_the_square_of_float32s_epsilon():
    assert negligible_share(torch.float32) == 2.0**-46 and negligible_share(torch.float64) == 2.0**-104
    log_weights = torch.tensor([[0.0, 0.0], [-45.0, -47.0], [-80.0, 0.0]]) * math.log(2)
    shares = (log_weights - log_weights.logsumexp(0)).exp()
    assert negligible_shares(log_weights).tolist() == (shares < 2.0**-46).tolist()
    assert negligible_shares(log_weights).tolist() == [[False, False], [False, True], [True, False]]


def decoder_output_gradient(vae, loss_fn, x, seed):
    """The loss and the gradient that reaches the decoder's output logits in the backward pass."""
    seen = []

    def on_output(module, args, out):
        out.register_hook(seen.append)

    hook = vae.decoder.register_forward_hook(on_output)
    try:
        torch.manual_seed(seed)
        loss = loss_fn(vae.model, vae.guide, x)
        loss.backward()
    finally:
        hook.remove()
    return loss.detach(), seen[0]


@pytest.mark.parametrize("gradient", ["standard", "dreg"])
def test_particles_of_negligible_weight_leave_no_subnormals_in_the_backward_pass_and_change_nothing(
    small_mnist, gradient
):
    """With the decoder's weights tripled, K = 50 log weights spread over about 200 nats, as a VAE's do early
    in training: the particles below 2^-46 of the normalised weight are left out of the gradient, so the
    gradient at the decoder's output holds no float32 subnormal (which CPUs multiply several times more
    slowly). Against the logsumexp of the same draws without the cut-off, the loss agrees to float32 rounding
    (1e-6 relative) and the decoder's gradient to 1e-5 of its largest entry (float32 sums of 3,200 terms)."""
    tiny = torch.finfo(torch.float32).tiny
    vae, x = small_vae(z_dim=20, hidden=(400,)), small_mnist.val.x[:64]
    with torch.no_grad():
        for parameter in vae.decoder.parameters():
            parameter.mul_(3)
    objective = pv.IWAEBound(50, gradient=gradient)
    loss, at_output = decoder_output_gradient(vae, lambda m, g, x: objective.loss(vae, x, kl_weight=1.0), x, seed=3)
    # (the gradient at a logit is its particle's share times x - sigmoid(logit): with no logit below about
    # -87 at this seed, a share of at least 2^-46 keeps it normal)
    assert not ((at_output != 0) & (at_output.abs() < tiny)).any()
    decoder_gradients = [parameter.grad.clone() for parameter in vae.decoder.parameters()]
    # Without the cut-off the same draws give subnormals there: the test can fail.
    uncut = lambda m, g, x: -site_log_densities(m, g, x, num_particles=50).log_weights.logsumexp(0).sum()  # noqa: E731
    vae.zero_grad()
    exact, exact_output = decoder_output_gradient(vae, uncut, x, seed=3)
    assert ((exact_output != 0) & (exact_output.abs() < tiny)).any()
    assert float(loss) == pytest.approx(float(exact) + 64 * math.log(50), rel=1e-6)
    for cut, parameter in zip(decoder_gradients, vae.decoder.parameters(), strict=True):
        torch.testing.assert_close(cut, parameter.grad, rtol=1e-5, atol=1e-5 * float(parameter.grad.abs().max()))
