"""Nothing lost, nothing trusted blindly: kills, Ctrl-C, hostile files and fuzzed numbers.

Every kill, interrupt and bad input here is counted in :data:`REPORT`; each
test hands its counts to pytest as a user property, and the terminal summary
adds them up (on the controller too, when pytest-xdist runs the tests).
"""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from conftest import continuous_bernoulli_log_density, without_timings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyro_vae as pv
from pyro_vae.runs.files import load_checkpoint

REPORT: Counter = Counter()
# about 0.7 s per epoch for the VAE, 1-2 s for M2: long enough for a signal to land anywhere in it
EPOCHS = 3
COMMON = ["--subset", "3000", "--hidden", "32", "--z-dim", "2", "--batch-size", "10", "--epochs", str(EPOCHS)]
TRAIN = {
    "vae": [*COMMON, "--eval-samples", "10", "--no-progress"],
    "ssvae": [*COMMON, "--semi-supervised", "--labels", "100", "--eval-samples", "10", "--no-progress"],
    "m1m2": [*COMMON[2:], "--labels", "100", "--eval-samples", "10", "--no-progress"],  # M1's data: its subset
    "vae-compiled": [*COMMON, "--compile", "on", "--eval-samples", "10", "--no-progress"],
}
KILLS = {"vae": 4, "ssvae": 4, "m1m2": 4}
# two SIGINTs for the VAE (a resume of a resume); one for the others, whose engine is the same. A fresh run's
# delay counts from its first checkpoint (epoch 0, written once the Ctrl-C handler is in place), a resume's from
# its announcement: a busy machine can take longer than any fixed delay to get from announcing to training.
SIGINT_DELAYS = {"vae": (0.4, 0.8), "ssvae": (0.6,), "m1m2": (0.6,)}


@pytest.fixture(autouse=True)
def _report_counts(request):
    """What this test added to REPORT, as its ("robustness", counts) user property for the summary."""
    before = REPORT.copy()
    yield
    request.node.user_properties.append(("robustness", dict(REPORT - before)))


