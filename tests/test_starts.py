"""Several starts, the best continued (``fit(starts=...)``): the run is the chosen start's, epoch for epoch."""

import math
import os
import signal

import pyro
import pytest
import torch
from conftest import without_timings

import pyro_vae as pv
from pyro_vae.infer.semisupervised import SemiSupervisedELBO
from pyro_vae.models import build_model
from pyro_vae.runs.files import load_checkpoint, read_json
from pyro_vae.training.engine import MAX_SEED, TrainingInterrupted, _Engine

SEEDS = (7, 8, 9)
SETTINGS = dict(epochs=3, batch_size=100, eval_samples=0, progress=False, compile=False, lr=3e-3)


@pytest.fixture(scope="module")
def data(mnist):
    return mnist.subset(train=1000, val=500, test=500)


def fresh_m2(data, init_seed=0):
    torch.manual_seed(init_seed)
    return pv.SSVAE(data.x_shape, z_dim=4, hidden=(32,))


def objective():
    return SemiSupervisedELBO(num_labels=50, classifier_steps=50)


def parameters(model):
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def start_model(data, seed):
    """Start ``seed``'s model: the first start's the model as given, the others' rebuilt under their seed."""
    model = fresh_m2(data)
    if seed == SEEDS[0]:
        return model
    pyro.set_rng_seed(seed)
    return build_model(model.config())


@pytest.fixture(scope="module")
def plain_runs(data, tmp_path_factory):
    """The run from each seed alone: what each start must be."""
    runs = {}
    for seed in SEEDS:
        model = start_model(data, seed)
        history = pv.fit(
            model, data, objective=objective(), seed=seed, run_dir=tmp_path_factory.mktemp(f"seed-{seed}"), **SETTINGS
        )
        runs[seed] = history, parameters(model)
    return runs


@pytest.fixture(scope="module")
def chosen_run(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("starts") / "run"
    model = fresh_m2(data)
    history = pv.fit(
        model, data, objective=objective(), seed=SEEDS[0], starts=3, start_epochs=2, run_dir=run, **SETTINGS
    )
    return run, history, parameters(model)


def test_the_best_start_at_start_epochs_is_continued_and_the_run_is_its_seed_s_run(plain_runs, chosen_run):
    run, history, weights = chosen_run
    record = read_json(run / "starts" / "starts.json")
    scores = {seed: plain_runs[seed][0][2]["val_accuracy"] for seed in SEEDS}
    assert [start["seed"] for start in record["starts"]] == list(SEEDS)
    assert [start["val_accuracy"] for start in record["starts"]] == [scores[seed] for seed in SEEDS]
    chosen = max(SEEDS, key=scores.get)  # the first of equals
    assert record["chosen_seed"] == chosen and record["epoch"] == 2 and record["metric"] == "val_accuracy"
    # bit for bit the chosen seed's own run: the copied checkpoints resume exactly
    assert without_timings(history) == without_timings(plain_runs[chosen][0])
    assert all(torch.equal(weights[name], plain_runs[chosen][1][name]) for name in weights)
    metrics = pv.RunDirectory(run).read_metrics()
    assert metrics["start_seed"] == chosen and metrics["starts_seconds"] > 0
    config = pv.RunDirectory(run).read_config()["train"]
    assert (config["seed"], config["starts"], config["start_epochs"]) == (SEEDS[0], 3, 2)
    for seed in SEEDS:  # each start keeps its record, not its weights
        start = run / "starts" / f"seed-{seed}"
        assert (start / "config.json").exists() and (start / "history.csv").exists()
        assert not (start / "checkpoint.pt").exists() and not (start / "best.pt").exists()


def test_a_choice_stopped_part_way_resumes_to_the_same_run(data, chosen_run, tmp_path, monkeypatch):
    """Ctrl-C in the second start saves it; a resume from a model of other weights finishes the same run."""
    run = tmp_path / "run"
    steps = []
    original = SemiSupervisedELBO.loss

    def loss(self, *args, **kwargs):
        steps.append(1)
        if len(steps) == 25:  # the second start's first epoch (ten steps an epoch), part-way
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SemiSupervisedELBO, "loss", loss)
    with pytest.raises(TrainingInterrupted, match=rf"in start 2 of 3 \(seed 8\); saved to {run}. Continue with"):
        pv.fit(fresh_m2(data), data, objective=objective(), seed=7, starts=3, start_epochs=2, run_dir=run, **SETTINGS)
    assert load_checkpoint(run / "starts" / "seed-8" / "checkpoint.pt")["position"]["step"] == 5
    with pytest.raises(pv.CheckpointError, match="still training its starts.*pyro-vae train --resume"):
        pv.load_run(run)
    with pytest.raises(pv.CheckpointError, match="already holds a run; resume it"):
        pv.fit(fresh_m2(data), data, objective=objective(), seed=7, starts=3, start_epochs=2, run_dir=run, **SETTINGS)
    with pytest.raises(pv.CheckpointError, match=r"other settings \(start_epochs 2 -> 1\)"):
        pv.fit(
            fresh_m2(data), data, objective=objective(), seed=7, starts=3, start_epochs=1, run_dir=run, resume=True,
            **SETTINGS,
        )  # fmt: skip
    model = fresh_m2(data, init_seed=1)  # the starts begin from the weights they were given, kept in the run
    history = pv.fit(
        model, data, objective=objective(), seed=7, starts=3, start_epochs=2, run_dir=run, resume=True, **SETTINGS
    )
    _, reference, weights = chosen_run
    assert without_timings(history) == without_timings(reference)
    assert all(torch.equal(value, weights[name]) for name, value in parameters(model).items())


