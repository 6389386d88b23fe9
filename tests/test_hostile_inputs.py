"""Nothing trusted blindly: hostile run and data files, and fuzzed numbers, are refused or stay finite.

Every bad input here is counted in the test's ``robustness_report``; the terminal summary adds them up (on the
controller too, when pytest-xdist runs the tests), beside the kills and interrupts of ``tests/test_kills.py``
and ``tests/test_interrupts.py``.
"""

import json
import math
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from conftest import continuous_bernoulli_log_density, delta_method_sd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyro_vae as pv
from pyro_vae.evaluate import evaluate_command
from pyro_vae.infer import build_objective, importance
from pyro_vae.runs.files import load_checkpoint

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


def _flip_a_bit_of_a_weight(run: Path) -> None:
    """One bit of the first tensor's bytes flipped, as a failing disk or copy would: the archive still opens."""
    with zipfile.ZipFile(run / "checkpoint.pt") as archive:
        member = archive.getinfo("archive/data/0")
    content = bytearray((run / "checkpoint.pt").read_bytes())
    name_length, extra_length = struct.unpack("<HH", content[member.header_offset + 26 : member.header_offset + 30])
    content[member.header_offset + 30 + name_length + extra_length] ^= 1
    (run / "checkpoint.pt").write_bytes(bytes(content))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda run: (run / "checkpoint.pt").write_bytes(b""), "truncated or corrupt"),
        (lambda run: (run / "checkpoint.pt").write_bytes(b"PK\x03\x04 garbage"), "truncated or corrupt"),
        (lambda run: (run / "checkpoint.pt").write_bytes(bytes(range(256)) * 4), "not PyTorch's zip archive"),
        (lambda run: _rewrite_checkpoint(run, version=99), "format version 99"),
        (lambda run: _rewrite_checkpoint(run, format="something-else"), "not a pyro-vae checkpoint"),
        (lambda run: torch.save([1, 2, 3], run / "checkpoint.pt"), "not a pyro-vae checkpoint"),
        (lambda run: (run / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda run: (run / "config.json").write_text("[1, 2]"), "holds a JSON list, not the object pyro-vae writes"),
        (lambda run: (run / "checkpoint.pt").unlink(), r"checkpoint.pt is missing; .*best.pt is a whole checkpoint"),
        (_flip_a_bit_of_a_weight, "is corrupt: archive/data/0 does not match its checksum"),
        (lambda run: (run / "config.json").write_text("{}"), "no valid 'model', 'data', 'train' section"),
        (
            lambda run: (run / "config.json").write_text(
                json.dumps({**json.loads((run / "config.json").read_text()), "train": None})
            ),
            "no valid 'train' section.*Restore the run's own config.json",
        ),
        (
            lambda run: (run / "config.json").write_text(
                json.dumps({**json.loads((run / "config.json").read_text()), "model": {"z_dim": 7}})
            ),
            "describes a different model",
        ),
    ],
    ids=[
        "empty",
        "bad-zip",
        "garbage",
        "other-version",
        "other-format",
        "not-a-dict",
        "bad-json",
        "json-list",
        "missing",
        "flipped-bit",
        "config-empty",
        "config-no-train",
        "config-mismatch",
    ],
)
def test_broken_run_files_are_refused_with_the_fix(trained_run, damage, message, robustness_report):
    damage(trained_run)
    with pytest.raises(pv.CheckpointError, match=message):
        pv.load_run(trained_run, checkpoint="last")
    robustness_report["bad inputs refused or cleaned"] += 1


@pytest.mark.parametrize(
    "name, read, fix",
    [
        ("metrics.json", lambda run: run.read_metrics(), "restore it or start a new run"),
        ("test_log_px.npy", lambda run: run.read_log_px(), "delete it and run `pyro-vae evaluate"),
        ("evaluations/is-k10.npz", lambda run: run.read_evaluation("is-k10"), "delete it and run pyro-vae evaluate"),
    ],
)
def test_a_damaged_result_file_is_refused_naming_it_and_the_fix(trained_run, name, read, fix, robustness_report):
    """A results file that is another JSON value, or bytes that are no NumPy file, is refused with its path."""
    (trained_run / name).parent.mkdir(exist_ok=True)
    (trained_run / name).write_bytes(b"[1]" if name.endswith(".json") else bytes(range(256)))
    with pytest.raises(pv.CheckpointError, match=f"{name}.*{fix}") as refusal:
        read(pv.RunDirectory(trained_run))
    assert "pickle" not in str(refusal.value)
    robustness_report["bad inputs refused or cleaned"] += 1


