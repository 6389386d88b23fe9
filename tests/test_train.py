"""Training, checkpoints, save/load and resume."""

import json
import math
import random
import time
import warnings
from dataclasses import replace

import numpy as np
import pyro
import pytest
import torch
from conftest import small_vae, without_timings
from torch import nn

import pyro_vae as pv
from pyro_vae.infer.elbo import ELBO, MeanFieldELBO
from pyro_vae.runs.files import load_checkpoint, save_checkpoint
from pyro_vae.training import engine as engine_module
from pyro_vae.training.engine import adam, take_step
from pyro_vae.training.schedules import (
    cosine_learning_rate,
    iwae_learning_rate,
    kl_weight_schedule,
    step_learning_rate,
)


def test_short_run_clearly_improves_the_validation_elbo(small_mnist):
    history = pv.fit(small_vae(), small_mnist, epochs=3, batch_size=64, progress=False)
    assert [row["epoch"] for row in history] == [0, 1, 2, 3]
    untrained, trained = history[0]["val_elbo"], history[-1]["val_elbo"]
    # Untrained: about -210 nats, every pixel's Bernoulli at its training mean (the decoder's output bias starts
    # there); three epochs on 2,000 digits reach about -180.
    assert trained > untrained + 20
    for row in history:  # the validation ELBO is reconstruction minus KL, each a mean over the same points
        # abs 1e-3: three float32 means of values about 100 to 200, each rounded to about 1e-5 relative
        assert row["val_elbo"] == pytest.approx(row["val_reconstruction"] - row["val_kl"], abs=1e-3)
    # From the random start (about -545 nats, 784 log 2) the same epochs reach only about -200.
    random = pv.fit(small_vae(), small_mnist, epochs=3, batch_size=64, output_bias="random", progress=False)
    assert random[0]["val_elbo"] < -500 and trained > random[-1]["val_elbo"] + 10


