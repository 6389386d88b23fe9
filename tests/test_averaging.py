"""fit's ema_decay: the run validates, keeps and returns the average of its weights; the iterates train on, exactly."""

import json

import pytest
import torch
from conftest import small_vae, without_timings
from training_processes import assert_same_values

import pyro_vae as pv
from pyro_vae.infer import objective as objective_module
from pyro_vae.runs.files import CheckpointError, load_checkpoint
from pyro_vae.training.averaging import WeightAverage, warmed_up_decay


@pytest.mark.parametrize("decay, warm_up", [(0.8, True), (0.9999, True), (0.8, False)])
def test_the_average_follows_its_recursion_with_the_decay_warmed_up(decay, warm_up):
    """theta_bar_1 = theta_1, theta_bar_t = d_t theta_bar_(t-1) + (1 - d_t) theta_t with d_t = min(d, t / (t + 9)),
    written out in float64 over 60 steps: at d = 0.8 the cap holds from step 36 on, at 0.9999 the warm-up decides
    every step; without the warm-up d_t = d (Kingma & Ba's form)."""
    module = torch.nn.Linear(3, 2)
    average = WeightAverage(module, decay, warm_up)
    expected = None
    with torch.no_grad():
        for t in range(1, 61):
            for parameter in module.parameters():
                parameter.add_(torch.randn_like(parameter))
            average.update(module)
            iterate = [parameter.double() for parameter in module.parameters()]
            d_t = min(decay, t / (t + 9)) if warm_up else decay
            if expected is None:
                expected = iterate
            else:
                expected = [d_t * a + (1 - d_t) * w for a, w in zip(expected, iterate, strict=True)]
    assert average.steps == 60
    for averaged, wanted in zip(average.averaged.module.parameters(), expected, strict=True):
        torch.testing.assert_close(averaged.double(), wanted, rtol=0, atol=1e-5)  # 60 float32 lerps of values about 10


def test_the_decay_warms_up_to_its_cap():
    assert [warmed_up_decay(0.9999, t) for t in (1, 9, 91)] == [0.1, 0.5, 91 / 100]
    assert warmed_up_decay(0.9, 81) == 0.9 and warmed_up_decay(0.9, 1000) == 0.9  # 81 / 90 reaches the cap


def test_the_average_is_applied_within_the_block_and_the_iterates_come_back_bit_for_bit():
    module = torch.nn.Linear(4, 3)
    average = WeightAverage(module, 0.5)
    before = [parameter.clone() for parameter in module.parameters()]
    with average.applied(module):  # before any step the average is the weights themselves
        for parameter, first in zip(module.parameters(), before, strict=True):
            assert torch.equal(parameter, first)
    for parameter, first in zip(module.parameters(), before, strict=True):
        assert torch.equal(parameter, first)
    average.update(module)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.mul_(3.0)
    iterates = [parameter.clone() for parameter in module.parameters()]
    average.update(module)  # d_2 before + (1 - d_2) 3 before
    d_2 = warmed_up_decay(0.5, 2)
    with average.applied(module):
        for parameter, first in zip(module.parameters(), before, strict=True):
            torch.testing.assert_close(parameter, (d_2 + 3 * (1 - d_2)) * first)
    for parameter, iterate in zip(module.parameters(), iterates, strict=True):
        assert torch.equal(parameter, iterate)


