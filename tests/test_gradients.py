"""The gradient estimators STL and DReG (pyro_vae.infer.path_derivatives) against the standard ones.

The statistical tests draw R independent gradients in one pass: a small
linear-Gaussian model written here from scratch gives every data point its
own offset delta_n of the guide's mean, and the R points are copies of one
x, so the gradients with respect to delta_1, ..., delta_R are R independent
draws of the estimator for that x. Everything runs in float64 with a fixed
seed, so each test is deterministic; the tolerances are stated in units of
the Monte Carlo standard error of the quantity compared.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import small_vae
from torch import nn

import pyro_vae as pv
from pyro_vae.infer import build_objective
from pyro_vae.infer.elbo import ELBO
from pyro_vae.infer.iwae import IWAEBound
from pyro_vae.infer.path_derivatives import STL_ELBO, DReG_IWAE_ELBO

REPLICATES = 20_000


class LinearGaussian(nn.Module):
    """p(z) = N(0, I_2), p(x | z) = N(W z + b, 0.6^2 I_3); q(z | x_n) = N(A x_n + a + delta_n, diag exp(s)^2).

    By default the guide is far off the exact posterior (random A, a, s), as early in training. With
    ``near_posterior`` it is the exact posterior's mean map shifted by 0.3 sd-sized offsets, with its
    standard deviations 1.3 times too wide, as after training.
    """

    def __init__(self, num_points: int, near_posterior: bool = False):
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
        self.W, self.b = nn.Parameter(draw(3, 2)), nn.Parameter(0.5 * draw(3))
        self.A, self.a = nn.Parameter(0.5 * draw(2, 3)), nn.Parameter(0.5 * draw(2))
        self.log_s = nn.Parameter(torch.full((2,), -0.7, dtype=torch.float64))
        self.delta = nn.Parameter(torch.zeros(num_points, 2, dtype=torch.float64))
        if near_posterior:
            with torch.no_grad():  # the posterior is N(S W^T (x - b) / 0.36, S), S = (I + W^T W / 0.36)^-1
                covariance = torch.linalg.inv(torch.eye(2, dtype=torch.float64) + self.W.T @ self.W / 0.36)
                self.A.copy_(covariance @ self.W.T / 0.36)
                self.a.copy_(-self.A @ self.b + 0.3 * draw(2))
                self.log_s.copy_((1.3 * covariance.diagonal().sqrt()).log())

    def model(self, x, kl_weight=1.0):
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, 0.6).to_event(1), obs=x)

    def guide(self, x, kl_weight=1.0):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(x @ self.A.T + self.a + self.delta, self.log_s.exp()).to_event(1))


def per_point_gradients(objective, seed: int = 0, near_posterior: bool = False) -> torch.Tensor:
    """R independent draws of the estimator's gradient in the guide's mean at one x, shape (R, 2)."""
    pyro.set_rng_seed(seed)
    num_points = REPLICATES
    module = LinearGaussian(num_points, near_posterior)
    x = torch.tensor([[0.8, -1.2, 2.0]], dtype=torch.float64).expand(num_points, 3)
    objective.loss(module, x, kl_weight=1.0).backward()
    return -module.delta.grad  # the gradient of the objective (the loss is its negative)


def snr(gradients: torch.Tensor) -> torch.Tensor:
    """Rainforth et al.'s signal-to-noise ratio |E g| / sd(g) per component."""
    return gradients.mean(0).abs() / gradients.std(0)


