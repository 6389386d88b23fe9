"""M1+M2: the stacked model's log p(x) against quadrature, the feature split, a frozen M1, a run, the command."""

import math

import pyro
import pytest
import torch

import pyro_vae as pv
from pyro_vae import cli
from pyro_vae.components.nets import inverse_softplus
from pyro_vae.models.base import ACTIVE_UNIT_THRESHOLD
from pyro_vae.models.stacked import LatentFeatures, StackedSSVAE


def _set_scale(encoder: torch.nn.Module, z_dim: int, scale: float) -> None:
    """Make an MLP encoder's scale head output ``scale`` whatever the input."""
    last = encoder.net[-1]
    with torch.no_grad():
        last.weight[z_dim:] = 0.0
        last.bias[z_dim:] = inverse_softplus(torch.tensor(scale))


@pytest.fixture(params=["standard-normal", "learned-gaussian"])
def tiny(request):
    """x in R^2, M1's z1 in R^2 with unit 0 active (standardised by m = 0.3, s = 2) and unit 1 inactive,
    M2 with z in R^1 and two classes: three continuous latents and y, small enough for quadrature. M1's prior
    is N(0, I), or a learned Gaussian N(3, 0.5^2) on the inactive unit, where its posterior collapses."""
    torch.manual_seed(1)
    m1 = pv.VAE(
        (2,), z_dim=2, hidden=(8,), likelihood=pv.likelihoods.Gaussian("fixed", init_sigma=2.0), prior=request.param
    )
    if request.param == "learned-gaussian":
        with torch.no_grad():
            m1.prior.loc[1] = 3.0
            m1.prior.raw_scale[1] = inverse_softplus(torch.tensor(0.5))
    features = LatentFeatures(2, [0])
    features.mean.fill_(0.3)
    features.std.fill_(2.0)
    stacked = StackedSSVAE(m1, features, z_dim=1, num_classes=2, hidden=(8,))
    # Proposals wider than the posteriors, so that the importance weights have a finite variance.
    _set_scale(m1.encoder, 2, 2.4)
    _set_scale(stacked.m2.encoder, 1, 1.5)
    if request.param == "learned-gaussian":  # q(u | x) collapsed near the prior, a little wider
        with torch.no_grad():
            m1.encoder.net[-1].weight[[1, 3]] = 0.0
            m1.encoder.net[-1].bias[1] = 3.0
            m1.encoder.net[-1].bias[3] = inverse_softplus(torch.tensor(0.6))
    return stacked


def stacked_log_px_by_quadrature(stacked: StackedSSVAE, x: torch.Tensor, n: int = 481) -> torch.Tensor:
    """log p(x) = log sum_y p(y) int p(z) p(f | y, z) p(u) p(x | m + s f, u) dz df du on a grid, with p(u) M1's
    prior on its inactive unit.

    Computed from the networks' forward passes alone, none of the Pyro model code.
    """
    z = torch.linspace(-8, 8, n, dtype=torch.float64)
    f = torch.linspace(-12, 12, n, dtype=torch.float64)
    u = torch.linspace(-8, 8, n, dtype=torch.float64)
    log_cell = math.log(z[1] - z[0]) + math.log(f[1] - f[0]) + math.log(u[1] - u[0])
    normal = torch.distributions.Normal(0.0, 1.0)
    m2 = stacked.m2.double()
    m1 = stacked.m1.double()
    features = stacked.features.double()
    # a[f, u] for each point: log p(u) + log p(x | z1(f, u)).
    grid = torch.stack(torch.meshgrid(f, u, indexing="ij"), -1)  # (n, n, 2) with z1 = (m + s f, u)
    z1 = torch.stack([features.mean + features.std * grid[..., 0], grid[..., 1]], -1)
    log_lik = m1.decode(z1.reshape(-1, 2)).log_prob(x[:, None, :]).reshape(len(x), n, n)
    m1_prior = m1.prior().base_dist
    p_u = torch.distributions.Normal(m1_prior.loc[1], m1_prior.scale[1])
    a = torch.logsumexp(log_lik + p_u.log_prob(u), -1)  # (N, f)
    # b[y, z, f]: log p(y) + log p(z) + log p(f | y, z).
    b = []
    for label in range(stacked.num_classes):
        onehot = torch.nn.functional.one_hot(torch.full((n,), label), stacked.num_classes).double()
        p_f = m2.decode(z[:, None], onehot)  # batch (z,), event (1,)
        b.append(
            math.log(1 / stacked.num_classes) + normal.log_prob(z)[:, None] + p_f.log_prob(f[:, None, None]).T
        )  # (z, f)
    b = torch.stack(b)  # (y, z, f)
    stacked.float()
    return torch.logsumexp((b[None] + a[:, None, None, :]).flatten(1), -1) + log_cell


