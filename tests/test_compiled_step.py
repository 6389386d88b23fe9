"""The compiled training step (``pyro_vae.accel.training_step``) gives the eager step's numbers.

Tolerances: a replay draws the same random numbers as the eager step
(``fallback_random``), so the two differ only by the rounding of fused
float32 kernels: about 1e-7 relative on a loss summed over a batch, and up
to about 1e-5 of a gradient's largest entry on its entries near zero, which
carry the absolute error of sums over hundreds of terms. The tolerances are
ten times those.
"""

import math

import pyro
import pytest
import torch
from conftest import small_vae
from torch import nn

import pyro_vae as pv
from pyro_vae.accel import replay, training_step
from pyro_vae.infer import build_objective
from pyro_vae.infer.elbo import ELBO
from pyro_vae.models.base import data_plate
from pyro_vae.runs.files import load_checkpoint
from pyro_vae.training.engine import compiled_step

CASES = {
    "trace": ({"name": "trace"}, "vae"),
    "trace, 3 particles": ({"name": "trace", "num_particles": 3}, "vae"),
    "meanfield": ({"name": "meanfield"}, "vae"),
    "iwae": ({"name": "iwae", "num_particles": 4}, "vae"),
    "iwae, dreg, two stochastic layers": ({"name": "iwae", "num_particles": 4, "gradient": "dreg"}, "hierarchical"),
    "semi-supervised": ({"name": "semi-supervised", "num_labels": 50}, "ssvae"),
}


def tiny_model(kind):
    if kind == "ssvae":
        return pv.SSVAE((1, 28, 28), 4, hidden=(32,))
    if kind == "hierarchical":
        return pv.HierarchicalVAE((1, 28, 28), z_dims=(4, 3), hidden=((32,), (16,)))
    return small_vae(hidden=(32,), z_dim=4)


def assert_same_gradients(compiled, eager):
    for got, expected in zip(compiled, eager, strict=True):
        assert (got is None) == (expected is None)
        if expected is not None:
            scale = expected.abs().max().item()
            assert (got - expected).abs().max().item() <= 1e-4 * scale + 1e-6


@pytest.mark.parametrize("case", CASES)
def test_the_compiled_step_gives_the_eager_loss_and_gradient(case, small_mnist):
    config, kind = CASES[case]
    model, objective = tiny_model(kind), build_objective(config)
    objective.setup(model, small_mnist, batch_size=32)
    pyro.clear_param_store()  # the IWAE bound's setup traces the guide once, registering its parameters
    kl_weight = 0.7 if objective.supports_kl_weight else 1.0
    step = compiled_step(model, objective)
    for seed in (1, 2):  # the call that compiles, then a replay of new draws
        batch = objective.batch(small_mnist, torch.arange(32 * seed, 32 * (seed + 1)))
        pyro.set_rng_seed(seed)
        loss, gradients = step(*batch, torch.tensor(kl_weight))
        assert len(pyro.get_param_store()) == 0  # the recording registered nothing, fake or real
        after_replay = torch.get_rng_state()
        pyro.set_rng_seed(seed)
        eager = objective.loss(model, *batch, kl_weight=kl_weight)
        assert torch.equal(torch.get_rng_state(), after_replay)  # the replay drew exactly what the eager step drew
        expected = torch.autograd.grad(eager, step.parameters, allow_unused=True)
        pyro.clear_param_store()
        assert loss.item() == pytest.approx(eager.item(), rel=1e-6)
        assert_same_gradients(gradients, expected)


def test_the_recorded_dice_sum_equals_the_masked_one_with_an_infinite_cost_at_zero_probability():
    prob = torch.tensor([0.0, 0.25, 0.75], requires_grad=True)
    cost = torch.tensor([-math.inf, 2.0, -1.0], requires_grad=True)
    mask = prob > 0
    masked = (prob.masked_select(mask) * cost.masked_select(mask)).sum()  # Dice's branch for a zero probability
    expected = torch.autograd.grad(masked, (prob, cost))
    recorded = replay._expected_cost(prob, cost)
    assert recorded.item() == masked.item() == -0.25
    for got, want in zip(torch.autograd.grad(recorded, (prob, cost)), expected, strict=True):
        assert torch.equal(got, want)  # no NaN from 0 * inf, forwards or backwards