def test_a_run_that_lost_its_last_checkpoint_goes_on_from_best_pt_as_its_message_says(trained_run):
    (trained_run / "checkpoint.pt").unlink()
    with pytest.raises(pv.CheckpointError, match=r"copy it to checkpoint.pt to go on from that epoch") as refusal:
        pv.resume_run(trained_run, epochs=2, progress=False)
    assert "drop --resume" not in str(refusal.value)  # a new run there is refused: it holds a run
    shutil.copy(trained_run / "best.pt", trained_run / "checkpoint.pt")
    assert pv.resume_run(trained_run, epochs=2, progress=False).epoch == 2


def test_a_config_whose_model_lacks_a_key_is_refused_before_resuming(trained_run):
    config = json.loads((trained_run / "config.json").read_text())
    del config["model"]["x_shape"]
    (trained_run / "config.json").write_text(json.dumps(config))
    with pytest.raises(pv.CheckpointError, match="describes its model without 'x_shape'.*restore the run's own"):
        pv.resume_run(trained_run, epochs=2, progress=False)


def test_a_run_without_the_best_pt_it_wrote_is_refused_not_read_from_its_last_checkpoint(trained_run):
    """Only runs older than best.pt (their checkpoints record no best epoch) take the last checkpoint as the best."""
    (trained_run / "best.pt").unlink()
    _rewrite_checkpoint(trained_run, best_epoch=0)  # the best epoch is not the last: its weights are gone
    before = (trained_run / "checkpoint.pt").read_bytes()
    for use in (lambda: pv.load_run(trained_run), lambda: pv.resume_run(trained_run, epochs=2, progress=False)):
        with pytest.raises(pv.CheckpointError, match="best.pt is missing, though the run"):
            use()
    assert (trained_run / "checkpoint.pt").read_bytes() == before  # refused before any epoch was trained
    assert pv.load_run(trained_run, checkpoint="last").epoch == 1
    _rewrite_checkpoint(trained_run, best_epoch=None)  # as a run written before best.pt
    assert pv.load_run(trained_run).epoch == 1


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda run: (run / "best.pt").write_bytes(b"PK\x03\x04 garbage"), "best.pt cannot be read"),
        (lambda run: shutil.copy(run / "checkpoint.pt", run / "best.pt"), "best.pt holds epoch 1, not the best"),
    ],
    ids=["corrupt", "another-epoch"],
)
def test_a_best_pt_that_does_not_hold_the_best_epoch_is_refused_before_training(trained_run, damage, message):
    """Found at the end, a best.pt that cannot give the best epoch's weights would cost the whole resume."""
    _rewrite_checkpoint(trained_run, best_epoch=0)
    damage(trained_run)
    before = (trained_run / "checkpoint.pt").read_bytes()
    with pytest.raises(pv.CheckpointError, match=f"{message}.*restore it, or load the last checkpoint"):
        pv.resume_run(trained_run, epochs=3, progress=False)
    assert (trained_run / "checkpoint.pt").read_bytes() == before


def test_a_best_pt_lost_at_the_last_epoch_is_rebuilt_from_the_last_checkpoint(trained_run):
    """At the best epoch the last checkpoint holds the best weights: a missing or broken best.pt is its copy."""
    assert load_checkpoint(trained_run / "checkpoint.pt")["best_epoch"] == 1  # the one epoch improved on the start
    for damage in ((trained_run / "best.pt").unlink, lambda: (trained_run / "best.pt").write_bytes(b"")):
        damage()
        pv.resume_run(trained_run, epochs=1, progress=False)  # trains nothing: ends with the best weights
        assert (trained_run / "best.pt").read_bytes() == (trained_run / "checkpoint.pt").read_bytes()


def test_a_best_pt_ahead_of_the_last_checkpoint_is_named_as_the_later_checkpoint(trained_run, small_mnist):
    """Runs written before the last checkpoint went first could stop between the writes with best.pt ahead."""
    pv.resume_run(trained_run, epochs=2, progress=False)
    best = load_checkpoint(trained_run / "best.pt")
    assert best["epoch"] == 2  # the second epoch improved too
    _rewrite_checkpoint(trained_run, epoch=best["epoch"] - 1, best_epoch=0, position=None)
    with pytest.raises(pv.CheckpointError, match=f"it is the later checkpoint.*resume from epoch {best['epoch']}"):
        pv.resume_run(trained_run, epochs=3, progress=False)