def test_the_stacked_log_px_matches_quadrature(tiny):
    x = tiny.model(batch_size=3).detach()
    truth = stacked_log_px_by_quadrature(tiny, x.double())
    estimate = pv.log_marginal_likelihood(tiny.model, tiny.guide, x, num_samples=20000, seed=0)
    # Seeded, the effective sample sizes are 6,000-7,000 of 20,000, so the estimate's sd is about
    # sqrt((K / ESS - 1) / K) = 0.01 nats (measured errors: -0.012, -0.015, +0.004; the ELBO is 2 nats lower).
    # 0.03 allows 3 sd; a wrong Jacobian of z1 = m + s f would be off by log s = 0.69.
    assert estimate.ess.min() > 1000
    torch.testing.assert_close(estimate.log_px.double(), truth, atol=0.03, rtol=0)


def test_an_m1_whose_prior_does_not_factorise_is_refused():
    """The inactive units' p(u) is M1's prior on them: a mixture's or a flow's has no such marginal here."""
    for prior in ("mixture", "vamp", "flow"):
        m1 = pv.VAE((1, 4, 4), z_dim=2, hidden=(8,), prior=prior)
        with pytest.raises(ValueError, match=f"this M1 has the '{prior}' prior. Train M1 with the standard-normal"):
            StackedSSVAE(m1, LatentFeatures(2, [0]), z_dim=1, num_classes=2, hidden=(8,))
        StackedSSVAE(m1, LatentFeatures(2, [0, 1]), z_dim=1, num_classes=2, hidden=(8,))  # no inactive unit: no p(u)


def test_features_split_and_reassemble_the_code():
    features = LatentFeatures(5, [1, 3])
    features.mean.copy_(torch.tensor([0.5, -1.0]))
    features.std.copy_(torch.tensor([2.0, 0.25]))
    z1 = torch.randn(7, 5)
    torch.testing.assert_close(features.assemble(features.standardise(z1), z1[:, features.inactive]), z1)


def test_features_keep_the_active_units_and_standardise_them(small_mnist):
    m1 = pv.VAE((1, 28, 28), z_dim=6, hidden=(64,))
    with torch.no_grad():  # units 0, 2 and 4 follow x strongly; 1, 3 and 5 ignore it (constant posterior means)
        m1.encoder.net[-1].weight[[0, 2, 4]] *= 20.0
        m1.encoder.net[-1].weight[[1, 3, 5]] = 0.0
    features = LatentFeatures.fit(m1, small_mnist.train.x)
    assert features.active.tolist() == [0, 2, 4] and features.inactive.tolist() == [1, 3, 5]
    means = m1.encode(small_mnist.train.x)[0].detach()
    assert (means.var(0)[[0, 2, 4]] > 10 * ACTIVE_UNIT_THRESHOLD).all()  # far from the threshold
    f = features.standardise(means)
    torch.testing.assert_close(f.mean(0), torch.zeros(features.num_active), atol=1e-4, rtol=0)
    torch.testing.assert_close(f.std(0), torch.ones(features.num_active), atol=1e-4, rtol=0)