def test_an_enumerated_step_whose_class_probabilities_underflow_is_replayed(small_mnist):
    """A confident q(y|x): probabilities of exactly 0 send Pyro's Dice down its masked branch, eagerly.

    The recording sums the same terms without masking (``recordable_pyro``), so the replay needs no guard
    and gives the eager step's numbers with either branch.
    """
    model, objective = tiny_model("ssvae"), build_objective({"name": "semi-supervised", "num_labels": 50})
    objective.setup(model, small_mnist, batch_size=32)
    with torch.no_grad():
        model.classifier.net[-1].bias[0] += 150.0  # class 0 ahead by 150 nats: the others' probabilities are 0
    batch = objective.batch(small_mnist, torch.arange(32))
    probabilities = torch.softmax(model.classifier_logits(model.guide_features(batch[0])), -1)
    assert (probabilities[:, 1:] == 0).all()
    step = compiled_step(model, objective)
    for seed in (1, 2):
        pyro.set_rng_seed(seed)
        compiled = step(*batch, torch.tensor(1.0))
        assert compiled is not None and not step._guarded
        pyro.set_rng_seed(seed)
        eager = objective.loss(model, *batch, kl_weight=1.0)
        expected = torch.autograd.grad(eager, step.parameters, allow_unused=True)
        pyro.clear_param_store()
        assert torch.isfinite(eager) and compiled[0].item() == pytest.approx(eager.item(), rel=1e-6)
        assert_same_gradients(compiled[1], expected)