@pytest.fixture(scope="module")
def m1_run(tmp_path_factory) -> Path:
    """A small trained VAE for M1+M2 to stack on."""
    out = tmp_path_factory.mktemp("m1")
    args = ["--subset", "1000", "--hidden", "32", "--z-dim", "4", "--epochs", "1", "--eval-samples", "0"]
    done = subprocess.run(
        [sys.executable, "-m", "pyro_vae.cli", "train", *args, "--no-progress", "--out", str(out), "--name", "m1"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out / "m1"


def start_training(run: Path, resume: bool, kind: str, m1: Path | None) -> subprocess.Popen:
    if resume:
        args = ["--resume", str(run), "--no-progress"]
    else:
        args = [*TRAIN[kind], *(["--m1", str(m1)] if kind == "m1m2" else []), "--out", str(run.parent)]
        args += ["--name", run.name]
    return subprocess.Popen(
        [sys.executable, "-m", "pyro_vae.cli", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # the same arithmetic in every process
    )


def finish(run: Path, kind: str, m1: Path | None) -> None:
    process = start_training(run, (run / "checkpoint.pt").exists(), kind, m1)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]


def wait_for_training(process: subprocess.Popen) -> None:
    """Until the command has imported everything and announced its run directory."""
    line = process.stdout.readline()
    while line.startswith("M1:"):  # M1+M2 first says which units of M1 it stacks on
        line = process.stdout.readline()
    assert line.startswith("run directory:"), line + process.communicate()[1][-2000:]


def wait_for_first_checkpoint(run: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    """Until a fresh run has saved epoch 0 (its engine is then training), or the process has ended."""
    deadline = time.monotonic() + timeout
    while not (run / "checkpoint.pt").exists() and process.poll() is None:
        assert time.monotonic() < deadline, f"no first checkpoint in {run} after {timeout} s"
        time.sleep(0.02)


def assert_same_training_state(run: Path, reference: Path) -> None:
    a, b = load_checkpoint(run / "checkpoint.pt"), load_checkpoint(reference / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == EPOCHS and a["position"] is None
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][key][name]), (key, name)
    assert without_timings(a["history"]) == without_timings(b["history"])
    for key in a["objective"]:  # the semi-supervised objective's labelled order and cursor
        assert str(a["objective"][key]) == str(b["objective"][key]), key


@pytest.fixture(scope="module", params=["vae", "ssvae", "m1m2"])
def reference_run(request, tmp_path_factory) -> tuple[Path, str, Path | None]:
    kind = request.param
    m1 = request.getfixturevalue("m1_run") if kind == "m1m2" else None
    run = tmp_path_factory.mktemp(f"reference-{kind}") / "run"
    finish(run, kind, m1)
    return run, kind, m1


def test_sigkill_at_random_moments_loses_nothing(tmp_path, reference_run):
    """SIGKILL at random moments until training is done; each resume continues from the last complete epoch."""
    reference, kind, m1 = reference_run
    run = tmp_path / "run"
    rng = random.Random(0)
    epochs_seen, killed_before_the_first_checkpoint = [], False
    for _ in range(3 * KILLS[kind]):  # a kill before the first checkpoint does not count; up to a limit
        process = start_training(run, (run / "checkpoint.pt").exists(), kind, m1)
        wait_for_training(process)
        if killed_before_the_first_checkpoint:  # that case is shown once: the rest count from the first save
            wait_for_first_checkpoint(run, process)
        time.sleep(rng.uniform(0.2, 1.2) * (1 if kind == "vae" else 2))
        process.send_signal(signal.SIGKILL)
        process.wait()
        REPORT[f"SIGKILLs survived ({kind})"] += 1
        if not (run / "checkpoint.pt").exists():
            killed_before_the_first_checkpoint = True  # the next start begins afresh
            continue
        state = load_checkpoint(run / "checkpoint.pt")  # never half-written
        assert state["position"] is None  # a kill saves nothing part-way: the last complete epoch stands
        epochs_seen.append(state["epoch"])
        if state["epoch"] == EPOCHS or len(epochs_seen) == KILLS[kind]:
            break
    assert epochs_seen == sorted(epochs_seen) and len(epochs_seen) >= 2
    finish(run, kind, m1)
    assert_same_training_state(run, reference)
    assert json.loads((run / "metrics.json").read_text())["test_elbo"] == pytest.approx(
        json.loads((reference / "metrics.json").read_text())["test_elbo"]
    )


def test_sigint_finishes_the_step_saves_and_exits_cleanly(tmp_path, reference_run):
    reference, kind, m1 = reference_run
    interrupt_resume_and_compare(tmp_path / "run", reference, kind, m1, delays=SIGINT_DELAYS[kind])


@pytest.fixture(scope="module")
def compiled_reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference-compiled") / "run"
    finish(run, "vae-compiled", None)
    return run


def test_sigint_in_a_compiled_run_resumes_bit_for_bit(tmp_path, compiled_reference):
    """The compiled step: a SIGINT while compiling or part-way through an epoch saves, and the resume matches."""
    history = load_checkpoint(compiled_reference / "checkpoint.pt")["history"]
    assert history[1]["compile_seconds"] > 0  # the reference compiled its step
    interrupt_resume_and_compare(tmp_path / "run", compiled_reference, "vae-compiled", None, delays=(1.5,))


def interrupt_resume_and_compare(run: Path, reference: Path, kind: str, m1: Path | None, delays) -> None:
    """SIGINT a run after each delay, resume it each time, finish it, and compare it with the reference bit for bit."""
    interrupted_at = []
    for delay in delays:  # after loading the data, part-way through an epoch
        fresh = not (run / "checkpoint.pt").exists()
        process = start_training(run, not fresh, kind, m1)
        wait_for_training(process)
        if fresh:
            wait_for_first_checkpoint(run, process)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
        REPORT[f"SIGINTs survived ({kind})"] += 1
        if process.returncode == 0:  # it finished before the signal arrived
            break
        assert process.returncode == 130 and "Traceback" not in err, err[-2000:]
        if "every completed epoch is saved" in err:  # it arrived after training, while making figures
            break
        assert "Continue with: pyro-vae train --resume" in err, err[-2000:]
        state = load_checkpoint(run / "checkpoint.pt")
        interrupted_at.append((state["epoch"], state["position"] and state["position"]["step"]))
    assert any(step for _, step in interrupted_at), f"no SIGINT landed part-way through an epoch: {interrupted_at}"
    finish(run, kind, m1)
    assert_same_training_state(run, reference)  # a mid-epoch save resumes to the very same numbers


def test_stale_temporary_files_do_not_block_a_resume(tmp_path, small_mnist):
    run = tmp_path / "run"
    pv.fit(pv.VAE((1, 28, 28), 2, hidden=(16,)), small_mnist.subset(train=100), epochs=1, run_dir=run, progress=False)
    (run / ".checkpoint.pt.abc.tmp").write_bytes(b"half a checkpoint")  # what a kill during a write leaves
    pv.fit(
        pv.VAE((1, 28, 28), 2, hidden=(16,)), small_mnist.subset(train=100), epochs=2, run_dir=run, resume=True,
        progress=False,
    )  # fmt: skip
    assert not list(run.glob(".*.tmp"))
    REPORT["bad inputs refused or cleaned"] += 1


# ------------------------------------------------------------------ hostile files


@pytest.fixture
def trained_run(tmp_path, small_mnist) -> Path:
    run = tmp_path / "run"
    pv.fit(pv.VAE((1, 28, 28), 2, hidden=(16,)), small_mnist.subset(train=100), epochs=1, run_dir=run, progress=False)
    return run


def _rewrite_checkpoint(run: Path, **changes) -> None:
    state = load_checkpoint(run / "checkpoint.pt")
    state.update(changes)
    torch.save(state, run / "checkpoint.pt")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda run: (run / "checkpoint.pt").write_bytes(b""), "truncated or corrupt"),
        (lambda run: (run / "checkpoint.pt").write_bytes(b"PK\x03\x04 garbage"), "truncated or corrupt"),
        (lambda run: _rewrite_checkpoint(run, version=99), "format version 99"),
        (lambda run: _rewrite_checkpoint(run, format="something-else"), "not a pyro-vae checkpoint"),
        (lambda run: torch.save([1, 2, 3], run / "checkpoint.pt"), "not a pyro-vae checkpoint"),
        (lambda run: (run / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda run: (run / "checkpoint.pt").unlink(), "No checkpoint"),
        (
            lambda run: (run / "config.json").write_text(
                json.dumps({**json.loads((run / "config.json").read_text()), "model": {"z_dim": 7}})
            ),
            "describes a different model",
        ),
    ],
    ids=["empty", "bad-zip", "other-version", "other-format", "not-a-dict", "bad-json", "missing", "config-mismatch"],
)
def test_broken_run_files_are_refused_with_the_fix(trained_run, damage, message):
    damage(trained_run)
    with pytest.raises(pv.CheckpointError, match=message):
        pv.load_run(trained_run, checkpoint="last")
    REPORT["bad inputs refused or cleaned"] += 1