@pytest.mark.parametrize(
    "objective, elbo", [(ELBO, pyro.infer.Trace_ELBO), (MeanFieldELBO, pyro.infer.TraceMeanField_ELBO)]
)
def test_fast_step_gives_the_same_parameters_as_svi_with_pyro_optim(small_mnist, objective, elbo):
    """fit's step (the objective's differentiable loss + one torch Adam) against the textbook SVI + pyro.optim.Adam."""
    fast, slow = small_vae(), small_vae()
    slow.load_state_dict(fast.state_dict())
    initial = fast.decoder.net[0].weight.detach().clone()
    batches = [small_mnist.train.x[i : i + 32].bernoulli() for i in range(0, 32 * 6, 32)]
    points = pv.Split(torch.cat(batches))
    data = pv.Dataset("batches", points, points, points, binarize="none")
    optimizer = adam(fast.parameters(), 1e-3, torch.device("cpu"))  # fit's optimiser
    svi = pyro.infer.SVI(slow.model, slow.guide, pyro.optim.Adam({"lr": 1e-3}), elbo())
    for step, x in enumerate(batches):
        pyro.set_rng_seed(step)  # the same reparameterisation noise in both
        indices = torch.arange(32 * step, 32 * (step + 1))
        fast_loss, count = take_step(fast, objective(), optimizer, data, indices, kl_weight=0.5)
        assert count == 32
        pyro.set_rng_seed(step)
        slow_loss = svi.step(x, kl_weight=0.5)
        assert fast_loss == pytest.approx(slow_loss, rel=1e-5)
    # float32 rounding only: the two steps sum the same terms in other orders; six Adam steps of lr 1e-3 move a
    # weight by up to 6e-3, so a wrong step would miss by far more than 1e-6
    for (name, p), q in zip(fast.named_parameters(), slow.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert (fast.decoder.net[0].weight - initial).abs().max() > 1e-3  # six Adam steps of 1e-3 moved them


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_a_non_finite_loss_leaves_the_parameters_untouched():
    vae = small_vae(likelihood=pv.likelihoods.Gaussian())
    before = [p.detach().clone() for p in vae.parameters()]
    x = torch.full((4, 1, 28, 28), 1e30)  # the squared error overflows float32
    optimizer = torch.optim.Adam(vae.parameters())
    data = pv.Dataset("huge", pv.Split(x), pv.Split(x), pv.Split(x), binarize="none")
    loss, _ = take_step(vae, ELBO(), optimizer, data, torch.arange(4))
    assert not math.isfinite(loss)
    assert all(torch.equal(p, q) for p, q in zip(vae.parameters(), before, strict=True))


def test_meanfield_elbo_and_warmup_train(small_mnist):
    history = pv.fit(  # from the random output-bias start (about -545 nats), where two epochs gain over 200
        small_vae(),
        small_mnist,
        epochs=2,
        objective="meanfield",
        warmup_epochs=1.5,
        output_bias="random",
        progress=False,
    )
    assert history[1]["kl_weight"] < 1.0 and history[2]["kl_weight"] == 1.0
    assert history[-1]["val_elbo"] > history[0]["val_elbo"] + 200


def test_a_warmup_longer_than_the_run_is_warned_of(small_mnist):
    with pytest.warns(UserWarning, match=r"--warmup-epochs 4\) is longer than the 1 epochs: .* only 0.25 of beta"):
        history = pv.fit(small_vae(), small_mnist, epochs=1, warmup_epochs=4, progress=False)
    assert history[-1]["kl_weight"] <= 0.25
    with warnings.catch_warnings(record=True) as caught:  # a warm-up that rounds to the run's steps: no warning
        warnings.simplefilter("always")
        history = pv.fit(small_vae(), small_mnist, epochs=1, warmup_epochs=1.001, progress=False)
    assert history[-1]["kl_weight"] == 1.0 and not [w for w in caught if "KL warm-up" in str(w.message)]


def test_kl_weight_schedule():
    weights = [kl_weight_schedule(step, beta=2.0, warmup_steps=4) for step in range(6)]
    assert weights == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert kl_weight_schedule(0, beta=0.5, warmup_steps=0) == 0.5


def test_the_iwae_learning_rate_schedule_is_burda_et_als():
    """Stage i = 0, ..., 7 runs 3^i epochs at lr * 10^(-i/7): epoch 1, then 2-4, 5-13, ..., 1094-3280."""
    first_epochs = [1, 2, 5, 14, 41, 122, 365, 1094]
    for stage, first in enumerate(first_epochs):
        assert iwae_learning_rate(first, 2e-3, 3280) == pytest.approx(2e-3 * 10 ** (-stage / 7), rel=1e-12)
        previous = 2e-3 * 10 ** (-max(stage - 1, 0) / 7)
        assert iwae_learning_rate(first - 1, 2e-3, 364) == pytest.approx(previous, rel=1e-12)  # any run length
    assert iwae_learning_rate(3280, 1e-3, 3280) == iwae_learning_rate(10**6, 1e-3, 10**6) == pytest.approx(1e-4)


class ELBOAndDraws(ELBO):
    """The ELBO plus a constant drawn from NumPy's and Python's generators, as a model of one's own may draw:
    the same gradients, and a training objective that shows the draws."""

    def loss(self, model, x, *, kl_weight):
        return super().loss(model, x, kl_weight=kl_weight) + float(np.random.rand() + random.random())


def test_a_resumed_run_continues_numpy_and_pythons_random_streams(small_mnist, tmp_path):
    """Checkpoints held torch's generators alone: a resumed run drew from NumPy and Python's where the process
    had left them, not where the run had."""
    data = small_mnist.subset(train=256)
    settings = {"epochs": 2, "batch_size": 64, "compile": False, "progress": False}  # a replay would freeze the draws
    pyro.set_rng_seed(0)
    straight = pv.fit(small_vae(), data, objective=ELBOAndDraws(), run_dir=tmp_path / "straight", **settings)
    pyro.set_rng_seed(0)
    pv.fit(small_vae(), data, objective=ELBOAndDraws(), run_dir=tmp_path / "resumed", **{**settings, "epochs": 1})
    np.random.seed(123), random.seed(123)  # where another process would have them
    resumed = pv.fit(small_vae(), data, objective=ELBOAndDraws(), run_dir=tmp_path / "resumed", resume=True, **settings)
    assert resumed[2]["train_objective"] == straight[2]["train_objective"]


def test_a_resumed_run_steps_eagerly_or_compiled_as_it_did(small_mnist, tmp_path, monkeypatch):
    """compile="auto" (fit's default) decided from the call's epochs: a run made eager, resumed to a length that
    "auto" compiles, switched to the compiled step and rewrote its config. It continues as it was made."""
    monkeypatch.setattr(engine_module, "AUTO_COMPILE_STEPS", 1)  # every run long enough to compile
    data = small_mnist.subset(train=128)
    pv.fit(small_vae(), data, epochs=1, batch_size=64, compile=False, run_dir=tmp_path / "r", progress=False)
    history = pv.fit(small_vae(), data, epochs=2, batch_size=64, run_dir=tmp_path / "r", resume=True, progress=False)
    assert "compile_seconds" not in history[2]  # nothing was compiled
    assert json.loads((tmp_path / "r" / "config.json").read_text())["train"]["compile"] is False


def test_a_learning_rate_schedule_trains_with_its_rates_and_resumes_exactly(small_mnist, tmp_path):
    """Epoch 2 of the iwae schedule runs at 10^(-1/7) of the rate: recorded, used, and the same after a resume."""
    data = small_mnist.subset(train=500)
    pyro.set_rng_seed(0)  # the same initial weights for every model below
    scheduled = small_vae()
    straight = pv.fit(scheduled, data, epochs=2, lr_schedule="iwae", run_dir=tmp_path / "straight", progress=False)
    assert [row["lr"] for row in straight[1:]] == [1e-3, 1e-3 * 10 ** (-1 / 7)]
    assert json.loads((tmp_path / "straight" / "config.json").read_text())["train"]["lr_schedule"] == "iwae"

    pyro.set_rng_seed(0)
    pv.fit(small_vae(), data, epochs=1, lr_schedule="iwae", run_dir=tmp_path / "resumed", progress=False)
    resumed = small_vae()
    pv.fit(resumed, data, epochs=2, lr_schedule="iwae", run_dir=tmp_path / "resumed", resume=True, progress=False)
    pyro.set_rng_seed(0)
    constant = small_vae()
    pv.fit(constant, data, epochs=2, progress=False)
    for a, b, c in zip(scheduled.parameters(), resumed.parameters(), constant.parameters(), strict=True):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)  # the second epoch's rate was not the constant one

    with pytest.raises(pv.CheckpointError, match=r"other settings \(lr_schedule 'iwae' -> 'constant'\)"):
        pv.fit(small_vae(), data, epochs=3, run_dir=tmp_path / "resumed", resume=True, progress=False)
    with pytest.raises(ValueError, match=r"lr_schedule must be one of 'constant', 'iwae', 'cosine', 'step'; got 'exp'"):
        pv.fit(small_vae(), data, epochs=1, lr_schedule="exp", progress=False)


