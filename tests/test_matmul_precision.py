"""fit's matmul_precision: reduced-precision products for the optimisation alone, recorded, resumed exactly."""

import json

import pytest
import torch
from conftest import small_vae, without_timings

import pyro_vae as pv
from pyro_vae.infer import build_objective
from pyro_vae.runs import CheckpointError
from pyro_vae.training import engine as engine_module
from pyro_vae.training.engine import adam, check_same_training, take_step
from pyro_vae.training.precision import float32_matmul_precision, per_backend_settings


def medium_rounds_products() -> bool:
    """Whether "medium" changes a float32 product here (oneDNN on CPUs with AVX-512 BF16 or AMX); elsewhere the
    CPU multiplies in float32 whatever the setting."""
    a = torch.linspace(1, 2, 64 * 64).reshape(64, 64)
    with float32_matmul_precision("medium"):
        rounded = a @ a
    return not torch.equal(rounded, a @ a)


class PrecisionSeen:
    """Wraps an objective's start, loss and validate to note torch's float32 matmul precision at each call."""

    def __init__(self, objective):
        self.seen = {"start": set(), "loss": set(), "validate": set()}
        self.calls = dict.fromkeys(self.seen, 0)
        for name in self.seen:
            setattr(objective, name, self._noting(name, getattr(objective, name)))

    def _noting(self, name, method):
        def noted(*args, **kwargs):
            self.seen[name].add(torch.get_float32_matmul_precision())
            self.calls[name] += 1
            return method(*args, **kwargs)

        return noted


def test_the_precision_holds_for_the_optimisation_and_not_for_validation_or_evaluation(small_mnist, tmp_path,
                                                                                       monkeypatch):  # fmt: skip
    """The start and every step at fit's precision; every epoch's validation, the test metrics and the test log
    p(x) at the caller's ("high" here, so that neither fit's default nor its setting could pass for it)."""
    objective = build_objective("trace")
    noted = PrecisionSeen(objective)
    evaluations = []
    log_px = engine_module.log_marginal_likelihood
    monkeypatch.setattr(engine_module, "log_marginal_likelihood",
                        lambda *args, **kwargs: (evaluations.append(torch.get_float32_matmul_precision()),
                                                 log_px(*args, **kwargs))[1])  # fmt: skip
    few = small_mnist.subset(train=256, val=64, test=64)
    with float32_matmul_precision("high"):
        pv.fit(small_vae(), few, objective=objective, epochs=2, compile=False, progress=False, run_dir=tmp_path / "r",
               eval_samples=4, matmul_precision="medium")  # fmt: skip
        assert torch.get_float32_matmul_precision() == "high"
    assert noted.seen == {"start": {"medium"}, "loss": {"medium"}, "validate": {"high"}}
    assert noted.calls["validate"] == 5  # the metric's check, epochs 0 to 2, the test split
    assert evaluations == ["high"]


def test_the_callers_precision_is_restored_when_training_fails(small_mnist):
    objective = build_objective("trace")
    loss = objective.loss

    def failing(*args, **kwargs):
        if failing.calls == 2:
            raise RuntimeError("a failure inside the third step")
        failing.calls += 1
        return loss(*args, **kwargs)

    failing.calls, objective.loss = 0, failing
    for precision in ("medium", "highest"):  # fit's setting, and its default
        failing.calls = 0
        with float32_matmul_precision("high"):
            with pytest.raises(RuntimeError, match="inside the third step"):
                pv.fit(small_vae(), small_mnist, objective=objective, epochs=1, compile=False, progress=False,
                       matmul_precision=precision)  # fmt: skip
            assert torch.get_float32_matmul_precision() == "high"


@pytest.mark.skipif(not per_backend_settings(), reason="this torch keeps no per-backend matmul settings")
def test_a_caller_who_set_the_backends_apart_trains_and_gets_them_back(small_mnist):
    """torch refuses to read one precision back after the backends were set apart; fit neither needs it nor
    loses the caller's settings."""
    backends = per_backend_settings()
    callers = [backend.fp32_precision for backend in backends]
    try:
        backends[0].fp32_precision = "bf16" if backends[0] is torch.backends.mkldnn.matmul else "tf32"
        set_apart = [backend.fp32_precision for backend in backends]
        few = small_mnist.subset(train=128, val=32, test=32)
        pv.fit(small_vae(), few, epochs=1, compile=False, progress=False, matmul_precision="medium")
        assert [backend.fp32_precision for backend in backends] == set_apart
    finally:
        for backend, setting in zip(backends, callers, strict=True):
            backend.fp32_precision = setting