def test_a_pickle_that_runs_code_is_never_executed(trained_run, tmp_path, robustness_report):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"format": "pyro-vae-checkpoint", "version": 1, "payload": Exploit()}, trained_run / "checkpoint.pt")
    with pytest.raises(pv.CheckpointError, match="not trusted") as refusal:
        pv.load_run(trained_run, checkpoint="last")
    assert not marker.exists()
    assert "weights_only" not in str(refusal.value)  # torch's advice to load it unsafely is not passed on
    robustness_report["bad inputs refused or cleaned"] += 1


@pytest.mark.parametrize(
    "array, message",
    [
        (np.array(["a", "b", "c"] * 10).reshape(10, 3), "dtype <U1 cannot be modelled"),
        (np.zeros((10, 3), dtype=np.complex64), "dtype complex64 cannot be modelled"),
        (np.zeros(10, dtype=np.float32), "at least one data dimension"),
        (np.zeros((0, 4), dtype=np.float32), "empty"),
        (np.full((10, 4), np.nan, dtype=np.float32), "holds 40 NaN and 0 infinite values"),
    ],
    ids=["strings", "complex", "1-d", "empty", "nan"],
)
def test_data_files_of_the_wrong_dtype_or_shape_are_refused(tmp_path, array, message, robustness_report):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(pv.DataError, match=message):
        pv.load_dataset(str(tmp_path / "bad.npy"), binarize="none")
    robustness_report["bad inputs refused or cleaned"] += 1


def test_a_pickled_data_file_is_refused(tmp_path, robustness_report):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(pv.DataError, match="without pickle.*numpy.save"):
        pv.load_dataset(str(tmp_path / "objects.npy"))
    robustness_report["bad inputs refused or cleaned"] += 1


@pytest.mark.parametrize("name", ["garbage.npy", "garbage.npz"])
def test_a_data_file_that_is_no_numpy_file_is_refused_naming_what_to_give(tmp_path, name, robustness_report):
    (tmp_path / name).write_bytes(bytes(range(256)))
    with pytest.raises(pv.DataError, match="is not a NumPy .npy or .npz file.*numpy.save") as refusal:
        pv.load_dataset(str(tmp_path / name))
    assert "allow_pickle" not in str(refusal.value)
    robustness_report["bad inputs refused or cleaned"] += 1


def test_a_data_file_changed_in_place_is_refused_on_resume_and_evaluation(tmp_path, robustness_report, capsys):
    """The same file name and counts, other values: the run records each split's digest and refuses them."""
    from pyro_vae import cli

    rng = np.random.default_rng(0)
    data = tmp_path / "vec.npz"
    np.savez(data, x=rng.random((300, 6), dtype=np.float32), x_test=rng.random((50, 6), dtype=np.float32))
    flags = [
        "--dataset",
        str(data),
        "--val-size",
        "50",
        "--binarize",
        "none",
        "--likelihood",
        "gaussian",
        "--hidden",
        "8",
    ]
    flags += ["--z-dim", "2"]
    assert cli.main(["train", *flags, "--epochs", "1", "--eval-samples", "0", "--no-progress", "--out",
                     str(tmp_path), "--name", "r"]) == 0  # fmt: skip
    run = tmp_path / "r"
    checkpoint, metrics = (run / "checkpoint.pt").read_bytes(), (run / "metrics.json").read_bytes()
    for changed in ("x", "x_test"):
        arrays = dict(np.load(data))
        np.savez(data, **{**arrays, changed: arrays[changed] * 5})
        capsys.readouterr()
        assert cli.main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 2
        err = capsys.readouterr().err
        split = "train points, val points" if changed == "x" else "test points"
        assert f"was trained on other values of the same data: its {split} differ from those it recorded" in err
        assert cli.main(["evaluate", str(run), "--samples", "5", "--no-progress"]) == (2 if changed == "x_test" else 0)
        if changed == "x_test":
            assert "was trained with other test points than these" in capsys.readouterr().err
        np.savez(data, **arrays)
        (run / "metrics.json").write_bytes(metrics)  # the evaluation of the unchanged test points aside
    assert (run / "checkpoint.pt").read_bytes() == checkpoint
    # labels a VAE does not read: other ones are no other data for it (M2's are, which its resume refuses)
    np.savez(data, **arrays, y=np.zeros(300, dtype=np.int64), y_test=np.ones(50, dtype=np.int64))
    assert cli.main(["evaluate", str(run), "--samples", "5", "--no-progress"]) == 0
    assert cli.main(["train", "--resume", str(run), "--epochs", "2", "--eval-samples", "0", "--no-progress"]) == 0
    robustness_report["bad inputs refused or cleaned"] += 2