def test_averaging_only_watches_and_the_run_keeps_and_returns_the_average(small_mnist, tmp_path, monkeypatch):
    """The iterates, the Adam state and the training objective are those of the same run without averaging; the
    validation, the best checkpoint, the returned model and the test metrics are of the average."""
    settings = dict(epochs=2, batch_size=100, compile=False, progress=False)
    plain = pv.fit(small_vae(), small_mnist, run_dir=tmp_path / "plain", **settings)
    validated = []  # the weights of every validation: the metric's check, epochs 0 to 2, the best's test metrics
    evaluate = objective_module.evaluate_elbo

    def recording(model, x, **kwargs):
        validated.append({key: value.clone() for key, value in model.state_dict().items()})
        return evaluate(model, x, **kwargs)

    monkeypatch.setattr(objective_module, "evaluate_elbo", recording)
    torch.manual_seed(0)
    vae = small_vae()
    averaged = pv.fit(vae, small_mnist, run_dir=tmp_path / "averaged", ema_decay=0.9, **settings)

    plain_state = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")
    state = load_checkpoint(tmp_path / "averaged" / "checkpoint.pt")
    assert plain_state["averaging"] is None
    assert_same_values(state["averaging"]["iterates"], plain_state["model"], "iterates")
    assert_same_values(state["optimizer"]["state"], plain_state["optimizer"]["state"], "Adam's state")
    assert state["averaging"]["steps"] == 2 * 20  # 2,000 points in batches of 100, two epochs
    assert [row["train_objective"] for row in averaged[1:]] == [row["train_objective"] for row in plain[1:]]
    parameters = [name for name, _ in vae.named_parameters()]  # the buffers are copied as they are
    assert not any(torch.equal(state["model"][name], plain_state["model"][name]) for name in parameters)

    best = load_checkpoint(tmp_path / "averaged" / "best.pt")
    assert len(validated) == 5
    assert_same_values(validated[3], state["model"], "epoch 2's validation")
    assert_same_values(validated[4], best["model"], "the test metrics")
    assert_same_values(vae.state_dict(), best["model"], "the weights fit returns")
    assert_same_values(pv.load_run(tmp_path / "averaged").model.state_dict(), best["model"], "the loaded run")
    assert json.loads((tmp_path / "averaged" / "config.json").read_text())["train"]["ema_decay"] == 0.9


def test_an_averaged_run_resumes_exactly(small_mnist, tmp_path):
    """One epoch, then one more on resume, equal two straight: iterates, average, Adam and history, bit for bit."""
    settings = dict(batch_size=100, compile=False, progress=False, ema_decay=0.95)
    pv.fit(small_vae(), small_mnist, epochs=2, run_dir=tmp_path / "straight", **settings)
    torch.manual_seed(0)
    pv.fit(small_vae(), small_mnist, epochs=1, run_dir=tmp_path / "resumed", **settings)
    torch.manual_seed(123)
    resumed = pv.fit(small_vae(), small_mnist, epochs=2, run_dir=tmp_path / "resumed", resume=True, **settings)
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("resumed", "straight"))
    assert_same_values(a["model"], b["model"], "the average")
    assert_same_values(a["averaging"], b["averaging"], "the iterates")
    assert_same_values(a["optimizer"]["state"], b["optimizer"]["state"], "Adam's state")
    assert without_timings(resumed) == without_timings(a["history"]) == without_timings(b["history"])


def test_a_run_resumes_with_its_own_decay_only(small_mnist, tmp_path):
    pv.fit(small_vae(), small_mnist, epochs=1, run_dir=tmp_path / "run", progress=False, ema_decay=0.9)
    with pytest.raises(CheckpointError, match=r"ema_decay 0\.9 -> 0\.0"):
        pv.fit(small_vae(), small_mnist, epochs=2, run_dir=tmp_path / "run", resume=True, progress=False)
    pv.resume_run(tmp_path / "run", epochs=2, progress=False)  # the recorded decay, from config.json
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 2


@pytest.mark.parametrize("decay", [1.0, -0.1, float("nan"), True])
def test_a_decay_outside_zero_to_one_is_refused_before_any_work(small_mnist, tmp_path, decay):
    with pytest.raises(ValueError, match=r"ema_decay must be a number from 0 \(no averaging\) to below 1"):
        pv.fit(small_vae(), small_mnist, epochs=1, run_dir=tmp_path / "run", progress=False, ema_decay=decay)
    assert not (tmp_path / "run").exists()