def test_no_active_unit_is_refused():
    with pytest.raises(ValueError, match="no active latent units; train it longer"):
        LatentFeatures(4, [])


@pytest.fixture(scope="module")
def m1_run(tmp_path_factory, mnist):
    """A trained M1 (10 epochs on small_mnist's points), shared by this module's tests, which only read it."""
    run_dir = tmp_path_factory.mktemp("m1") / "m1"
    pyro.set_rng_seed(0)
    m1 = pv.VAE((1, 28, 28), z_dim=8, hidden=(128,))
    pv.fit(m1, mnist.subset(train=2000, val=500, test=500), epochs=10, batch_size=100, run_dir=run_dir, progress=False)
    return run_dir


def test_training_leaves_m1_frozen_and_learns_to_classify(m1_run, small_mnist, tmp_path):
    m1 = pv.load_run(m1_run)
    before = {name: value.clone() for name, value in m1.model.state_dict().items()}
    stacked = StackedSSVAE(m1.model, LatentFeatures.fit(m1.model, small_mnist.train.x), z_dim=4, hidden=(64,))
    objective = pv.SemiSupervisedELBO(num_labels=100, aux_weight=50.0, classifier_steps=0)  # the objective alone
    history = pv.fit(
        stacked, small_mnist, objective=objective, epochs=8, batch_size=50, lr=1e-3, run_dir=tmp_path / "m1m2",
        eval_samples=5, progress=False,
    )  # fmt: skip
    for name, value in stacked.m1.state_dict().items():
        assert torch.equal(value, before[name]), name
    metrics = pv.RunDirectory(tmp_path / "m1m2").read_metrics()
    # Chance is 10%; seeded, 8 epochs on 2,000 points reach about 60%.
    assert metrics["test_accuracy"] > 0.4, history
    assert math.isfinite(metrics["test_log_px"])
    run = pv.load_run(tmp_path / "m1m2", checkpoint="last")  # rebuilt from config.json, last epoch's weights
    assert isinstance(run.model, StackedSSVAE) and run.epoch == 8
    run.model.load_state_dict(pv.RunDirectory(tmp_path / "m1m2").load_checkpoint("best")["model"])
    x = small_mnist.test.x[:50]
    assert torch.equal(run.model.classify(x), stacked.classify(x))  # stacked holds the best epoch's weights


def test_the_command_stacks_on_a_vae_run(m1_run, tmp_path, capsys):
    args = ["train", "--m1", str(m1_run), "--labels", "20", "--epochs", "1", "--z-dim", "3", "--hidden", "32"]
    assert cli.main([*args, "--eval-samples", "2", "--no-progress", "--out", str(tmp_path), "--name", "s"]) == 0
    out = capsys.readouterr().out
    assert "of its 8 latent units active" in out and "test accuracy" in out
    assert {p.name for p in (tmp_path / "s" / "figures").iterdir()} >= {"style_transfer.png", "latent_space.png"}
    assert cli.main(["train", "--resume", str(tmp_path / "s"), "--epochs", "2", "--no-progress"]) == 0

    code = cli.main(["train", "--m1", str(tmp_path / "s"), "--out", str(tmp_path), "--no-progress"])
    assert code == 2
    assert "--m1 needs the run of a plain VAE" in capsys.readouterr().err