def test_an_unknown_precision_is_refused_before_any_work(small_mnist, tmp_path):
    with pytest.raises(ValueError, match="matmul_precision must be one of 'highest', 'high', 'medium'; got 'bf16'"):
        pv.fit(small_vae(), small_mnist, epochs=1, run_dir=tmp_path / "run", matmul_precision="bf16")
    assert not (tmp_path / "run").exists()


def test_a_run_records_its_precision_and_resumes_only_with_it_bit_for_bit(small_mnist, tmp_path, monkeypatch):
    few = small_mnist.subset(train=512, val=64, test=64)
    settings = dict(batch_size=64, compile=True, progress=False, matmul_precision="medium")
    torch.manual_seed(0)
    whole = pv.fit(small_vae(), few, epochs=2, run_dir=tmp_path / "whole", **settings)
    torch.manual_seed(0)
    pv.fit(small_vae(), few, epochs=1, run_dir=tmp_path / "parts", **settings)
    assert json.loads((tmp_path / "parts" / "config.json").read_text())["train"]["matmul_precision"] == "medium"
    with pytest.raises(CheckpointError, match="matmul_precision 'medium' -> 'highest'"):
        pv.resume_run(tmp_path / "parts", epochs=2, progress=False, matmul_precision="highest")
    steps = []
    take_step = engine_module.take_step
    monkeypatch.setattr(engine_module, "take_step",
                        lambda *args, **kwargs: (steps.append(torch.get_float32_matmul_precision()),
                                                 take_step(*args, **kwargs))[1])  # fmt: skip
    resumed = pv.resume_run(tmp_path / "parts", epochs=2, progress=False)  # the run's own precision
    assert set(steps) == {"medium"} and len(steps) == 8  # epoch 2's 512 / 64 steps
    assert json.loads((tmp_path / "parts" / "config.json").read_text())["train"]["matmul_precision"] == "medium"
    assert without_timings(resumed.history) == without_timings(whole)  # bit for bit (where "medium" rounds)


def test_runs_from_before_the_setting_resume_only_in_float32(tmp_path):
    """Their checkpoints' configs lack the key; every one of them multiplied in float32."""
    run, saved = pv.RunDirectory(tmp_path / "old"), {"lr": 1e-3, "lr_schedule": "constant"}
    check_same_training(run, saved, {**saved, "matmul_precision": "highest"})
    with pytest.raises(CheckpointError, match="matmul_precision 'highest' -> 'medium'"):
        check_same_training(run, saved, {**saved, "matmul_precision": "medium"})


@pytest.mark.skipif(not medium_rounds_products(), reason="this CPU multiplies in float32 at every precision")
def test_medium_rounds_the_products_and_moves_the_loss_by_little(small_mnist):
    """The same step from the same weights and draws, in float32 and at "medium". Rounding the products'
    inputs to bfloat16 (8 significant bits) moves each product by about 2^-9 of its terms' size; the loss, a sum
    over 64 x 784 pixels whose roundings mostly cancel, moved by 5e-6 of itself when measured: the bound 1e-4
    leaves a factor of 20 for other weights and draws. The same step twice in float32 gives the same loss to
    the bit, so any difference is the rounding's."""
    losses = []
    for precision in ("highest", "medium", "highest"):
        torch.manual_seed(0)
        model = small_vae()
        objective = build_objective("trace")
        objective.setup(model, small_mnist, batch_size=64)
        optimizer = adam(model.parameters(), 1e-3, torch.device("cpu"))
        torch.manual_seed(1)
        with float32_matmul_precision(precision):
            loss, _ = take_step(model, objective, optimizer, small_mnist, torch.arange(64))
        losses.append(loss)
    highest, medium, highest_again = losses
    assert highest_again == highest  # float32 twice: the same loss to the bit
    relative = abs(medium - highest) / abs(highest)
    assert 0 < relative < 1e-4