def test_a_moved_data_file_or_one_without_labels_is_refused_naming_the_fix(tmp_path, robustness_report, capsys):
    from pyro_vae import cli

    data = tmp_path / "vec.npz"
    np.savez(data, x=np.random.default_rng(0).random((120, 6), dtype=np.float32))
    flags = ["--dataset", str(data), "--val-size", "20", "--binarize", "none", "--likelihood", "gaussian"]
    flags += ["--hidden", "8", "--z-dim", "2", "--epochs", "1", "--eval-samples", "0", "--no-progress"]
    assert cli.main(["train", *flags, "--semi-supervised", "--labels", "10", "--out", str(tmp_path)]) == 2
    assert "give a labelled data set (mnist, or an .npz with y beside x" in capsys.readouterr().err
    assert cli.main(["train", *flags, "--out", str(tmp_path), "--name", "r"]) == 0
    data.rename(tmp_path / "moved.npz")
    capsys.readouterr()
    for command in (["evaluate", str(tmp_path / "r"), "--samples", "5"], ["train", "--resume", str(tmp_path / "r")]):
        assert cli.main(command) == 2
        err = capsys.readouterr().err
        assert f"was trained on the data file {data}, which is no longer there; put it back at that path" in err
    robustness_report["bad inputs refused or cleaned"] += 3


def test_data_of_the_wrong_shape_for_the_model_is_refused(trained_run, robustness_report):
    run = pv.load_run(trained_run)
    with pytest.raises(pv.DataError, match=r"shape \(784,\) but the model expects \(1, 28, 28\)"):
        run.model.check_data(torch.zeros(5, 784))
    robustness_report["bad inputs refused or cleaned"] += 1


# ------------------------------------------------------------------------ fuzzing

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
extreme = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_subnormal=False)


def _likelihood(name: str, **kwargs) -> pv.likelihoods.Likelihood:
    likelihood = pv.likelihoods.build_likelihood({"name": name, **kwargs})
    likelihood.setup((3,))
    return likelihood


@FUZZ
@given(logits=st.lists(extreme, min_size=3, max_size=3), bits=st.lists(st.booleans(), min_size=3, max_size=3))
def test_bernoulli_log_prob_is_finite_and_correct_for_any_logits(logits, bits, robustness_report):
    logits, x = torch.tensor([logits]), torch.tensor([bits], dtype=torch.float32)
    log_p = _likelihood("bernoulli")(logits.unsqueeze(1)).log_prob(x)
    reference = pyro.distributions.Bernoulli(logits=logits.double()).log_prob(x.double()).sum(-1)
    assert torch.isfinite(log_p).all() and (log_p <= 0).all()
    torch.testing.assert_close(log_p.double(), reference, rtol=1e-5, atol=1e-5)
    robustness_report["fuzzed inputs, finite or refused"] += 1


@FUZZ
@given(logits=st.lists(extreme, min_size=3, max_size=3), x=st.lists(st.sampled_from([0.0, 1.0, 1e-7, 0.5, 1 - 1e-7])))
def test_continuous_bernoulli_is_finite_and_correct_at_the_edges_of_its_support(logits, x, robustness_report):
    x = torch.tensor((x + [0.0, 1.0, 0.5])[:3]).unsqueeze(0)
    logits = torch.tensor([logits])
    log_p = _likelihood("continuous-bernoulli")(logits.unsqueeze(1)).log_prob(x)
    assert torch.isfinite(log_p).all()
    # binary_cross_entropy_with_logits computes x l - softplus(l) as a difference of terms of size |l|:
    # float32 leaves an error of a few ulp of |l| (6e-8 |l| each), however small the result
    reference = continuous_bernoulli_log_density(x, logits).sum(-1)
    tolerance = 1e-6 * reference.abs() + 3e-7 * logits.abs().sum(-1) + 1e-5
    assert ((log_p.double() - reference).abs() <= tolerance).all()
    robustness_report["fuzzed inputs, finite or refused"] += 1