def test_fit_compiled_follows_fit_eager(small_mnist):
    data = small_mnist.subset(train=500)
    runs = {}
    for compile in (True, False):
        pyro.set_rng_seed(0)
        vae = small_vae(hidden=(32,), z_dim=4)
        history = pv.fit(vae, data, epochs=2, batch_size=64, warmup_epochs=1, progress=False, compile=compile)
        runs[compile] = history, vae
    (compiled, vae), (eager, reference) = runs[True], runs[False]
    # Each step differs from the eager one by float32 rounding (the test above), which 16 Adam steps carry into
    # the weights: measured, the objectives agreed to 1e-8 of themselves and the weights to 5e-7; the bounds
    # leave factors of 1000 and 20, and a step that is wrong by more than rounding exceeds them at once.
    for got, expected in zip(compiled[1:], eager[1:], strict=True):
        assert got["train_objective"] == pytest.approx(expected["train_objective"], rel=1e-5)
        assert got["val_elbo"] == pytest.approx(expected["val_elbo"], rel=1e-5)
    for got, expected in zip(vae.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(got, expected, atol=1e-5)
    assert compiled[1]["compile_seconds"] > 0 and compiled[2]["compile_seconds"] == 0
    assert "compile_seconds" not in eager[1]


def test_a_shorter_last_batch_runs_eagerly_and_nothing_recompiles(small_mnist, monkeypatch):
    import torch._inductor

    compiles = []
    real_compile = torch._inductor.compile
    monkeypatch.setattr(torch._inductor, "compile", lambda *args, **kw: compiles.append(1) or real_compile(*args, **kw))
    data = small_mnist.subset(train=200)  # batches of 64, 64, 64 and 8
    pv.fit(small_vae(hidden=(32,), z_dim=4), data, epochs=3, batch_size=64, progress=False, compile=True)
    assert len(compiles) == 1


class ValueReadingVAE(pv.VAE):
    """A guide that reads a tensor's value into Python arithmetic, which a replay would freeze."""

    def guide(self, x=None, **kwargs):
        with pyro.poutine.scale(scale=1.0 + 0.0 * float(x.mean())):
            return super().guide(x, **kwargs)


class BranchingVAE(pv.VAE):
    """A guide that takes a Python decision on a tensor value; ``threshold`` picks the branch."""

    threshold = -1.0

    def guide(self, x=None, **kwargs):
        loc, scale = self.encoder(x)
        if x.mean() > self.threshold:  # recorded as true, guarded at every replay
            loc = loc + 0.5
        pyro.module(f"{self.pyro_name}.encoder", self.encoder)
        with data_plate(x.shape[0], kwargs.get("num_data"), x.device):
            with pyro.poutine.scale(scale=kwargs.get("kl_weight", 1.0)):
                return pyro.sample("z", pyro.distributions.Normal(loc, scale).to_event(1))


def fit_both(model_class, data, **kwargs):
    """Histories and final parameters of the same run compiled and eager."""
    results = {}
    for compile in (True, False):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model = model_class((1, 28, 28), 4, hidden=(32,))
        history = pv.fit(model, data, epochs=1, batch_size=50, progress=False, compile=compile, **kwargs)
        results[compile] = [row["train_objective"] for row in history[1:]], list(model.parameters())
    return results[True], results[False]


def test_a_step_that_reads_values_runs_eagerly_after_one_warning(small_mnist):
    with pytest.warns(RuntimeWarning, match="cannot be recorded") as caught:
        (compiled, params), (eager, reference) = fit_both(ValueReadingVAE, small_mnist.subset(train=200))
    assert sum("cannot be recorded" in str(w.message) for w in caught) == 1
    assert compiled == eager
    assert all(torch.equal(a, b) for a, b in zip(params, reference, strict=True))


def test_a_decision_that_holds_is_replayed_and_one_that_fails_runs_eagerly(small_mnist, monkeypatch, recwarn):
    replayed = []  # the compiled step's answer at each step of the compiled run (None: the eager step ran)
    record_and_replay = training_step.CompiledStep.__call__
    monkeypatch.setattr(
        training_step.CompiledStep,
        "__call__",
        lambda step, *inputs: replayed.append(record_and_replay(step, *inputs)) or replayed[-1],
    )
    data = small_mnist.subset(train=400)
    (compiled, params), (eager, reference) = fit_both(BranchingVAE, data)  # x.mean() > -1 always holds
    assert compiled == pytest.approx(eager, rel=1e-5)
    # every step after the first (which runs eagerly, with Pyro's checks) replayed
    assert len(replayed) == len(data.train.x) // 50 - 1 and all(result is not None for result in replayed)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]

    replayed.clear()
    monkeypatch.setattr(BranchingVAE, "threshold", 2.0)  # never holds: every replay's guard fails
    with pytest.warns(RuntimeWarning, match="took a branch that 5 steps in a row did not take"):
        (compiled, params), (eager, reference) = fit_both(BranchingVAE, data)
    assert compiled == eager  # the failed replays gave their random draws back
    assert replayed and all(result is None for result in replayed)  # every replay thrown away: eager steps
    assert all(torch.equal(a, b) for a, b in zip(params, reference, strict=True))


def test_a_compiler_failure_falls_back_to_the_same_numbers_after_one_warning(small_mnist, monkeypatch):
    import torch._inductor

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch._inductor, "compile", broken)
    message = r"TorchInductor failed \(RuntimeError: no C\+\+ compiler found\)"
    with pytest.warns(RuntimeWarning, match=message) as caught:
        (compiled, params), (eager, reference) = fit_both(pv.VAE, small_mnist.subset(train=200))
    assert sum("TorchInductor failed" in str(w.message) for w in caught) == 1
    assert compiled == eager
    assert all(torch.equal(a, b) for a, b in zip(params, reference, strict=True))


class PoisonedBatches(ELBO):
    """The ELBO, with the decoder's output scaled by a buffer that turns NaN at the given step."""

    name = "trace"

    def __init__(self, poison: torch.Tensor, at_step: int):
        super().__init__()
        self.poison, self.at_step, self.steps = poison, at_step, 0

    def batch(self, data, indices):
        self.steps += 1
        if self.steps == self.at_step:
            self.poison.fill_(math.nan)
        return super().batch(data, indices)