def test_each_start_but_the_first_draws_its_weights_and_a_model_its_config_cannot_rebuild_is_refused(data, tmp_path):
    given = fresh_m2(data)
    drawn, name = start_model(data, 8).state_dict(), "classifier.net.0.weight"
    assert not torch.equal(drawn[name], given.state_dict()[name])
    shape = data.x_shape
    custom = pv.VAE(shape, 4, encoder=pv.nets.MLPEncoder(shape, 4, (16,)), decoder=pv.nets.MLPDecoder(4, shape, (16,)))
    assert not custom.describable
    with pytest.raises(ValueError, match="networks of one's own; train one start"):
        pv.fit(custom, data, starts=2, start_epochs=1, run_dir=tmp_path / "run", **SETTINGS)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(starts=0), "starts must be an integer >= 1"),
        (dict(starts=2, start_epochs=0), "start_epochs must be an integer >= 1"),
        (dict(starts=2, start_epochs=4), r"start_epochs \(4\) must not exceed the run's epochs \(3\)"),
        (dict(starts=2, start_epochs=2, seed=MAX_SEED), f"seed \\+ starts - 1, which must not exceed {MAX_SEED}"),
        (dict(starts=2, start_epochs=2, run_dir=None), "give run_dir"),
        (dict(stop_after=-1), "stop_after must be None or an epoch >= 0"),
    ],
)
def test_impossible_starts_are_refused_before_any_work(data, tmp_path, settings, message):
    settings = {"run_dir": tmp_path / "run", **SETTINGS, **settings}
    with pytest.raises(ValueError, match=message):
        pv.fit(fresh_m2(data), data, objective=objective(), **settings)
    assert not (tmp_path / "run").exists()


def test_a_run_stopped_after_an_epoch_resumes_to_the_run_that_never_stopped(data, plain_runs, tmp_path):
    model = start_model(data, 8)
    history = pv.fit(model, data, objective=objective(), seed=8, stop_after=1, run_dir=tmp_path, **SETTINGS)
    assert [row["epoch"] for row in history] == [0, 1] and not (tmp_path / "metrics.json").exists()
    history = pv.fit(model, data, objective=objective(), seed=8, run_dir=tmp_path, resume=True, **SETTINGS)
    assert without_timings(history) == without_timings(plain_runs[8][0])


@pytest.mark.filterwarnings("ignore:Encountered NaN")  # Pyro's, of the diverged step
def test_a_diverged_start_is_left_out_of_the_choice(data, plain_runs, tmp_path, monkeypatch):
    steps = []
    original = SemiSupervisedELBO.loss

    def loss(self, *args, **kwargs):
        steps.append(1)
        value = original(self, *args, **kwargs)
        return value * math.nan if len(steps) == 25 else value  # the second start's first epoch

    monkeypatch.setattr(SemiSupervisedELBO, "loss", loss)
    run = tmp_path / "run"
    history = pv.fit(
        fresh_m2(data), data, objective=objective(), seed=7, starts=3, start_epochs=2, run_dir=run, **SETTINGS
    )
    record = read_json(run / "starts" / "starts.json")
    assert record["starts"][1]["val_accuracy"] is None and "The loss became nan" in record["starts"][1]["diverged"]
    scores = {seed: plain_runs[seed][0][2]["val_accuracy"] for seed in (7, 9)}
    assert record["chosen_seed"] == max(scores, key=scores.get)
    assert without_timings(history) == without_timings(plain_runs[record["chosen_seed"]][0])


def test_a_ctrl_c_between_starts_saves_and_a_resume_finishes_the_same_run(data, chosen_run, tmp_path, monkeypatch):
    original = _Engine._train_start

    def train_start(self, start, seed, *args):
        result = original(self, start, seed, *args)
        if seed == 7:  # as if Ctrl-C came while the first start's checkpoint was being read
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(_Engine, "_train_start", train_start)
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match=rf"after start 1 of 3; saved to {run}. Continue with"):
        pv.fit(fresh_m2(data), data, objective=objective(), seed=7, starts=3, start_epochs=2, run_dir=run, **SETTINGS)
    monkeypatch.setattr(_Engine, "_train_start", original)
    other = pv.SSVAE(data.x_shape, z_dim=5, hidden=(32,))
    with pytest.raises(pv.CheckpointError, match="was written for the model"):
        pv.fit(
            other, data, objective=objective(), seed=7, starts=3, start_epochs=2, run_dir=run, resume=True, **SETTINGS
        )
    history = pv.resume_run(run, progress=False).history
    assert without_timings(history) == without_timings(chosen_run[1])


def test_starts_as_long_as_the_run_are_compared_before_the_run_finishes(data, tmp_path):
    run = tmp_path / "run"
    pv.fit(
        fresh_m2(data), data, objective=objective(), starts=2, start_epochs=2, run_dir=run, **{**SETTINGS, "epochs": 2}
    )
    assert pv.RunDirectory(run).read_metrics()["epochs"] == 2
    assert not any((run / "starts").glob("seed-*/metrics.json"))  # a start is paused, never finished