@FUZZ
@given(
    name=st.sampled_from(["gaussian", "laplace"]),
    mode=st.sampled_from(["fixed", "shared", "per-dim", "decoder"]),
    raw=extreme,
    loc=extreme,
    x=st.floats(min_value=-1e3, max_value=1e3),
)
def test_location_scale_likelihoods_stay_finite_with_the_scale_at_its_bound(name, mode, raw, loc, x, robustness_report):
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
    robustness_report["fuzzed inputs, finite or refused"] += 1


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
def test_the_evaluator_is_finite_for_any_k_batch_and_chunking(
    magnitude, num_samples, batch, max_samples_per_pass, robustness_report
):
    encoder = pv.nets.MLPEncoder((3,), 2, hidden=(4,))
    vae = pv.VAE((3,), 2, encoder=encoder, decoder=ExtremeDecoder(magnitude))
    x = torch.tensor([[0.0, 1.0, 1.0]] * batch)
    estimate = pv.log_marginal_likelihood(
        vae.model, vae.guide, x, num_samples=num_samples, max_samples_per_pass=max_samples_per_pass
    )
    assert estimate.log_px.shape == (batch,) and torch.isfinite(estimate.log_px).all()
    assert (estimate.ess >= 1 - 1e-4).all() and (estimate.ess <= num_samples + 1e-3).all()
    robustness_report["fuzzed inputs, finite or refused"] += 1


def test_a_huge_k_is_chunked_and_agrees_with_one_pass(robustness_report, monkeypatch):
    """K = 200,000 in passes of at most 4,096 particle x point evaluations (bounded memory), and the same
    answer as fewer, larger passes."""
    torch.manual_seed(0)
    vae = pv.VAE((6,), 2, likelihood=pv.likelihoods.Gaussian(init_sigma=1.0), hidden=(8,))
    x = torch.randn(2, 6)
    passes = []  # the particle x point evaluations of every pass
    one_pass_of = importance.site_log_densities

    def counted(model, guide, xb, *args, num_particles=1, **kwargs):
        passes.append(num_particles * len(xb))
        return one_pass_of(model, guide, xb, *args, num_particles=num_particles, **kwargs)

    monkeypatch.setattr(importance, "site_log_densities", counted)
    chunked = pv.log_marginal_likelihood(vae.model, vae.guide, x, num_samples=200_000, max_samples_per_pass=4096)
    checks, passes = passes[:1], passes[1:]  # one particle a point, the points' checks (draws given back)
    assert checks == [len(x)]
    assert max(passes) <= 4096 and sum(passes) == 200_000 * len(x)  # every particle counted once
    one_pass = pv.log_marginal_likelihood(vae.model, vae.guide, x, num_samples=200_000, max_samples_per_pass=400_000)
    # different chunkings draw different particles, so the two agree to Monte Carlo error: per point the
    # estimate's sd is about sqrt(r / K), r = K / ESS - 1 (delta method), and their difference's 5 * sqrt(2)
    # of it; whether every particle is counted is checked exactly in tests/test_marginal.py
    sd = delta_method_sd(one_pass, 200_000)
    assert ((chunked.log_px - one_pass.log_px).abs() < 5 * math.sqrt(2) * sd).all()
    robustness_report["fuzzed inputs, finite or refused"] += 1


@pytest.mark.parametrize("k", [1, 2])
def test_k_of_one_or_two_and_a_batch_of_one(k, robustness_report):
    vae = pv.VAE((3,), 2, hidden=(4,))
    estimate = pv.log_marginal_likelihood(vae.model, vae.guide, torch.ones(1, 3), num_samples=k)
    assert torch.isfinite(estimate.log_px).all() and estimate.log_px.shape == (1,)
    assert np.isfinite(estimate.summary()["log_px"])
    if k == 1:  # one log weight: the estimate is the ELBO's one-sample term itself
        assert torch.equal(estimate.log_px, estimate.elbo)
    else:  # log mean exp of two weights exceeds their mean by log cosh of half their difference, >= 0
        assert (estimate.log_px >= estimate.elbo).all()
        assert (estimate.ess >= 1 - 1e-6).all() and (estimate.ess <= 2 + 1e-6).all()  # float32 rounding
    robustness_report["fuzzed inputs, finite or refused"] += 1


@pytest.mark.parametrize("bad", [0, -5])
def test_a_non_positive_k_is_refused(bad, robustness_report):
    vae = pv.VAE((3,), 2, hidden=(4,))
    with pytest.raises(ValueError, match=f"num_samples must be a whole number >= 1; got {bad}"):
        pv.log_marginal_likelihood(vae.model, vae.guide, torch.ones(1, 3), num_samples=bad)
    robustness_report["bad inputs refused or cleaned"] += 1