def test_the_command_refuses_a_label_count_before_fitting_m1s_features(m1_run, tmp_path, capsys, monkeypatch):
    def fit_refused(*args, **kwargs):
        raise AssertionError("M1's features were fitted before the label count was checked")

    monkeypatch.setattr(LatentFeatures, "fit", fit_refused)
    for labels, message in (("5", "5 labels cannot cover 10 classes"), ("2000", "--labels 2000 is not below the")):
        assert cli.main(["train", "--m1", str(m1_run), "--labels", labels, "--out", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_an_older_config_without_activations_rebuilds_relu_layers_and_still_matches(tiny):
    from pyro_vae.runs.directory import model_config_matches

    old = tiny.config()
    for part in ("m1", "m2"):  # runs written before 2026-12-02 recorded no activation, and used ReLU
        del old[part]["activation"]
    rebuilt = StackedSSVAE.from_config(old)
    assert rebuilt.m2.activation == "relu" and isinstance(rebuilt.m2.classifier.net[1], torch.nn.ReLU)
    assert rebuilt.m1.config()["activation"] == "relu"
    assert model_config_matches(old, rebuilt.config())  # so --resume takes such a run
    assert not model_config_matches(old, tiny.config())  # softplus layers are another model
    assert StackedSSVAE.from_config(tiny.config()).m2.activation == "softplus"


def test_ais_of_the_stacked_model_sums_y_out_and_matches_quadrature(tiny):
    """AIS with the labels summed out (``pyro-vae evaluate --method ais`` on an M1+M2 run), on z1 and z.

    At 1,000 steps x 32 chains the measured errors are -0.002 to +0.009 nats (-0.022 to +0.006 when the
    labels were annealed one after another on shared random streams; at the defaults, 400 x 16,
    up to 0.04 on these deliberately wide proposals; at 3,000 x 64 at most 0.004, where importance
    sampling with K = 200,000 is within 0.01). 0.05 is over twice the worst measured error, so that
    another BLAS's rounding of the seeded chains does not decide the test; a missing log-Jacobian of
    z1 = m + s f (log s = 0.69) would be far outside it.
    """
    x = tiny.model(batch_size=5).detach()
    truth = stacked_log_px_by_quadrature(tiny, x.double())
    estimate = pv.evaluate.annealed_log_px(tiny, x, num_steps=1000, num_chains=32)
    torch.testing.assert_close(estimate.log_px.double(), truth, atol=0.05, rtol=0)


def test_m1_must_be_a_vae_and_one_of_custom_networks_trains_without_a_config(small_mnist, tmp_path):
    """M1 of networks of one's own: the stacked model is as undescribable as its M1, and trains (it failed at its
    config before); a two-layer M1 is refused up front (it failed in M1's decoder)."""
    with pytest.raises(TypeError, match="M1 must be a pv.VAE .*; got a HierarchicalVAE"):
        StackedSSVAE(pv.HierarchicalVAE((2,), (2, 2), ((8,), (4,))), LatentFeatures(4, [0]))
    m1 = pv.VAE(
        (1, 28, 28),
        4,
        encoder=pv.nets.MLPEncoder((1, 28, 28), 4, (32,)),
        decoder=pv.nets.MLPDecoder(4, (1, 28, 28), (32,)),
    )
    stacked = StackedSSVAE(m1, LatentFeatures(4, [0, 1]), z_dim=2, hidden=(16,))
    assert not stacked.describable
    objective = pv.SemiSupervisedELBO(num_labels=20, classifier_steps=0)
    pv.fit(stacked, small_mnist.subset(train=200), objective=objective, epochs=1, batch_size=50, run_dir=tmp_path / "r",
           progress=False)  # fmt: skip
    assert pv.RunDirectory(tmp_path / "r").read_config()["model"] is None


def test_m2_s_vamp_prior_on_m1_s_features_leaves_its_pseudo_inputs_free(tiny):
    """M2's data are M1's standardised features, not images in [0, 1]; a VampPrior given as an instance keeps its
    own bounds (runs before the choice rebuild so, with [0, 1])."""
    for prior in ("vamp", {"name": "vamp", "num_components": 3}):
        assert StackedSSVAE(tiny.m1, tiny.features, z_dim=1, num_classes=2, prior=prior).prior.bounds is None
    given = pv.priors.VampPrior(num_components=3)
    assert StackedSSVAE(tiny.m1, tiny.features, z_dim=1, num_classes=2, prior=given).prior.bounds == (0.0, 1.0)
