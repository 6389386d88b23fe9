"""The semi-supervised M2: exact enumeration, the labelled loss term by term, learning, and bad labels."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, config_enumerate

import pyro_vae as pv
from pyro_vae import cli
from pyro_vae.data import DataError
from pyro_vae.infer.semisupervised import (
    NegligibleValuesDropped,
    SemiSupervisedELBO,
    default_aux_weight,
    draw_labelled,
    paper_aux_weight,
)
from pyro_vae.models.ssvae import SSVAE, concat_broadcast
from pyro_vae.runs.directory import model_config_matches
from pyro_vae.training.engine import check_same_training
from pyro_vae.workflow import training_settings

X_SHAPE = (1, 6, 6)


@pytest.fixture
def small():
    torch.manual_seed(0)
    ssvae = SSVAE(X_SHAPE, z_dim=3, num_classes=4, hidden=(16,), class_prior="learned")
    with torch.no_grad():
        ssvae.class_prior_net.logits.copy_(torch.tensor([0.3, -0.2, 0.5, 0.0]))
    x = torch.bernoulli(torch.full((5, *X_SHAPE), 0.3))
    return ssvae, x


def log_joint_minus_guide(ssvae, x, y_onehot, z):
    """log p(x | y, z) + log p(z) + log p(y) - log q(z | x, y), for each point."""
    loc, scale = ssvae.encode(x, y_onehot)
    return (
        ssvae.decode(z, y_onehot).log_prob(x)
        + ssvae.prior.log_prob(z)
        + ssvae.class_prior_net().log_prob(y_onehot)
        - torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
    )


def test_enumeration_equals_the_explicit_sum_over_y(small):
    ssvae, x = small
    guide = config_enumerate(ssvae.guide, "parallel")
    pyro.set_rng_seed(1)
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(ssvae.model, guide, x)
    # The same draws of z, one per class and point, as TraceEnum_ELBO made them.
    pyro.set_rng_seed(1)
    z = poutine.trace(poutine.enum(guide, first_available_dim=-2)).get_trace(x).nodes["z"]["value"]
    assert z.shape == (4, 5, 3)
    q_y = ssvae.classifier(x).softmax(-1)  # (5, 4)
    by_class = torch.stack([log_joint_minus_guide(ssvae, x, torch.eye(4)[c], z[c]) for c in range(4)], -1)
    explicit = (q_y * by_class).sum(-1) - (q_y * q_y.log()).sum(-1)  # sum_y q(y|x) L(x, y) + H(q(y|x))
    # float32 sums of a few hundred nats in another order: rounding of about 1e-5 relative, nothing more
    torch.testing.assert_close(-loss, explicit.sum(), rtol=1e-5, atol=1e-4)


def test_the_labelled_loss_is_the_elbo_given_y_plus_log_p_y_plus_the_auxiliary_term(small):
    ssvae, x = small
    y = torch.tensor([0, 1, 2, 3, 1])
    alpha = 7.5
    pyro.set_rng_seed(2)
    loss = Trace_ELBO(max_plate_nesting=1).differentiable_loss(ssvae.model, ssvae.guide, x, y, aux_weight=alpha)
    pyro.set_rng_seed(2)
    z = poutine.trace(ssvae.guide).get_trace(x, y).nodes["z"]["value"]
    y_onehot = torch.eye(4)[y]
    elbo_given_y = (
        ssvae.decode(z, y_onehot).log_prob(x)
        + ssvae.prior.log_prob(z)
        - torch.distributions.Normal(*ssvae.encode(x, y_onehot)).log_prob(z).sum(-1)
    )
    log_p_y = ssvae.class_prior_net.logits.log_softmax(-1)[y]
    log_q_y = ssvae.classifier(x).log_softmax(-1)[torch.arange(5), y]
    # float32 sums of a few hundred nats in another order: rounding of about 1e-5 relative, nothing more
    torch.testing.assert_close(-loss, (elbo_given_y + log_p_y + alpha * log_q_y).sum(), rtol=1e-5, atol=1e-4)
    # Without the auxiliary weight the model is the plain generative model.
    pyro.set_rng_seed(2)
    plain = Trace_ELBO(max_plate_nesting=1).differentiable_loss(ssvae.model, ssvae.guide, x, y)
    torch.testing.assert_close(-plain, (elbo_given_y + log_p_y).sum(), rtol=1e-5, atol=1e-4)


def test_a_step_scales_each_term_to_its_whole_set(small):
    """One step's loss estimates -J: the unlabelled batch's term times N_unlabelled / B and the labelled
    batch's (alpha included) times N_labelled / B_labelled, against Pyro's unscaled losses of the same draws
    (the two tests above check those term by term). The sets' sizes swapped, or N for both, would scale a
    term by 3, 1/3 or 4, far beyond float32 rounding."""
    ssvae, _ = small
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((40, *X_SHAPE), 0.3))
    y = torch.arange(40) % 4
    split = pv.data.Split
    data = pv.Dataset("toy", split(x[:32], y[:32]), split(x[32:36], y[32:36]), split(x[36:], y[36:]))
    objective = SemiSupervisedELBO(num_labels=8, aux_weight=7.5, classifier_steps=0)
    objective.setup(ssvae, data, batch_size=4)
    assert (len(objective.unlabelled), objective.num_labels, objective.labelled_batch) == (24, 8, 4)
    x_unlabelled, x_labelled, y_labelled = objective.batch(data, objective.unlabelled[:4])
    pyro.set_rng_seed(3)
    loss = objective.loss(ssvae, x_unlabelled, x_labelled, y_labelled, kl_weight=1.0)
    pyro.set_rng_seed(3)  # the same draws, in the same order: the unlabelled term first
    unlabelled = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(
        ssvae.model, objective.enumerated_guide(ssvae), x_unlabelled
    )
    labelled = Trace_ELBO(max_plate_nesting=1).differentiable_loss(
        ssvae.model, ssvae.guide, x_labelled, y_labelled, aux_weight=7.5
    )
    # float32 sums of a few hundred nats in another order: rounding of about 1e-5 relative, nothing more
    torch.testing.assert_close(loss, 24 / 4 * unlabelled + 8 / 4 * labelled, rtol=1e-5, atol=1e-4)


def test_the_encoder_splits_its_first_layer_over_x_and_y_with_the_same_result(small):
    ssvae, x = small
    y = torch.eye(4).unsqueeze(1)  # the shape of enumerated y: (4, 1, 4) against (5, 36)
    flat = x.flatten(1)
    loc, scale = ssvae.encoder.forward_concatenated(flat, y)
    expected_loc, expected_scale = ssvae.encoder(concat_broadcast(flat, y))
    assert loc.shape == (4, 5, 3)
    assert torch.allclose(loc, expected_loc, atol=1e-6) and torch.allclose(scale, expected_scale, atol=1e-6)
    with pytest.raises(ValueError, match="41 features in all; the encoder takes 40"):
        ssvae.encoder.forward_concatenated(flat, torch.eye(5))


def test_the_activation_is_recorded_and_older_configs_rebuild_with_relu(tmp_path):
    ssvae = SSVAE(X_SHAPE, z_dim=3, num_classes=4, hidden=(16,))
    assert ssvae.config()["activation"] == "softplus"
    assert isinstance(ssvae.encoder.net[1], torch.nn.Softplus)
    older = {key: value for key, value in ssvae.config().items() if key != "activation"}
    rebuilt = SSVAE.from_config(older)
    assert rebuilt.activation == "relu" and isinstance(rebuilt.classifier.net[1], torch.nn.ReLU)
    assert model_config_matches(older, rebuilt.config())  # an older run still resumes
    assert not model_config_matches(older, ssvae.config())
    with pytest.raises(ValueError, match="Unknown activation 'gelu'; choose one of"):
        SSVAE(X_SHAPE, activation="gelu")


def test_uniform_class_prior_is_log_one_over_k():
    ssvae = SSVAE(X_SHAPE, z_dim=2, num_classes=10, hidden=(8,))
    y = torch.eye(10)[[3]]
    assert ssvae.class_prior_net().log_prob(y).item() == pytest.approx(-math.log(10))
    assert list(ssvae.class_prior_net.parameters()) == []  # nothing to learn


def test_a_short_run_on_a_small_subset_beats_chance(tmp_path, mnist):
    torch.manual_seed(0)
    data = mnist.subset(train=2000, val=1000, test=1000)
    ssvae = SSVAE(data.x_shape, z_dim=16, hidden=(128,))
    # alpha = 50 per labelled point, Kingma et al.'s 0.1 N / labels on all of MNIST with 100 labels; no warm
    # start, so that the objective alone has to learn.
    objective = SemiSupervisedELBO(num_labels=100, aux_weight=50.0, classifier_steps=0)
    history = pv.fit(
        ssvae, data, objective=objective, epochs=2, batch_size=50, lr=1e-3, run_dir=tmp_path / "ssl", eval_samples=5,
        progress=False,
    )  # fmt: skip
    metrics = pv.RunDirectory(tmp_path / "ssl").read_metrics()
    # Chance is 10%; here (seeded) the first epochs reach 63% and 74%. 40% leaves room for other BLAS builds.
    assert metrics["test_accuracy"] > 0.4, history
    assert metrics["val_accuracy"] == max(row["val_accuracy"] for row in history)
    assert math.isfinite(metrics["test_log_px"])  # its estimator against quadrature: tests/test_ais.py (2-D M2)
    run = pv.load_run(tmp_path / "ssl", checkpoint="last")
    assert isinstance(run.model, SSVAE) and run.epoch == 2
    # AIS sums y out (its accuracy against quadrature: tests/test_ais.py); auto escalates points to it
    quick = {"num_steps": 5, "num_chains": 2, "test_points": 6, "progress": False}
    ais = pv.evaluate_run(tmp_path / "ssl", method="ais", **quick)
    auto = pv.evaluate_run(tmp_path / "ssl", method="auto", num_samples=20, **quick)
    assert ais["num_points"] == 6 and math.isfinite(ais["log_px"]) and auto["num_escalated"] > 0
    with pytest.raises(ValueError, match="BDMC simulates"):
        pv.evaluate_run(tmp_path / "ssl", method="bdmc", num_points=4, num_steps=5, num_chains=2, progress=False)


def test_labels_are_drawn_class_balanced_and_reproducibly():
    y = torch.arange(1000) % 10
    chosen = draw_labelled(y, 100, 10, seed=3)
    assert len(chosen) == 100 and torch.bincount(y[chosen]).tolist() == [10] * 10
    assert torch.equal(chosen, draw_labelled(y, 100, 10, seed=3))
    assert not torch.equal(chosen, draw_labelled(y, 100, 10, seed=4))
    assert torch.bincount(y[draw_labelled(y, 25, 10)]).tolist() == [3] * 5 + [2] * 5
    assert paper_aux_weight(50_000, 100) == pytest.approx(50.0)


def test_alpha_grows_with_the_label_count_unless_given_and_a_bad_one_is_refused():
    # 0.46 per label: Pyro's example's 46 at 100 labels, exactly, so that runs of either default agree there
    assert [SemiSupervisedELBO(num_labels=n).config()["aux_weight"] for n in (100, 600, 1000, 3000)] == [
        46.0, 276.0, 460.0, 1380.0
    ]  # fmt: skip
    assert default_aux_weight(250) == 115.0
    assert SemiSupervisedELBO(num_labels=np.int64(600)).config()["aux_weight"] == 276.0  # any integer type
    assert SemiSupervisedELBO(num_labels=600, aux_weight=paper_aux_weight(50_000, 600)).aux_weight == pytest.approx(
        50 / 6
    )
    for bad in (-1.0, math.inf, math.nan, "46", True):
        with pytest.raises(ValueError, match=r"aux_weight \(alpha per labelled point\) must be a number >= 0"):
            SemiSupervisedELBO(aux_weight=bad)
    for bad in (0, -5, 2.5, True):  # the default alpha needs a label count; draw_labelled checks it against the data
        with pytest.raises(ValueError, match=r"num_labels must be a whole number >= 1"):
            SemiSupervisedELBO(num_labels=bad)
    for bad in (-1, 2.7, True, "3"):
        with pytest.raises(ValueError, match=r"label_seed must be a whole number >= 0"):
            SemiSupervisedELBO(label_seed=bad)
    assert SemiSupervisedELBO(classifier_steps=np.int64(5)).classifier_steps == 5  # any integer type, as num_labels
    with pytest.raises(ValueError, match=r"num_labels must be > 0"):
        paper_aux_weight(50_000, 0)
    for bad in (1, 2.5, "10"):
        with pytest.raises(ValueError, match=r"num_classes must be a whole number >= 2; got "):
            SSVAE(X_SHAPE, z_dim=2, num_classes=bad, hidden=(8,))


@pytest.mark.parametrize(
    ("count", "message"),
    [
        (0, "cannot cover 10 classes"),
        (5, "cannot cover 10 classes"),
        (1000, "not below the 1000 training points"),
        (1001, "not below the 1000 training points"),
        (500, "Class 9 has 10"),
    ],
)
def test_impossible_label_counts_are_refused(count, message):
    y = torch.cat([torch.arange(990) % 9, torch.full((10,), 9)])
    with pytest.raises(DataError, match=message):
        draw_labelled(y, count, 10)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.tensor([0, 1, 10]), r"range over \[0, 10\].*num_classes=11"),
        (torch.tensor([0, -1, 2]), r"range over \[-1, 2\]"),
        (torch.tensor([0, 1]), "one integer label per point"),
        (torch.tensor([[0], [1], [2]]), "one integer label per point"),
        (torch.tensor([0.0, 1.5, 2.0]), "not whole numbers"),
    ],
)
def test_bad_labels_get_clear_errors(labels, message):
    ssvae = SSVAE(X_SHAPE, z_dim=2, num_classes=10, hidden=(8,))
    with pytest.raises(DataError, match=message):
        ssvae.check_labels(labels, torch.zeros(3, *X_SHAPE))


@pytest.mark.parametrize(
    "objective",
    ["trace", "meanfield", "iwae", {"name": "trace", "gradient": "stl"}],
    ids=["trace", "meanfield", "iwae", "stl"],
)
def test_an_objective_that_cannot_train_m2_is_refused_before_any_work(objective, tmp_path):
    """Under a plain ELBO M2's val_accuracy is never measured, so every epoch would count as the best one;
    the closed-form KL needs a mean-field guide; IWAE and STL differentiate through draws that y has not."""
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((40, *X_SHAPE), 0.3))
    data = pv.Dataset(
        "toy",
        pv.data.Split(x[:20], torch.arange(20) % 4),
        pv.data.Split(x[20:30], torch.arange(10) % 4),
        pv.data.Split(x[30:], torch.arange(10) % 4),
    )
    ssvae = SSVAE(X_SHAPE, z_dim=2, num_classes=4, hidden=(8,))
    why = {
        "trace": "picks its best epoch by val_accuracy.*'semi-supervised'",
        "meanfield": "guide whose latent sites are independent.*'semi-supervised'",
        "iwae": "IWAE training needs a guide whose every latent site is reparameterisable.*'y' is not",
        "stl": "The STL gradient needs a guide whose every latent site is reparameterisable.*'y' is not",
    }
    with pytest.raises(ValueError, match=why[objective if isinstance(objective, str) else "stl"]):
        pv.fit(ssvae, data, objective=objective, epochs=1, run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.fixture
def labelled_subset(mnist):
    return mnist.subset(train=1000, val=500, test=500)


def test_the_warm_start_trains_only_the_classifier_and_learns_the_labels(labelled_subset):
    torch.manual_seed(0)
    data = labelled_subset
    ssvae = SSVAE(data.x_shape, z_dim=4, hidden=(32,))
    objective = SemiSupervisedELBO(num_labels=50, classifier_steps=300)
    objective.setup(ssvae, data, batch_size=20)
    labelled = objective.labelled
    before = {name: p.detach().clone() for name, p in ssvae.named_parameters()}
    chance = ssvae.accuracy(data.train.x[labelled], data.train.y[labelled])
    objective.start(ssvae, data)
    changed = {name for name, p in ssvae.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {name for name in before if name.startswith("classifier.")}
    # 300 steps on 50 points, 20 at a time, fit the labelled points; a random classifier gets about 10% of them.
    assert ssvae.accuracy(data.train.x[labelled], data.train.y[labelled]) > max(0.9, chance + 0.5)
    assert objective.labelled_order is None and objective.cursor == 0  # training draws its own order


def test_a_fresh_run_warm_starts_once_and_a_resumed_run_never(tmp_path, monkeypatch, labelled_subset):
    data = labelled_subset
    calls = []
    original = SemiSupervisedELBO.start
    monkeypatch.setattr(SemiSupervisedELBO, "start", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))

    def train(epochs, resume=False):
        torch.manual_seed(0)
        model = SSVAE(data.x_shape, z_dim=4, hidden=(32,))
        objective = SemiSupervisedELBO(num_labels=50, classifier_steps=100)
        return pv.fit(
            model, data, objective=objective, epochs=epochs, batch_size=100, run_dir=tmp_path, resume=resume,
            eval_samples=0, progress=False, compile=False,
        )  # fmt: skip

    history = train(1)
    assert len(calls) == 1
    assert pv.RunDirectory(tmp_path).read_config()["train"]["objective"]["classifier_steps"] == 100
    assert history[0]["val_accuracy"] > 0.3  # epoch 0 is measured after the warm start (chance: 10%)
    train(2, resume=True)
    assert len(calls) == 1


def test_runs_written_before_the_warm_start_resume_without_one():
    old = {"train": {"objective": {"name": "semi-supervised", "num_labels": 100, "label_seed": 0, "aux_weight": 50.0}}}
    assert training_settings(old)["objective"]["classifier_steps"] == 0
    saved = old["train"]
    run = pv.RunDirectory("run")
    check_same_training(run, saved, {"objective": {**saved["objective"], "classifier_steps": 0}})
    for changed in ({"classifier_steps": 1000}, {"aux_weight": 5.0}):  # a warm start it never had is refused
        with pytest.raises(pv.CheckpointError, match="other settings"):
            check_same_training(run, saved, {"objective": {**saved["objective"], "classifier_steps": 0, **changed}})


def test_the_accuracy_classifies_the_images_intensities_unless_told_otherwise(small):
    """Validation and test splits binarised once keep their intensities: the accuracy reads those by default, the
    one binarisation with accuracy_on="binarised" (the measure of runs written before the option)."""
    ssvae, _ = small
    intensities = torch.rand(200, *X_SHAPE)
    split = pv.data.Split(torch.bernoulli(intensities), intensities=intensities)
    split.y = ssvae.classify(intensities)  # every point right from its intensities
    assert ssvae.accuracy(split.x, split.y) < 1  # and some wrong from the binarisation (else the test cannot fail)
    measured = {
        reads: SemiSupervisedELBO(num_labels=4, accuracy_on=reads).validate(ssvae, split, "val_")["val_accuracy"]
        for reads in ("intensities", "binarised")
    }
    assert measured == {"intensities": 1.0, "binarised": ssvae.accuracy(split.x, split.y)}
    assert SemiSupervisedELBO(num_labels=4).config()["accuracy_on"] == "intensities"
    as_given = pv.data.Split(split.x, split.y)  # binary as loaded: no intensities, the points themselves
    assert SemiSupervisedELBO(num_labels=4).validate(ssvae, as_given, "")["accuracy"] == measured["binarised"]
    old = {"train": {"objective": {"name": "semi-supervised", "num_labels": 100, "label_seed": 0, "aux_weight": 50.0}}}
    assert training_settings(old)["objective"]["accuracy_on"] == "binarised"  # resumed as it was measured
    with pytest.raises(ValueError, match=r"accuracy_on must be one of \('intensities', 'binarised'\); got 'grey'"):
        SemiSupervisedELBO(accuracy_on="grey")


def test_m2_s_vamp_prior_mixes_its_pseudo_inputs_posteriors_over_the_labels():
    """p(z) = (1/K) sum_k sum_y q(y | u_k) q(z | u_k, y), Tomczak & Welling's prior for M2's guide, against the
    sum written out; runs written before the choice rebuild with one Gaussian at the soft prediction."""
    torch.manual_seed(0)
    ssvae = SSVAE(X_SHAPE, z_dim=3, num_classes=4, hidden=(16,), prior={"name": "vamp", "num_components": 5})
    with torch.no_grad():
        ssvae.encoder.net[0].weight[:, -4:].mul_(10.0)  # the label moves q(z | u, y) a long way
    z = torch.randn(7, 3)
    u = F.hardtanh(ssvae.prior.pseudo_inputs, 0.0, 1.0)
    q_y = ssvae.classifier(u).softmax(-1)
    by_hand = torch.zeros(7, dtype=torch.float64)
    for k in range(5):
        for y in range(4):
            loc, scale = ssvae.encode(u[k : k + 1], torch.eye(4)[y : y + 1])
            density = torch.distributions.Normal(loc.double(), scale.double()).log_prob(z.double()).sum(-1).exp()
            by_hand += q_y[k, y].double() / 5 * density
    assert torch.allclose(ssvae.prior.log_prob(z).double(), by_hand.log(), atol=1e-5)
    assert q_y.max() < 0.9  # soft predictions, where the two priors differ
    old = SSVAE.from_config({key: value for key, value in ssvae.config().items() if key != "pseudo_input_labels"})
    old.load_state_dict(ssvae.state_dict())
    assert old.pseudo_input_labels == "predicted"
    loc, scale = ssvae.encode(u, q_y)
    soft = torch.distributions.Normal(loc[:, None], scale[:, None]).log_prob(z).sum(-1).logsumexp(0) - math.log(5)
    assert torch.allclose(old.prior.log_prob(z), soft, atol=1e-5)
    assert not torch.allclose(old.prior.log_prob(z), ssvae.prior.log_prob(z), atol=0.1)
    x = torch.bernoulli(torch.full((6, *X_SHAPE), 0.3))
    guide = config_enumerate(ssvae.guide, "parallel")  # z of shape (4, 6, 3) against the 20 components
    assert torch.isfinite(TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(ssvae.model, guide, x))
    plain = SSVAE(X_SHAPE, z_dim=3, num_classes=4, hidden=(16,))  # a setting of the VampPrior's alone:
    assert "pseudo_input_labels" not in plain.config()  # other priors' configs are as older runs wrote them
    with pytest.raises(ValueError, match=r"pseudo_input_labels must be one of \('summed', 'predicted'\)"):
        SSVAE(X_SHAPE, z_dim=3, num_classes=4, hidden=(16,), pseudo_input_labels="soft")


def test_bad_warm_start_lengths_are_refused():
    for steps in (-1, 2.5, True):
        with pytest.raises(ValueError, match="classifier_steps must be a whole number >= 0"):
            SemiSupervisedELBO(classifier_steps=steps)


def test_the_generative_classifier_is_argmax_of_log_p_x_y_where_it_is_known(small):
    """With p(x | y, z) blind to z and q(z | x, y) = p(z), every importance weight is p(x, y): exact at any K."""
    ssvae, x = small
    first = next(module for module in ssvae.decoder.modules() if isinstance(module, torch.nn.Linear))
    with torch.no_grad():
        first.weight[:, : ssvae.z_dim] = 0.0  # the decoder reads y only
    ssvae.encode_features = lambda features, y_onehot: (
        torch.zeros(*torch.broadcast_shapes(features.shape[:-3], y_onehot.shape[:-1]), ssvae.z_dim),
        torch.ones(ssvae.z_dim),
    )
    labels = torch.eye(ssvae.num_classes)
    with torch.no_grad():
        log_p_x_given_y = torch.stack(
            [ssvae.decode(torch.zeros(ssvae.z_dim), labels[c]).log_prob(x) for c in range(ssvae.num_classes)], -1
        )
        # a prior that overturns the likelihood's choice at the point where it is closest: log p(y) must count
        top_two = log_p_x_given_y.topk(2, dim=-1)
        closest = (top_two.values[:, 0] - top_two.values[:, 1]).argmin()
        logits = torch.zeros(ssvae.num_classes)
        logits[top_two.indices[closest, 1]] = float(top_two.values[closest, 0] - top_two.values[closest, 1]) + 0.1
        ssvae.class_prior_net.logits.copy_(logits)
        log_p_x_y = log_p_x_given_y + ssvae.class_prior_net().log_prob(labels)
    assert log_p_x_y[closest].argmax() != log_p_x_given_y[closest].argmax()
    assert len(set(log_p_x_y.argmax(-1).tolist())) > 1  # the answer differs between points
    assert torch.equal(pv.classify_generatively(ssvae, x, num_samples=3, batch_size=2), log_p_x_y.argmax(-1))


def test_the_command_trains_kingma_et_al_s_m2_by_default_and_records_the_warm_start(tmp_path):
    flags = ["--labels", "20", "--subset", "300", "--epochs", "1", "--eval-samples", "0", "--no-progress"]
    code = cli.main(["train", "--semi-supervised", *flags, "--classifier-steps", "7", "--out", str(tmp_path)])
    assert code == 0
    (run,) = tmp_path.iterdir()
    config = pv.RunDirectory(run).read_config()
    assert (config["model"]["z_dim"], config["model"]["hidden"], config["model"]["activation"]) == (
        50,
        [500],
        "softplus",
    )
    assert (config["train"]["batch_size"], config["train"]["lr"], config["train"]["lr_schedule"]) == (200, 3e-3, "step")
    assert config["train"]["objective"]["classifier_steps"] == 7
    assert config["train"]["objective"]["aux_weight"] == pytest.approx(9.2)  # 0.46 per label, not a fixed 46


def test_values_of_y_of_negligible_probability_are_dropped_from_the_enumerated_loss_and_change_nothing(small):
    """A confident q(y | x) (the classifier's output biases 0, 20, 40 and 80 below the first) puts some
    values of y below eps^2 (2^-104 in float64): the objective's enumerated guide gives them probability
    zero, and its loss and gradient agree with TraceEnum_ELBO on the plain enumerated guide to 1e-9 of the
    largest (float64 sums with cancellation; the dropped terms weigh below 2^-104)."""
    ssvae, x = small
    ssvae, x = ssvae.double(), x.double()
    with torch.no_grad():
        ssvae.classifier.net[-1].bias.copy_(torch.tensor([0.0, -20.0, -40.0, -80.0]))
    objective = SemiSupervisedELBO(num_labels=4)
    log_q = ssvae.classifier_logits(ssvae.guide_features(x)).log_softmax(-1).detach()
    dropped = log_q < math.log(torch.finfo(torch.float64).eps ** 2)
    assert dropped.any()  # the case the test is about
    enumerated = poutine.trace(poutine.enum(objective.enumerated_guide(ssvae), first_available_dim=-2)).get_trace(x)
    probabilities = enumerated.nodes["y"]["fn"].probs
    assert (probabilities[dropped] == 0).all() and (probabilities[~dropped] > 0).all()

    losses, gradients = [], []
    for guide in (objective.enumerated_guide(ssvae), config_enumerate(ssvae.guide, "parallel")):
        pyro.set_rng_seed(4)
        loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(ssvae.model, guide, x)
        losses.append(loss.detach())
        gradients.append(torch.autograd.grad(loss, list(ssvae.parameters()), allow_unused=True))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-9, atol=0)
    scale = max(float(exact.abs().max()) for exact in gradients[1] if exact is not None)
    for cut, exact in zip(*gradients, strict=True):
        assert (cut is None) == (exact is None)  # the same parameters reached
        if exact is not None:
            torch.testing.assert_close(cut, exact, rtol=1e-9, atol=1e-9 * scale)


def test_a_site_given_probabilities_keeps_its_zeros_and_loses_its_negligible_values():
    """torch clamps a zero probability to about 1e-7 in ``logits``: the zeros must stay zeros."""
    probs = torch.tensor([[0.5, 0.5, 1e-20, 0.0]])  # float32: 1e-20 is below 2^-46

    def guide():
        with pyro.plate("data", 1):
            pyro.sample("y", dist.Categorical(probs=probs), infer={"enumerate": "parallel"})

    trace = poutine.trace(poutine.enum(NegligibleValuesDropped()(guide), first_available_dim=-2)).get_trace()
    assert trace.nodes["y"]["fn"].probs.tolist() == [[0.5, 0.5, 0.0, 0.0]]