def test_the_cosine_schedule_anneals_over_the_runs_epochs():
    """Loshchilov & Hutter's rates, and torch's CosineAnnealingLR stepped once an epoch gives the same."""
    assert cosine_learning_rate(1, 2e-3, 4) == 2e-3
    assert cosine_learning_rate(3, 2e-3, 4) == pytest.approx(1e-3, rel=1e-12)  # half-way: (1 + cos(pi / 2)) / 2
    assert cosine_learning_rate(5, 2e-3, 4) == pytest.approx(0.0, abs=1e-18)  # the epoch after the last
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-3)
    torch_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=7)
    for epoch in range(1, 8):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(cosine_learning_rate(epoch, 2e-3, 7), rel=1e-9)
        optimizer.step()
        torch_schedule.step()


def test_the_step_schedule_runs_the_last_tenth_at_a_tenth_of_the_rate():
    """MultiStepLR with the one milestone E - E // 10 and gamma 0.1, stepped once an epoch, gives the same rates."""
    rates = [step_learning_rate(epoch, 3e-3, 200) for epoch in (1, 180, 181, 200)]
    assert rates == pytest.approx([3e-3, 3e-3, 3e-4, 3e-4], rel=1e-12)
    assert [step_learning_rate(epoch, 1e-3, 9) for epoch in range(1, 10)] == [1e-3] * 9  # under 10 epochs: no step
    for epochs in (10, 25, 200):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=3e-3)
        torch_schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[epochs - epochs // 10], gamma=0.1)
        for epoch in range(1, epochs + 1):
            assert optimizer.param_groups[0]["lr"] == pytest.approx(step_learning_rate(epoch, 3e-3, epochs), rel=1e-12)
            optimizer.step()
            torch_schedule.step()


def test_a_step_run_resumes_to_its_own_epochs_only(small_mnist, tmp_path):
    data = small_mnist.subset(train=300)
    history = pv.fit(small_vae(), data, epochs=10, lr_schedule="step", run_dir=tmp_path / "run", progress=False)
    assert [row["lr"] for row in history[1:]] == pytest.approx([1e-3] * 9 + [1e-4], rel=1e-12)
    with pytest.raises(ValueError, match=r"follows the step learning-rate schedule over 10 epochs.*resume it to 10"):
        pv.fit(small_vae(), data, epochs=20, lr_schedule="step", run_dir=tmp_path / "run", resume=True)


def test_a_cosine_run_resumes_exactly_to_its_own_epochs_only(small_mnist, tmp_path, monkeypatch):
    data = small_mnist.subset(train=300)
    pyro.set_rng_seed(0)
    straight = small_vae()
    history = pv.fit(straight, data, epochs=3, lr_schedule="cosine", run_dir=tmp_path / "straight", progress=False)
    assert [row["lr"] for row in history[1:]] == pytest.approx([1e-3, 0.75e-3, 0.25e-3], rel=1e-12)

    # the same run stopped as by a Ctrl-C in its second epoch, then resumed
    steps = iter(range(10**6))
    stop_in_epoch_two = lambda engine, interrupt: engine.history[-1]["epoch"] == 1 and next(steps) == 1  # noqa: E731
    with monkeypatch.context() as patch:
        patch.setattr(engine_module._Engine, "_interrupted", stop_in_epoch_two)
        pyro.set_rng_seed(0)
        with pytest.raises(pv.TrainingInterrupted, match="at epoch 2, step 1 of 3"):
            pv.fit(small_vae(), data, epochs=3, lr_schedule="cosine", run_dir=tmp_path / "stopped", progress=False)
    with pytest.raises(ValueError, match=r"follows the cosine learning-rate schedule over 3 epochs.*resume it to 3"):
        pv.fit(small_vae(), data, epochs=5, lr_schedule="cosine", run_dir=tmp_path / "stopped", resume=True)
    resumed = small_vae()
    pv.fit(resumed, data, epochs=3, lr_schedule="cosine", run_dir=tmp_path / "stopped", resume=True, progress=False)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("epochs", 2.5, "epochs must be an integer >= 0; got 2.5"),
        ("epochs", -1, "epochs must be an integer >= 0"),
        ("batch_size", 64.0, "batch_size must be an integer >= 1; got 64.0"),
        ("batch_size", True, "batch_size must be an integer >= 1; got True"),
        ("eval_samples", 0.5, "eval_samples must be an integer >= 0"),
        ("lr", float("nan"), "lr must be a number > 0"),
        ("lr", "1e-3", "lr must be a number > 0; got '1e-3'"),
        ("beta", "2", "beta must be a number > 0; got '2'"),
        ("warmup_epochs", None, "warmup_epochs must be a number >= 0; got None"),
        ("seed", -1, "seed must be an integer from 0 to 4294967295; got -1"),
        ("seed", 0.5, "seed must be an integer from 0 to 4294967295; got 0.5"),
    ],
)
def test_invalid_settings_are_refused_before_the_run_directory_is_made(small_mnist, tmp_path, setting, value, message):
    with pytest.raises(ValueError, match=message):
        pv.fit(small_vae(), small_mnist, **{"epochs": 1, setting: value}, run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_test_log_px_without_a_run_directory_to_write_it_is_refused(small_mnist):
    with pytest.raises(ValueError, match="eval_samples writes the test log p.x. into the run directory's metrics"):
        pv.fit(small_vae(), small_mnist, epochs=1, eval_samples=100, progress=False)


def test_run_directory_and_round_trip(small_mnist, tmp_path):
    vae = small_vae()
    pv.fit(vae, small_mnist, epochs=1, run_dir=tmp_path / "run", progress=False)
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.json", "checkpoint.pt", "history.csv", "metrics.json"} <= files
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test_elbo"] < 0 and metrics["num_test"] == 500

    run = pv.load_run(tmp_path / "run")
    assert run.epoch == 1 and len(run.history) == 2
    x = small_mnist.test.x[:32]
    vae.eval()
    for a, b in zip(vae.encode(x), run.model.encode(x), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(vae.decode(vae.encode(x)[0]).mean, run.model.decode(run.model.encode(x)[0]).mean)
    torch.manual_seed(5)
    before = pv.evaluate_elbo(vae, x)
    torch.manual_seed(5)
    assert pv.evaluate_elbo(run.model, x) == before
    assert len(run.load_data().train) == 2000


def test_resume_continues_exactly(small_mnist, tmp_path):
    """Two epochs, then two more on resume, equal four epochs straight: same weights, same history."""
    straight_vae = small_vae()
    straight = pv.fit(straight_vae, small_mnist, epochs=4, run_dir=tmp_path / "straight", progress=False)

    pyro.set_rng_seed(0)
    vae = small_vae()
    pv.fit(vae, small_mnist, epochs=2, run_dir=tmp_path / "resumed", progress=False)
    pyro.set_rng_seed(123)  # resuming must not depend on the state of the caller's RNG
    resumed_vae = small_vae()
    resumed = pv.fit(resumed_vae, small_mnist, epochs=4, run_dir=tmp_path / "resumed", resume=True, progress=False)

    assert [r["epoch"] for r in resumed] == [0, 1, 2, 3, 4]
    assert without_timings(resumed) == without_timings(straight)
    for a, b in zip(straight_vae.state_dict().values(), resumed_vae.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    config = json.loads((tmp_path / "resumed" / "config.json").read_text())
    assert config["train"]["epochs"] == 4


def test_an_epoch_stopped_part_way_counts_the_seconds_of_both_parts(small_mnist, tmp_path, monkeypatch):
    """A Ctrl-C in an epoch saves the seconds it has taken so far; the resumed epoch's row adds them to its own."""
    from pyro_vae.training import engine

    take, slept, step_seconds = engine.take_step, 0.1, []

    def timed_step(*args, **kwargs):
        begin = time.perf_counter()
        time.sleep(slept)  # the first part is made slow, so that its seconds stand out from the second part's
        result = take(*args, **kwargs)
        step_seconds.append(time.perf_counter() - begin)
        return result

    monkeypatch.setattr(engine, "take_step", timed_step)
    monkeypatch.setattr(engine._Engine, "_interrupted", lambda self, interrupt: len(step_seconds) == 10)
    with pytest.raises(pv.TrainingInterrupted):
        pv.fit(small_vae(), small_mnist, epochs=1, batch_size=100, run_dir=tmp_path / "run", progress=False)
    first = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["position"]
    assert first["step"] == 10 and first["seconds"] >= sum(step_seconds) >= 10 * slept

    slept, step_seconds[:] = 0.0, []
    monkeypatch.setattr(engine._Engine, "_interrupted", lambda self, interrupt: False)
    history = pv.fit(
        small_vae(), small_mnist, epochs=1, batch_size=100, run_dir=tmp_path / "run", resume=True, progress=False
    )
    assert len(step_seconds) == 10  # the other ten of the epoch's 20 steps
    # without the first part's seconds the row would hold about sum(step_seconds) alone, a second less
    assert history[1]["seconds"] >= first["seconds"] + sum(step_seconds)


def test_a_run_from_an_older_version_extends(small_mnist, tmp_path):
    """Histories written before rows had ``val_seconds`` still resume, extend and report their budget."""
    pv.fit(small_vae(), small_mnist, epochs=1, run_dir=tmp_path / "old", progress=False)
    state = load_checkpoint(tmp_path / "old" / "checkpoint.pt")
    for row in state["history"]:
        row.pop("val_seconds", None)
    save_checkpoint(
        tmp_path / "old" / "checkpoint.pt",
        model_state=state["model"],
        optimizer_state=state["optimizer"],
        epoch=state["epoch"],
        history=state["history"],
        config=state["config"],
    )
    history = pv.fit(small_vae(), small_mnist, epochs=2, run_dir=tmp_path / "old", resume=True, progress=False)
    metrics = json.loads((tmp_path / "old" / "metrics.json").read_text())
    assert len(history) == 3 and metrics["epochs"] == 2 and metrics["train_seconds"] > 0


def test_a_fresh_run_starts_the_output_bias_at_the_data_and_a_resumed_one_keeps_its_start(small_mnist, tmp_path):
    """output_bias="data" sets the decoder's last bias to the logits of the training pixels' means; "random" keeps
    it; the config records the start, and resuming (which starts nothing) keeps the run's record, "random" for a run
    written before the option."""
    vae = small_vae()
    pv.fit(vae, small_mnist, epochs=0, run_dir=tmp_path / "data", progress=False)
    expected = torch.logit(small_mnist.train.x.double().mean(0).clamp(1e-3, 1 - 1e-3)).float().flatten()
    assert torch.allclose(vae.decoder.net[-1].bias, expected, atol=1e-6)

    vae = small_vae()
    initial = vae.decoder.net[-1].bias.detach().clone()
    pv.fit(vae, small_mnist, epochs=0, output_bias="random", run_dir=tmp_path / "random", progress=False)
    assert torch.equal(vae.decoder.net[-1].bias, initial)

    def started_again(self, x):
        raise AssertionError("a resumed run started its output bias again")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pv.VAE, "start_output_bias", started_again)
        pv.resume_run(tmp_path / "random", epochs=1, progress=False)  # resumes with its recorded start
        assert json.loads((tmp_path / "data" / "config.json").read_text())["train"]["output_bias"] == "data"
        old = tmp_path / "data" / "checkpoint.pt"  # a run written before the option: its config has no output_bias
        state = load_checkpoint(old)
        del state["config"]["train"]["output_bias"]
        torch.save(state, old)
        resumed = pv.resume_run(tmp_path / "data", epochs=0, progress=False)
    last_bias = [name for name in state["model"] if name.startswith("decoder.") and name.endswith(".bias")][-1]
    assert torch.equal(resumed.model.decoder.net[-1].bias, state["model"][last_bias])

    class OwnDecoder(nn.Module):  # a user's decoder, without start_output_at
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(8, 784)

        def forward(self, z):
            return self.net(z).unflatten(-1, (1, 1, 28, 28))

    pv.fit(small_vae(decoder=OwnDecoder()), small_mnist, epochs=0, run_dir=tmp_path / "own", progress=False)
    recorded = {
        run: json.loads((tmp_path / run / "config.json").read_text())["train"] for run in ("data", "random", "own")
    }
    assert [recorded[run]["output_bias"] for run in ("data", "random", "own")] == ["random", "random", "random"]
    with pytest.raises(ValueError, match="output_bias must be one of"):
        pv.fit(small_vae(), small_mnist, epochs=0, output_bias="mean", progress=False)


@pytest.mark.parametrize(
    "model",
    [
        pv.VAE((1, 4, 4), 2, hidden=(8,)),
        pv.HierarchicalVAE((1, 4, 4), z_dims=(3, 2), hidden=((8,), (4,))),
        pv.SSVAE((1, 4, 4), z_dim=2, num_classes=3, hidden=(8,)),
    ],
    ids=["vae", "hierarchical", "m2"],
)
def test_every_model_with_a_decoder_starts_its_output_bias_at_the_data(model):
    x = torch.rand(50, 1, 4, 4)
    assert model.start_output_bias(x)
    assert torch.allclose(model.decoder.net[-1].bias, torch.logit(x.mean(0).clamp(1e-3, 1 - 1e-3)).flatten())


def test_a_finished_run_is_not_overwritten(small_mnist, tmp_path):
    pv.fit(small_vae(), small_mnist.subset(train=200), epochs=1, run_dir=tmp_path, progress=False)
    with pytest.raises(pv.CheckpointError, match=r"already holds a run; resume it \(--resume\) or choose another name"):
        pv.fit(small_vae(), small_mnist.subset(train=200), epochs=1, run_dir=tmp_path, progress=False)


def test_resume_refuses_another_model(small_mnist, tmp_path):
    pv.fit(small_vae(), small_mnist.subset(train=200), epochs=2, run_dir=tmp_path, progress=False)
    for epochs in (2, 1):  # the model is what is wrong, not the epochs (1 is fewer than the run trained)
        with pytest.raises(pv.CheckpointError, match="written for the model .*resume it with the model it was"):
            pv.fit(small_vae(z_dim=3), small_mnist.subset(train=200), epochs=epochs, run_dir=tmp_path, resume=True,
                   progress=False)  # fmt: skip


class PoisonedDecoder(nn.Module):
    """A decoder that starts returning NaN after a number of healthy calls."""

    def __init__(self, inner, healthy_calls):
        super().__init__()
        self.inner, self.healthy_calls, self.calls = inner, healthy_calls, 0

    def forward(self, z):
        self.calls += 1
        out = self.inner(z)
        return out if self.calls <= self.healthy_calls else out * float("nan")


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_divergence_stops_with_epoch_and_step_and_keeps_the_last_checkpoint(small_mnist, tmp_path):
    data = small_mnist.subset(train=256)
    base = small_vae()
    # Healthy calls: the VAE's check of the networks' shapes, the check that validation gives the best epoch's
    # metric, validation at epoch 0, two training steps, validation at epoch 1.
    vae = pv.VAE((1, 28, 28), 8, encoder=base.encoder, decoder=PoisonedDecoder(base.decoder, healthy_calls=6))
    with pytest.raises(
        pv.TrainingDiverged,
        match=r"epoch 2, step 1\. .*resuming it would repeat this step.*Start a new run with a lower learning rate",
    ):
        pv.fit(vae, data, epochs=2, batch_size=128, run_dir=tmp_path, progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


def test_resume_refuses_other_training_settings(small_mnist, tmp_path):
    data = small_mnist.subset(train=200)
    pv.fit(small_vae(), data, epochs=1, run_dir=tmp_path, progress=False)
    with pytest.raises(pv.CheckpointError, match=r"other settings \(batch_size 128 -> 64\)"):
        pv.fit(small_vae(), data, epochs=2, batch_size=64, run_dir=tmp_path, resume=True, progress=False)
    # The standard gradient is left out of the config (as runs before the choice wrote it); STL is still a change.
    with pytest.raises(pv.CheckpointError, match=r"other settings \(objective .*'gradient': 'standard'.* -> "):
        pv.fit(
            small_vae(), data, objective={"name": "trace", "gradient": "stl"}, epochs=2, run_dir=tmp_path,
            resume=True, progress=False,
        )  # fmt: skip


def test_resume_refuses_other_data(small_mnist, tmp_path):
    """Another subset, another binarisation, or tensors of one's own of other sizes: a run stopped part-way would
    index its saved order of points into the new training set, and its config would describe data it was not
    trained on."""
    data = small_mnist.subset(train=200)
    pv.fit(small_vae(), data, epochs=1, run_dir=tmp_path / "run", progress=False)
    resumed = {"epochs": 2, "run_dir": tmp_path / "run", "resume": True, "progress": False}
    with pytest.raises(pv.CheckpointError, match=r"other data \(subset .*'train': 200.* -> .*'train': 100"):
        pv.fit(small_vae(), small_mnist.subset(train=100), **resumed)
    with pytest.raises(pv.CheckpointError, match=r"other data \(binarize 'dynamic' -> 'none'"):
        pv.fit(small_vae(), replace(data, spec={**data.spec, "binarize": "none"}), **resumed)
    own = replace(data, spec=None)  # tensors of one's own: no spec, so the counts tell
    with pytest.raises(pv.CheckpointError, match=r"other data \(data \{.*\} -> None\)"):
        pv.fit(small_vae(), own, **resumed)
    pv.fit(small_vae(), own, epochs=1, run_dir=tmp_path / "own", progress=False)
    with pytest.raises(pv.CheckpointError, match=r"points \{'train': 200, .*\} -> \{'train': 150, "):
        pv.fit(small_vae(), replace(own, train=own.train.subset(150)), **{**resumed, "run_dir": tmp_path / "own"})
    assert pv.fit(small_vae(), own, **{**resumed, "run_dir": tmp_path / "own"})[-1]["epoch"] == 2
    moved = {**data.spec, "data_dir": str(tmp_path)}  # where the files are is no part of what they are
    assert pv.fit(small_vae(), replace(data, spec=moved), **resumed)[-1]["epoch"] == 2


def test_resume_takes_an_older_run_s_data_recorded_as_it_was(small_mnist, tmp_path, monkeypatch):
    """Runs before 2026-12-06 recorded a data file by the path as typed, and no counts; a run resumed from its
    config gets the absolute path. A subset the old spec lacks is still another data set."""
    x = torch.bernoulli(torch.full((300, 1, 28, 28), 0.3))
    np.savez(tmp_path / "points.npz", x=x.numpy())
    monkeypatch.chdir(tmp_path)
    data = pv.load_dataset("points.npz", binarize="none", val_size=50)
    pv.fit(small_vae(), data, epochs=1, run_dir=tmp_path / "run", progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    del config["data_points"]
    config["data"]["name"] = "points.npz"  # as typed
    for name in ("checkpoint.pt", "best.pt"):
        state = torch.load(tmp_path / "run" / name, weights_only=True)
        torch.save({**state, "config": config}, tmp_path / "run" / name)
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    assert pv.resume_run(tmp_path / "run", epochs=2, progress=False).epoch == 2
    with pytest.raises(pv.CheckpointError, match=r"other data \(subset None -> \{'train': 200"):
        pv.fit(small_vae(), data.subset(train=200), epochs=3, run_dir=tmp_path / "run", resume=True, progress=False)


def test_flushing_adams_subnormal_moments_zeroes_them_and_moves_no_parameter():
    """Two copies of a parameter whose Adam state holds subnormal moments (as a dead ReLU unit's weights come to),
    one flushed: the flushed moments are zero, every other moment is untouched, and after ten more Adam steps with
    the same gradients the two parameters agree to the bit (the docstring's bound: the update changes by far less
    than the parameters' rounding)."""
    torch.manual_seed(0)
    start = torch.randn(1000)
    tiny, smallest = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).smallest_normal / 2**23
    parameters = [nn.Parameter(start.clone()) for _ in range(2)]
    optimizers = [adam([parameter], 1e-3, torch.device("cpu")) for parameter in parameters]
    gradients = [torch.randn(1000) * (torch.arange(1000) >= 300) for _ in range(11)]  # the first 300 never move
    for parameter, optimizer in zip(parameters, optimizers, strict=True):
        parameter.grad = gradients[0].clone()
        optimizer.step()
        state = optimizer.state[parameter]
        state["exp_avg"][:100] = 4 * smallest  # stuck there: 0.9 x 4 x 2^-149 rounds to 4 x 2^-149
        state["exp_avg"][100:200] = -tiny / 3
        state["exp_avg_sq"][:200] = tiny / 7
    kept = {name: optimizers[1].state[parameters[1]][name][200:].clone() for name in ("exp_avg", "exp_avg_sq")}
    engine_module.flush_subnormal_moments(optimizers[1])
    flushed = optimizers[1].state[parameters[1]]
    assert not flushed["exp_avg"][:200].any() and not flushed["exp_avg_sq"][:200].any()
    assert all(torch.equal(flushed[name][200:], kept[name]) for name in kept)
    assert (optimizers[0].state[parameters[0]]["exp_avg"][:100] == 4 * smallest).all()  # the unflushed copy's
    for gradient in gradients[1:]:
        for parameter, optimizer in zip(parameters, optimizers, strict=True):
            parameter.grad = gradient.clone()
            optimizer.step()
    assert torch.equal(parameters[0], parameters[1])
    assert (optimizers[0].state[parameters[0]]["exp_avg"][:100] == 4 * smallest).all()  # still stuck


def test_fit_flushes_adams_subnormal_moments_at_the_start_of_every_fresh_epoch(small_mnist, tmp_path, monkeypatch):
    """Once before each epoch's first step; a run stopped part-way through epoch 2 and resumed flushes at the
    starts of epochs 1, 2 and 3 alone, as the run that never stopped does, so that resume stays exact."""
    few = small_mnist.subset(train=256, val=64, test=64)
    flushed_at = []  # Adam's steps taken when each flush came
    flush = engine_module.flush_subnormal_moments
    steps_taken = lambda optimizer: max((int(state["step"]) for state in optimizer.state.values()), default=0)  # noqa: E731
    monkeypatch.setattr(engine_module, "flush_subnormal_moments",
                        lambda optimizer: (flushed_at.append(steps_taken(optimizer)), flush(optimizer)))  # fmt: skip
    pv.fit(small_vae(), few, epochs=3, batch_size=64, compile=False, progress=False)
    assert flushed_at == [0, 4, 8]  # four steps an epoch
    flushed_at.clear()
    steps = iter(range(10**6))
    stop_in_epoch_two = lambda engine, interrupt: engine.history[-1]["epoch"] == 1 and next(steps) == 1  # noqa: E731
    with monkeypatch.context() as patch:
        patch.setattr(engine_module._Engine, "_interrupted", stop_in_epoch_two)
        with pytest.raises(pv.TrainingInterrupted, match="at epoch 2, step 1 of 4"):
            pv.fit(small_vae(), few, epochs=3, batch_size=64, compile=False, progress=False, run_dir=tmp_path / "r")
    pv.fit(small_vae(), few, epochs=3, batch_size=64, compile=False, progress=False, run_dir=tmp_path / "r",
           resume=True)  # fmt: skip
    assert flushed_at == [0, 4, 8]  # not again where the resumed run took up epoch 2 after its first step