def test_a_pickle_that_runs_code_is_never_executed(trained_run, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"format": "pyro-vae-checkpoint", "version": 1, "payload": Exploit()}, trained_run / "checkpoint.pt")
    with pytest.raises(pv.CheckpointError, match="not trusted"):
        pv.load_run(trained_run, checkpoint="last")
    assert not marker.exists()
    REPORT["bad inputs refused or cleaned"] += 1


@pytest.mark.parametrize(
    "array, message",
    [
        (np.array(["a", "b", "c"] * 10).reshape(10, 3), "dtype <U1 cannot be modelled"),
        (np.zeros((10, 3), dtype=np.complex64), "dtype complex64 cannot be modelled"),
        (np.zeros(10, dtype=np.float32), "at least one data dimension"),
        (np.zeros((0, 4), dtype=np.float32), "empty"),
        (np.full((10, 4), np.nan, dtype=np.float32), "NaN"),
    ],
    ids=["strings", "complex", "1-d", "empty", "nan"],
)
def test_data_files_of_the_wrong_dtype_or_shape_are_refused(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(pv.DataError, match=message):
        pv.load_dataset(str(tmp_path / "bad.npy"), binarize="none")
    REPORT["bad inputs refused or cleaned"] += 1


def test_a_pickled_data_file_is_refused(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(pv.DataError, match="without pickle"):
        pv.load_dataset(str(tmp_path / "objects.npy"))
    REPORT["bad inputs refused or cleaned"] += 1


def test_data_of_the_wrong_shape_for_the_model_is_refused(trained_run):
    run = pv.load_run(trained_run)
    with pytest.raises(pv.DataError, match=r"shape \(784,\) but the model expects \(1, 28, 28\)"):
        run.model.check_data(torch.zeros(5, 784))
    REPORT["bad inputs refused or cleaned"] += 1


# ------------------------------------------------------------------------ fuzzing

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
extreme = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_subnormal=False)


def _likelihood(name: str, **kwargs) -> pv.likelihoods.Likelihood:
    likelihood = pv.likelihoods.build_likelihood({"name": name, **kwargs})
    likelihood.setup((3,))
    return likelihood


@FUZZ
@given(logits=st.lists(extreme, min_size=3, max_size=3), bits=st.lists(st.booleans(), min_size=3, max_size=3))
def test_bernoulli_log_prob_is_finite_and_correct_for_any_logits(logits, bits):
    logits, x = torch.tensor([logits]), torch.tensor([bits], dtype=torch.float32)
    log_p = _likelihood("bernoulli")(logits.unsqueeze(1)).log_prob(x)
    reference = pyro.distributions.Bernoulli(logits=logits.double()).log_prob(x.double()).sum(-1)
    assert torch.isfinite(log_p).all() and (log_p <= 0).all()
    torch.testing.assert_close(log_p.double(), reference, rtol=1e-5, atol=1e-5)
    REPORT["fuzzed inputs, finite or refused"] += 1


@FUZZ
@given(logits=st.lists(extreme, min_size=3, max_size=3), x=st.lists(st.sampled_from([0.0, 1.0, 1e-7, 0.5, 1 - 1e-7])))
def test_continuous_bernoulli_is_finite_and_correct_at_the_edges_of_its_support(logits, x):
    x = torch.tensor((x + [0.0, 1.0, 0.5])[:3]).unsqueeze(0)
    logits = torch.tensor([logits])
    log_p = _likelihood("continuous-bernoulli")(logits.unsqueeze(1)).log_prob(x)
    assert torch.isfinite(log_p).all()
    # binary_cross_entropy_with_logits computes x l - softplus(l) as a difference of terms of size |l|:
    # float32 leaves an error of a few ulp of |l| (6e-8 |l| each), however small the result
    reference = continuous_bernoulli_log_density(x, logits).sum(-1)
    tolerance = 1e-6 * reference.abs() + 3e-7 * logits.abs().sum(-1) + 1e-5
    assert ((log_p.double() - reference).abs() <= tolerance).all()
    REPORT["fuzzed inputs, finite or refused"] += 1


@FUZZ
@given(
    name=st.sampled_from(["gaussian", "laplace"]),
    mode=st.sampled_from(["fixed", "shared", "per-dim", "decoder"]),
    raw=extreme,
    loc=extreme,
    x=st.floats(min_value=-1e3, max_value=1e3),
)
def test_location_scale_likelihoods_stay_finite_with_the_scale_at_its_bound(name, mode, raw, loc, x):
    likelihood = _likelihood(name, **({"sigma": mode} if name == "gaussian" else {"scale": mode}))
    with torch.no_grad():
        likelihood.raw_scale.fill_(raw)  # softplus(raw) -> 0 for raw -> -inf: the scale sits at its bound
    params = torch.tensor([[[loc] * 3, [raw] * 3]])[:, : likelihood.params_per_dim]
    log_p = likelihood(params).log_prob(torch.full((1, 3), x))
    scale = likelihood.scale(params)
    assert (scale >= likelihood.min_scale).all() and torch.isfinite(scale).all()
    # even |x - loc| = 1e6 over the bound 1e-3 gives a squared distance of 1e18, far inside float32
    assert torch.isfinite(log_p).all()
    family = {"gaussian": pyro.distributions.Normal, "laplace": pyro.distributions.Laplace}[name]
    reference = family(torch.full((1, 3), loc).double(), scale.double()).log_prob(torch.full((1, 3), x).double())
    # float32 rounding of loc, x, their difference and its square: a few parts in 1e7 of the result
    torch.testing.assert_close(log_p.double(), reference.sum(-1), rtol=1e-5, atol=1e-4)
    REPORT["fuzzed inputs, finite or refused"] += 1


class ExtremeDecoder(torch.nn.Module):
    """A decoder with fixed, huge logits: the evaluator must still give finite answers."""

    def __init__(self, magnitude: float):
        super().__init__()
        self.magnitude = magnitude

    def forward(self, z):
        return (self.magnitude * torch.tanh(z.sum(-1, keepdim=True))).expand(*z.shape[:-1], 3).unsqueeze(-2)


@FUZZ
@given(
    magnitude=st.floats(min_value=0.0, max_value=1e4),
    num_samples=st.sampled_from([1, 2, 7, 64]),
    batch=st.integers(min_value=1, max_value=5),
    max_samples_per_pass=st.sampled_from([1, 3, 4096]),
)
def test_the_evaluator_is_finite_for_any_k_batch_and_chunking(magnitude, num_samples, batch, max_samples_per_pass):
    encoder = pv.nets.MLPEncoder((3,), 2, hidden=(4,))
    vae = pv.VAE((3,), 2, encoder=encoder, decoder=ExtremeDecoder(magnitude))
    x = torch.tensor([[0.0, 1.0, 1.0]] * batch)
    estimate = pv.log_marginal_likelihood(
        vae.model, vae.guide, x, num_samples=num_samples, max_samples_per_pass=max_samples_per_pass
    )
    assert estimate.log_px.shape == (batch,) and torch.isfinite(estimate.log_px).all()
    assert (estimate.ess >= 1 - 1e-4).all() and (estimate.ess <= num_samples + 1e-3).all()
    REPORT["fuzzed inputs, finite or refused"] += 1


def test_a_huge_k_is_chunked_and_agrees_with_one_pass():
    """K = 200,000 in passes of 4,096: bounded memory, and the same answer as fewer, larger passes."""
    torch.manual_seed(0)
    vae = pv.VAE((6,), 2, likelihood=pv.likelihoods.Gaussian(init_sigma=1.0), hidden=(8,))
    x = torch.randn(2, 6)
    chunked = pv.log_marginal_likelihood(vae.model, vae.guide, x, num_samples=200_000, max_samples_per_pass=4096)
    one_pass = pv.log_marginal_likelihood(vae.model, vae.guide, x, num_samples=200_000, max_samples_per_pass=400_000)
    # different chunkings draw different particles, so the two agree to Monte Carlo error: per point the
    # estimate's sd is about sqrt(r / K), r = K / ESS - 1 (delta method), and their difference's 5 * sqrt(2)
    # of it; whether every particle is counted is checked exactly in tests/test_marginal.py
    sd = ((200_000 / one_pass.ess - 1) / 200_000).sqrt()
    assert ((chunked.log_px - one_pass.log_px).abs() < 5 * math.sqrt(2) * sd).all()
    REPORT["fuzzed inputs, finite or refused"] += 1


@pytest.mark.parametrize("k", [1, 2])
def test_k_of_one_or_two_and_a_batch_of_one(k):
    vae = pv.VAE((3,), 2, hidden=(4,))
    estimate = pv.log_marginal_likelihood(vae.model, vae.guide, torch.ones(1, 3), num_samples=k)
    assert torch.isfinite(estimate.log_px).all() and estimate.log_px.shape == (1,)
    assert np.isfinite(estimate.summary()["log_px"])
    if k == 1:  # one log weight: the estimate is the ELBO's one-sample term itself
        assert torch.equal(estimate.log_px, estimate.elbo)
    else:  # log mean exp of two weights exceeds their mean by log cosh of half their difference, >= 0
        assert (estimate.log_px >= estimate.elbo).all()
        assert (estimate.ess >= 1 - 1e-6).all() and (estimate.ess <= 2 + 1e-6).all()  # float32 rounding
    REPORT["fuzzed inputs, finite or refused"] += 1


@pytest.mark.parametrize("bad", [0, -5])
def test_a_non_positive_k_is_refused(bad):
    vae = pv.VAE((3,), 2, hidden=(4,))
    with pytest.raises(ValueError, match="num_samples"):
        pv.log_marginal_likelihood(vae.model, vae.guide, torch.ones(1, 3), num_samples=bad)
    REPORT["bad inputs refused or cleaned"] += 1