def mean_difference_in_standard_errors(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|mean(a) - mean(b)| over the standard error of that difference, per component (a, b independent)."""
    se = (a.var(0) / len(a) + b.var(0) / len(b)).sqrt()
    return (a.mean(0) - b.mean(0)).abs() / se


def test_dreg_gives_the_model_exactly_the_iwae_gradient_and_the_same_value():
    """Same seed, same draws: the decoder's, the prior's and the top conditional's gradients agree to rounding."""
    torch.set_default_dtype(torch.float64)
    try:
        model = pv.HierarchicalVAE((12,), z_dims=(4, 3), hidden=((8,), (6,)))
        x = torch.rand(16, 12).round()
        values, gradients = [], []
        for gradient in ("standard", "dreg"):
            model.zero_grad()
            pyro.set_rng_seed(3)
            loss = IWAEBound(10, gradient=gradient).loss(model, x, kl_weight=1.0)
            loss.backward()
            values.append(loss.detach())
            gradients.append({name: p.grad.clone() for name, p in model.named_parameters()})
    finally:
        torch.set_default_dtype(torch.float32)
    torch.testing.assert_close(values[0], values[1], rtol=1e-12, atol=0)
    generative = [name for name in gradients[0] if not name.startswith("encoders.")]
    assert {name.split(".")[0] for name in generative} == {"conditionals", "decoder"}
    for name in generative:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], rtol=1e-10, atol=1e-12)
    # and the guide's gradient is a different estimator, not the same one by accident
    assert not torch.allclose(gradients[1]["encoders.0.net.0.weight"], gradients[0]["encoders.0.net.0.weight"])


def test_dreg_is_unbiased_for_the_iwae_gradient():
    """E[DReG] = E[IWAE's gradient] at K = 10: the means of 20,000 draws agree within 4 standard errors.

    4 standard errors: a false alarm has probability 6e-5 per component under a normal approximation.
    The test has power: DReG without its second weight (sum_k wt_k d log w_k / dz dz/dphi, which is
    biased) is caught by the same comparison.
    """
    standard = per_point_gradients(IWAEBound(10), seed=0)
    dreg = per_point_gradients(IWAEBound(10, gradient="dreg"), seed=1)
    assert (mean_difference_in_standard_errors(dreg, standard) < 4).all()

    once_weighted = IWAEBound(10, gradient="dreg")
    with pytest.MonkeyPatch.context() as patch:  # the hooks multiply by 1: the weights enter once, not squared
        patch.setattr("pyro_vae.infer.path_derivatives._scale_by", lambda weights, site, dim: lambda g: g)
        biased = per_point_gradients(once_weighted, seed=1)
    assert (mean_difference_in_standard_errors(biased, standard) > 10).any()


def test_stl_is_unbiased_for_the_elbo_gradient():
    """E[STL] = E[the reparameterised ELBO gradient]: within 4 standard errors (as above); here with lower variance."""
    standard = per_point_gradients(ELBO(1), seed=0)
    stl = per_point_gradients(ELBO(1, gradient="stl"), seed=1)
    assert (mean_difference_in_standard_errors(stl, standard) < 4).all()
    # measured, STL's variance is 0.26 and 0.57 of the standard estimator's in the two components; from 20,000
    # draws each variance is known to within about 2%, so only an STL no better than the standard one fails
    assert (stl.var(0) < standard.var(0)).all()