class ScaledDecoder(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.register_buffer("poison", torch.ones(()))

    def forward(self, z):
        return self.inner(z) * self.poison


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_a_nan_in_a_compiled_step_stops_the_run_and_keeps_the_checkpoint(small_mnist, tmp_path):
    base = small_vae(hidden=(32,), z_dim=4)
    decoder = ScaledDecoder(base.decoder)
    vae = pv.VAE((1, 28, 28), 4, encoder=base.encoder, decoder=decoder)
    objective = PoisonedBatches(decoder.poison, at_step=6)  # epoch 2, step 2: replayed, with the buffer read fresh
    with pytest.raises(pv.TrainingDiverged, match=r"epoch 2, step 2\. .*Start a new run with a lower learning rate"):
        pv.fit(vae, small_mnist.subset(train=256), objective=objective, epochs=2, batch_size=64, run_dir=tmp_path,
               progress=False, compile=True)  # fmt: skip
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


def test_recording_leaves_pyro_as_it_was():
    modules = (pyro.infer.trace_elbo, pyro.infer.trace_mean_field_elbo, pyro.infer.traceenum_elbo)
    patched = lambda: (  # noqa: E731
        [m.warn_if_nan for m in modules] + [m.torch_item for m in modules[:2]],
        pyro.infer.util._fulldot, torch.Tensor.__bool__, pyro.infer.util.is_validation_enabled(),
    )  # fmt: skip
    before = patched()
    guards = []
    with replay.recordable_pyro(), training_step.assume_true(guards):
        assert patched() != before  # inside, Pyro's value reads are replaced ...
        assert not torch.tensor(False)  # ... and real tensors keep their truth
    assert patched() == before and not guards  # after, every replaced function is Pyro's own again
    assert type(pyro.infer.trace_elbo.torch_item(torch.tensor(2.0))) is float


def test_a_failed_guard_restores_the_generator_of_the_gpu_the_inputs_are_on(monkeypatch):
    """The CUDA branch of the random states a failed guard restores, on this CPU machine: the inputs stood in
    on a second GPU, whose generator (not the current device's) is read and set again."""
    gpu = torch.device("cuda", 1)
    on_gpu = type("OnGPU", (), {"is_cuda": True, "device": gpu})()
    read, restored = [], {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: read.append(device) or torch.tensor([7]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.__setitem__(device, state))
    cpu_state = torch.get_rng_state()
    states = training_step.CompiledStep._random_states([torch.zeros(2), on_gpu])
    assert read == [gpu] and torch.equal(states[0], cpu_state)
    torch.rand(3)  # the step's draws move the CPU generator on
    training_step.CompiledStep._restore_random_states(states)
    assert torch.equal(torch.get_rng_state(), cpu_state) and list(restored) == [gpu]
    assert torch.equal(restored[gpu], torch.tensor([7]))
    assert len(training_step.CompiledStep._random_states([torch.zeros(2)])) == 1  # CPU inputs: no GPU is read


def replay_and_eager(model, objective, data, step=None, seed: int = 1):
    """The compiled step's loss and gradients on one batch, and the eager step's on the same draws."""
    step = step or compiled_step(model, objective)
    batch = objective.batch(data, torch.arange(32))
    pyro.set_rng_seed(seed)
    replayed = step(*batch, torch.tensor(1.0))
    pyro.set_rng_seed(seed)
    eager = objective.loss(model, *batch, kl_weight=1.0)
    expected = torch.autograd.grad(eager, [p for p in step.parameters if p.requires_grad], allow_unused=True)
    pyro.clear_param_store()
    return replayed, (eager, expected), step


def test_a_weight_shared_by_two_layers_gets_the_gradient_of_both_uses(small_mnist):
    """A module's parameters list a shared weight once: each of its uses must read the recording's input, or
    the second would be recorded as a constant and its part of the gradient lost."""
    model = pv.VAE((1, 28, 28), 4, hidden=(32, 32))
    model.decoder.net[2].weight = model.encoder.net[2].weight  # both 32 x 32
    objective = build_objective({"name": "trace"})
    objective.setup(model, small_mnist, batch_size=32)
    (loss, gradients), (eager, expected), _ = replay_and_eager(model, objective, small_mnist)
    assert loss.item() == pytest.approx(eager.item(), rel=1e-6)
    assert_same_gradients(gradients, expected)


@pytest.mark.filterwarnings("ignore:.*was not registered in the param store because requires_grad=False")
def test_a_frozen_parameter_or_another_mode_after_recording_steps_as_the_eager_step(small_mnist):
    """The recording fixes the module's mode and its trainable parameters: with another, the step is eager."""
    model = pv.VAE((1, 28, 28), 4, hidden=(32,), prior="learned-gaussian")
    objective = build_objective({"name": "trace"})
    objective.setup(model, small_mnist, batch_size=32)
    step = compiled_step(model, objective)
    model.prior.requires_grad_(False)  # frozen when recorded: no gradient for it
    (_, gradients), (_, expected), _ = replay_and_eager(model, objective, small_mnist, step)
    frozen = [name for name, gradient in zip(step.names, gradients, strict=True) if gradient is None]
    assert frozen == ["prior.loc", "prior.raw_scale"]
    assert_same_gradients([gradient for gradient in gradients if gradient is not None], expected)
    batch = objective.batch(small_mnist, torch.arange(32))
    model.prior.requires_grad_(True)  # unfrozen since: the eager step, which computes its gradient
    assert step(*batch, torch.tensor(1.0)) is None
    model.prior.requires_grad_(False)
    assert step(*batch, torch.tensor(1.0)) is not None
    model.eval()  # dropout and batch statistics off: not the recorded program
    assert step(*batch, torch.tensor(1.0)) is None


class BatchNormVAE(BranchingVAE):
    """The branching guide over an encoder with batch normalisation, whose running statistics a step updates."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.encoder.net.insert(1, nn.BatchNorm1d(32))


def test_a_failed_guard_gives_back_the_running_statistics_the_replay_updated(small_mnist, monkeypatch, recwarn):
    monkeypatch.setattr(BranchingVAE, "threshold", 2.0)  # never holds: every replay's guard fails
    (compiled, params), (eager, reference) = fit_both(BatchNormVAE, small_mnist.subset(train=200))
    assert compiled == eager and all(torch.equal(a, b) for a, b in zip(params, reference, strict=True))
    buffers = {}
    for compile in (True, False):  # the statistics too: updated once a step, by the eager step alone
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model = BatchNormVAE((1, 28, 28), 4, hidden=(32,))
        pv.fit(model, small_mnist.subset(train=200), epochs=1, batch_size=50, progress=False, compile=compile)
        buffers[compile] = [buffer.clone() for buffer in model.buffers()]
    assert all(torch.equal(a, b) for a, b in zip(buffers[True], buffers[False], strict=True))


def interrupted_and_resumed(model_class, data, tmp_path, stop_at: int, **settings):
    """The final parameters of a compiled run, and of the same run stopped after ``stop_at`` steps (and epoch
    ends) and resumed."""
    from pyro_vae.training import engine

    def run(run_dir, resume=False):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model = model_class((1, 28, 28), 4, hidden=(32,))
        pv.fit(model, data, **settings, progress=False, compile=True, run_dir=run_dir, resume=resume)
        return list(model.parameters())

    reference = run(tmp_path / "whole")
    calls = iter(range(1, 10_000))
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(engine._Engine, "_interrupted", lambda self, interrupt: next(calls) == stop_at)
        with pytest.raises(pv.TrainingInterrupted):
            run(tmp_path / "cut")
    return reference, run(tmp_path / "cut", resume=True)


def test_a_run_resumed_at_the_short_last_batch_records_a_full_one(small_mnist, tmp_path):
    """Resumed where the next step is the epoch's short last batch, the run recorded that shape and stepped every
    full batch eagerly: now the short batch steps eagerly, as in the run that was not stopped."""
    data = small_mnist.subset(train=200, val=50, test=50)  # batches of 64, 64, 64 and 8
    whole, resumed = interrupted_and_resumed(pv.VAE, data, tmp_path, stop_at=8, epochs=3, batch_size=64)
    assert all(torch.equal(a, b) for a, b in zip(whole, resumed, strict=True))


class WarmupBranchingVAE(pv.VAE):
    """A guide that decides on the KL weight, which warm-up raises: the recording's branch fails at first."""

    def guide(self, x=None, *, kl_weight=1.0, num_data=None, batch_size=None):
        pyro.module(f"{self.pyro_name}.encoder", self.encoder)
        loc, scale = self.encoder(x)
        if kl_weight > 0.75:
            loc = loc * 1.0
        with data_plate(x.shape[0], num_data, x.device), pyro.poutine.scale(scale=kl_weight):
            return pyro.sample("z", pyro.distributions.Normal(loc, scale).to_event(1))


def test_a_recording_dropped_after_failed_guards_stays_dropped_when_resumed(small_mnist, tmp_path, recwarn):
    data = small_mnist.subset(train=200, val=50, test=50)  # 10 steps of 20 an epoch, the KL weight (t + 1) / 10
    whole, resumed = interrupted_and_resumed(
        WarmupBranchingVAE, data, tmp_path, stop_at=8, epochs=2, batch_size=20, warmup_epochs=1
    )
    assert all(torch.equal(a, b) for a, b in zip(whole, resumed, strict=True))