@pytest.mark.parametrize(
    "settings, x, message",
    [({"num_particles": 0}, torch.ones(2, 3), "num_particles (and batch_size )?must be (a )?whole numbers? >= 1"),
     ({"num_particles": 2.5}, torch.ones(2, 3), "num_particles (and batch_size )?must be (a )?whole numbers? >= 1"),
     ({"batch_size": 0}, torch.ones(2, 3), "batch_size must be a whole number >= 1"),
     ({"batch_size": True}, torch.ones(2, 3), "batch_size must be a whole number >= 1"),
     ({}, torch.ones(0, 3), "x is empty")],
    ids=["no-particles", "half-a-particle", "no-batch", "a-bool-batch", "no-points"],
)  # fmt: skip
def test_the_elbo_estimates_refuse_what_they_cannot_average(settings, x, message, robustness_report):
    vae = pv.VAE((3,), 2, hidden=(4,))
    with pytest.raises(ValueError, match=message):
        pv.evaluate_elbo(vae, x, **settings)
    with pytest.raises(ValueError, match=message.replace("particles", "samples")):  # its K, num_samples
        pv.log_marginal_likelihood(
            vae.model, vae.guide, x, **{name.replace("particles", "samples"): value for name, value in settings.items()}
        )
    if "num_particles" in settings:
        with pytest.raises(ValueError, match=message):
            pv.site_log_densities(vae.model, vae.guide, x, **settings)
    if not settings:  # AIS checks its chains and batches with its other settings
        with pytest.raises(ValueError, match=message):
            pv.ais_log_marginal_likelihood(vae.model, vae.guide, x)
    robustness_report["bad inputs refused or cleaned"] += 1


@pytest.mark.parametrize("bad", [0, 1000.0, True])
def test_a_pass_size_that_is_not_whole_is_refused(bad, robustness_report):
    vae = pv.VAE((3,), 2, hidden=(4,))
    with pytest.raises(ValueError, match="max_samples_per_pass must be a whole number >= 1"):
        pv.log_marginal_likelihood(vae.model, vae.guide, torch.ones(1, 3), num_samples=5, max_samples_per_pass=bad)
    robustness_report["bad inputs refused or cleaned"] += 1


@pytest.mark.parametrize("particles", [0, 2.5, True, "3", None])
@pytest.mark.parametrize("objective", ["trace", "meanfield", "iwae"])
def test_a_training_objective_refuses_a_particle_count_that_is_not_whole(objective, particles, robustness_report):
    """Truncated, 2.5 particles trained with K = 2 and recorded 2 in the config."""
    with pytest.raises(ValueError, match="num_particles must be a whole number >= 1"):
        build_objective({"name": objective, "num_particles": particles})
    robustness_report["bad inputs refused or cleaned"] += 1


@pytest.mark.parametrize("z_dim", [0, -3, 2.5, True])
@pytest.mark.parametrize("model", [pv.VAE, pv.SSVAE])
def test_a_model_without_a_latent_code_is_refused(model, z_dim, robustness_report):
    with pytest.raises(ValueError, match="z_dim must be a whole number >= 1"):
        model((1, 28, 28), z_dim)
    robustness_report["bad inputs refused or cleaned"] += 1


def test_numpy_integers_are_taken_and_written_as_python_s(small_mnist, tmp_path, robustness_report):
    """Whole numbers of NumPy pass the checks; kept as they were, they failed to be written as JSON (the config
    at a run's start, an evaluation's summary after its work)."""
    import numpy as np

    data = small_mnist.subset(train=np.int64(200), test=np.int64(20))
    prior = pv.priors.MixtureOfGaussians(np.int64(3))
    pv.fit(pv.VAE((1, 28, 28), 2, prior=prior, hidden=(16,)), data, epochs=1, run_dir=tmp_path / "r", progress=False)
    summary = pv.evaluate_run(
        tmp_path / "r", num_samples=np.int64(5), seed=np.int64(1), batch_size=np.int64(8), progress=False
    )
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["log_px_seed"] == 1 and metrics["test_num_samples"] == 5 and summary["evaluation"] == "is-K5"
    assert metrics["log_px_batch_size"] == 8 and "test_batch_size" not in metrics
    assert evaluate_command(tmp_path / "r") == f"pyro-vae evaluate {tmp_path / 'r'} --samples 5 --seed 1 --batch-size 8"
    assert json.loads((tmp_path / "r" / "config.json").read_text())["data"]["subset"]["train"] == 200
    robustness_report["bad inputs refused or cleaned"] += 1