def test_signal_to_noise_falls_with_k_for_iwae_and_not_for_dreg():
    """Rainforth et al. (2018): the SNR of IWAE's guide gradient falls like 1/sqrt(K); Tucker et al.'s DReG rises.

    With a guide near the posterior, as after training, at K = 1, 10 and 100 (``python -m pytest -s -n0
    tests/test_gradients.py -k signal`` prints the SNRs: 0.34, 0.029, 0.006 and 0.57, 0.13, 0.036 for
    IWAE's two components, 0.63, 0.42, 1.31 and 1.04, 1.56, 5.2 for DReG's). An SNR estimated from
    20,000 draws has a standard error of sqrt((1 + SNR^2 / 2) / R), 0.0071 to 0.027 at these values, so
    each comparison below holds by more than 4 standard errors of the difference, but one: DReG's SNR at
    K = 100 in the first component, 1.31 against twice its 0.63 at K = 1, holds by about 2.7 of them.
    DReG's SNR need not rise at every K: the first component dips at K = 10. Far from the posterior
    (the random initial guide) heavy-tailed weights make every SNR fall from K = 1 to 100 (1.49 to
    0.52 and 3.52 to 2.75 for IWAE, 2.92 to 1.11 and 4.69 to 1.19 for DReG; the SNRs' standard errors
    are 0.008 to 0.025, and the asserted 10% fall holds by more than 17 standard errors of the
    difference).
    """
    ratios = {}
    for near_posterior in (True, False):
        for gradient in ("standard", "dreg"):
            estimators = [IWAEBound(k, gradient=gradient) for k in (1, 10, 100)]
            ratios[near_posterior, gradient] = [
                snr(per_point_gradients(estimator, near_posterior=near_posterior)) for estimator in estimators
            ]
            where = "near the posterior" if near_posterior else "the initial guide"
            values = [[round(v, 3) for v in s.tolist()] for s in ratios[near_posterior, gradient]]
            print(f"SNR, {gradient}, {where}, K = 1, 10, 100:", values)
    standard, dreg = ratios[True, "standard"], ratios[True, "dreg"]
    assert (standard[1] < 0.5 * standard[0]).all() and (standard[2] < 0.5 * standard[0]).all()
    assert (dreg[2] > 2 * dreg[0]).all() and (dreg[2] > 2 * dreg[1]).all()
    assert (dreg[1] > 3 * standard[1]).all() and (dreg[2] > 30 * standard[2]).all()
    for gradient in ("standard", "dreg"):
        far = ratios[False, gradient]
        assert (far[2] < 0.9 * far[0]).all()


def test_objectives_refuse_an_estimator_that_does_not_fit():
    with pytest.raises(ValueError, match="STL is biased for K > 1"):
        IWAEBound(10, gradient="stl")
    with pytest.raises(ValueError, match="STL needs the Monte Carlo KL"):
        pv.MeanFieldELBO(gradient="stl")
    with pytest.raises(ValueError, match="gradient estimators"):
        ELBO(gradient="dreg")
    # used directly, as Pyro's ELBOs are, the estimators check their particle count when built
    with pytest.raises(ValueError, match="DReG's num_particles must be a whole number >= 1; got 0"):
        DReG_IWAE_ELBO(small_vae(), 0)
    with pytest.raises(ValueError, match="STL's num_particles must be a whole number >= 1; got 2.5"):
        STL_ELBO(small_vae(), 2.5)
    # the configs record the estimator only where it is not the standard one (older runs have no key)
    assert IWAEBound(5).config() == {"name": "iwae", "num_particles": 5}
    assert build_objective(IWAEBound(5, gradient="dreg").config()).gradient == "dreg"


@pytest.mark.parametrize("num_particles", [1, 3])
def test_stl_changes_the_gradient_not_the_value_and_takes_the_kl_weight(num_particles):
    """For the same draws, STL's loss is Pyro's, whose KL weight reaches the latent sites by poutine.scale.

    Its gradient is the decoder's as before (rounding apart) and another one for the encoder: STL drops
    only the score term of q's parameters.
    """
    vae, x = small_vae(z_dim=4, hidden=(16,)), torch.rand(8, 1, 28, 28).round()
    losses, gradients = {}, {}
    for gradient in ("standard", "stl"):
        for kl_weight in (0.5, 1.0):
            vae.zero_grad()
            pyro.set_rng_seed(3)
            loss = ELBO(num_particles, gradient=gradient).loss(vae, x, kl_weight=kl_weight)
            loss.backward()
            losses[gradient, kl_weight] = loss.detach()
        gradients[gradient] = {name: p.grad.clone() for name, p in vae.named_parameters()}
    for kl_weight in (0.5, 1.0):
        assert losses["stl", kl_weight].item() == pytest.approx(losses["standard", kl_weight].item(), rel=1e-6)
    assert losses["stl", 0.5] < losses["stl", 1.0]  # half the KL: a smaller loss
    assert {name.split(".")[0] for name in gradients["stl"]} == {"encoder", "decoder"}
    for name, grad in gradients["stl"].items():
        if name.startswith("decoder."):
            torch.testing.assert_close(grad, gradients["standard"][name], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(gradients["stl"]["encoder.net.0.weight"], gradients["standard"]["encoder.net.0.weight"])
