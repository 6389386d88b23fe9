"""pyro-vae evaluate and compare on small trained runs."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_vae

import pyro_vae as pv
from pyro_vae.cli import main
from pyro_vae.evaluate import comparison_markdown, current_evaluation, evaluate_command
from pyro_vae.infer.ais import DEFAULT_STEPS
from pyro_vae.infer.importance import pareto_threshold


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, mnist):
    """Two small runs on the same 200 test points: z_dim 8 and z_dim 2."""
    root = tmp_path_factory.mktemp("runs")
    data = mnist.subset(train=1000, val=200, test=200)
    for name, z_dim in (("wide", 8), ("narrow", 2)):
        torch.manual_seed(0)
        pv.fit(small_vae(z_dim=z_dim), data, epochs=2, run_dir=root / name, progress=False)
    return root / "wide", root / "narrow"


def test_evaluate_writes_metrics_and_per_point_values(two_runs, capsys):
    wide, _ = two_runs
    assert main(["evaluate", str(wide), "--samples", "200", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "test log p(x)" in out and "active units" in out and "Pareto k" in out
    metrics = json.loads((wide / "metrics.json").read_text())
    log_px = np.load(wide / "test_log_px.npy")
    assert log_px.shape == (200,) and metrics["test_log_px"] == pytest.approx(log_px.mean())
    run = pv.load_run(wide)  # the per-point values are the estimator's own, in the test set's order
    direct = pv.log_marginal_likelihood(
        run.model.model, run.model.guide, run.load_data().test.x, num_samples=200, seed=metrics["log_px_seed"]
    )
    # the same draws through the same estimator, chunked otherwise: float32 logsumexps of values about 100
    assert np.allclose(log_px, direct.log_px.numpy(), atol=1e-4)
    assert metrics["test_elbo"] == pytest.approx(float(direct.elbo.mean()), abs=1e-4)
    assert metrics["active_units"] == pv.active_units(run.model, run.load_data().test.x)  # on the points evaluated
    assert metrics["test_num_samples"] == 200
    # abs 1e-3: three float32 means of values about 100, each rounded to about 1e-5 relative
    assert metrics["test_elbo"] == pytest.approx(metrics["test_reconstruction"] - metrics["test_kl"], abs=1e-3)


def test_active_units_counts_dimensions_the_encoder_uses(small_mnist):
    vae = small_vae(z_dim=4)
    with torch.no_grad():  # dimensions 0 and 2 follow x strongly; 1 and 3 ignore it (constant posterior means)
        head = vae.encoder.net[-1]
        head.weight[[0, 2]] *= 20.0
        head.weight[[1, 3]] = 0.0
    assert pv.active_units(vae, small_mnist.test.x) == 2


def test_compare_gives_paired_differences(two_runs, tmp_path, capsys):
    wide, narrow = two_runs
    for run in two_runs:
        assert main(["evaluate", str(run), "--samples", "100", "--no-progress"]) == 0
    assert main(["compare", str(wide), str(narrow), "--out", str(tmp_path / "table")]) == 0
    rows = pv.compare_runs([wide, narrow])
    best, other = rows
    assert best["diff_to_best"] == 0 and best["log_px"] >= other["log_px"]
    a, b = np.load(wide / "test_log_px.npy"), np.load(narrow / "test_log_px.npy")
    diff = (b - a) if best["run"] == str(wide) else (a - b)
    assert other["diff_to_best"] == pytest.approx(diff.mean())
    assert other["diff_se"] == pytest.approx(diff.std(ddof=1) / np.sqrt(len(diff)))
    assert "paired difference to best" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "table.csv").read_text().startswith("run,")
    (tmp_path / "tables").mkdir()  # a folder takes the tables in it; a name keeps its dots
    for out, written in (("tables", "tables/comparison"), ("results.v2", "results.v2"), ("new/", "new/comparison")):
        assert main(["compare", str(wide), str(narrow), "--out", f"{tmp_path}/{out}"]) == 0
        assert (tmp_path / f"{written}.md").exists() and (tmp_path / f"{written}.csv").exists(), out
    assert not (tmp_path / "results.md").exists() and not (tmp_path / "tables.md").exists()
    # each row says how its numbers were made: the seed, the batch size and the weights
    for row in rows:
        metrics = json.loads((Path(row["run"]) / "metrics.json").read_text())
        assert (row["seed"], row["batch_size"]) == (0, 100) and row["model_digest"] == metrics["model_digest"]
    assert (tmp_path / "table.csv").read_text().splitlines()[0].endswith(",seed,batch_size,model_digest")


def test_compare_refuses_unevaluated_runs_and_different_test_points(two_runs, tmp_path, mnist, capsys):
    pv.fit(small_vae(), mnist.subset(train=200, val=50, test=50), epochs=1, run_dir=tmp_path / "other", progress=False)
    assert main(["compare", str(two_runs[0]), str(tmp_path / "other")]) == 2
    assert "pyro-vae evaluate" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "other"), "--samples", "10", "--no-progress"]) == 0
    assert main(["evaluate", str(two_runs[0]), "--samples", "10", "--no-progress"]) == 0
    assert main(["compare", str(two_runs[0]), str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "different test points" in err and "mnist test points, binarize dynamic, first 50" in err
    # the importance-sampled estimate rises with K: runs evaluated at different K are not ranked
    assert main(["evaluate", str(two_runs[1]), "--samples", "20", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["compare", *map(str, two_runs)]) == 2
    err = capsys.readouterr().err
    assert "different numbers of importance samples" in err and f"{two_runs[0]}: K = 10" in err


FAST_AIS = ["--steps", "20", "--chains", "4", "--leapfrog", "1"]


def test_ais_auto_and_bdmc_from_the_command_line(two_runs, capsys, tmp_path):
    wide, narrow = two_runs
    for run in (wide, narrow):
        assert main(["evaluate", str(run), "--method", "ais", *FAST_AIS, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "(ais, 200 points)" in out and "evaluations/ais-T20-C4-L1-sigmoid.npz" in out
    ais = np.load(wide / "evaluations" / "ais-T20-C4-L1-sigmoid.npz")["log_px"]
    metrics = json.loads((wide / "metrics.json").read_text())
    assert metrics["evaluations"]["ais-T20-C4-L1-sigmoid"]["log_px"] == pytest.approx(ais.mean())
    # compare pairs runs on the same evaluation of the same points
    assert (
        main(["compare", str(wide), str(narrow), "--evaluation", "ais-T20-C4-L1-sigmoid", "--out", str(tmp_path / "t")])
        == 0
    )
    assert "paired difference to best" in capsys.readouterr().out
    assert main(["compare", str(wide), "--evaluation", "ais-T999-C4-L1-sigmoid"]) == 2
    assert "has no evaluation 'ais-T999-C4-L1-sigmoid' (it has: ais-T20-C4-L1-sigmoid" in capsys.readouterr().err
    # asked again as it was made, a finished AIS is kept (its numbers would come out the same); made otherwise
    # (another batch size draws otherwise), it is replaced, and the output says so
    made = (wide / "evaluations" / "ais-T20-C4-L1-sigmoid.npz").stat().st_mtime_ns
    assert main(["evaluate", str(wide), "--method", "ais", *FAST_AIS, "--no-progress"]) == 0
    assert "holds this evaluation already" in capsys.readouterr().out
    assert (wide / "evaluations" / "ais-T20-C4-L1-sigmoid.npz").stat().st_mtime_ns == made
    assert main(["evaluate", str(wide), "--method", "ais", *FAST_AIS, "--batch-size", "50", "--no-progress"]) == 0
    assert "now replaces the evaluation of that name made with seed 0, batch size 100" in capsys.readouterr().out

    assert main(["evaluate", str(wide), "--method", "auto", "--samples", "50", *FAST_AIS, "--no-progress"]) == 0
    auto = np.load(wide / "evaluations" / "auto-K50-T20-C4-L1-sigmoid.npz")
    escalated = auto["escalated"]
    threshold = pareto_threshold(50)  # 0.41: K = 50 weights cannot bear heavier tails
    assert 0 < escalated.sum() == (auto["pareto_k"] > threshold).sum() <= 200  # K = 50 leaves many unreliable
    assert f"AIS on {escalated.sum()} points whose Pareto k > {threshold:.2f}" in capsys.readouterr().out
    # the file holds what its summary is made of: the importance pass, and the AIS diagnostics of the escalated
    assert (int(auto["seed"]), int(auto["batch_size"])) == (0, 100)  # the file says what remakes it
    summary = json.loads((wide / "metrics.json").read_text())["evaluations"]["auto-K50-T20-C4-L1-sigmoid"]
    assert summary["is_log_px"] == pytest.approx(auto["is_log_px"].mean())
    np.testing.assert_array_equal(auto["log_px"][~escalated], auto["is_log_px"][~escalated])
    assert summary["escalated_acceptance_mean"] == pytest.approx(auto["escalated_acceptance"].mean())
    assert auto["escalated_chain_std"].shape == auto["escalated_step_size"].shape[:1] == (escalated.sum(),)
    # K = 20 weights have no tail to fit (fewer than 10 in it): Pareto k cannot tell, so every point goes to AIS
    assert main(["evaluate", str(wide), "--method", "auto", "--samples", "20", *FAST_AIS, "--no-progress"]) == 0
    auto = np.load(wide / "evaluations" / "auto-K20-T20-C4-L1-sigmoid.npz")
    assert np.isnan(auto["pareto_k"]).all() and auto["escalated"].all()
    assert "AIS on 200 points whose Pareto k not assessable at K = 20" in capsys.readouterr().out

    assert main(["evaluate", str(wide), "--method", "bdmc", "--points", "30", *FAST_AIS, "--no-progress"]) == 0
    assert "BDMC on 30 simulated points" in capsys.readouterr().out
    bounds = np.load(wide / "evaluations" / "bdmc-N30-T20-C4-L1-sigmoid.npz")
    assert bounds["upper"].mean() > bounds["lower"].mean()
    assert main(["compare", str(wide), "--evaluation", "bdmc-N30-T20-C4-L1-sigmoid"]) == 2


def test_an_interrupted_ais_evaluation_continues_to_the_same_result(two_runs, monkeypatch, tmp_path):
    import shutil

    from pyro_vae import evaluate

    wide, _ = two_runs
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    shutil.copytree(wide, reference)
    shutil.copytree(wide, interrupted)
    settings = dict(method="ais", num_steps=10, num_chains=2, leapfrog_steps=1, batch_size=50, progress=False)
    pv.evaluate_run(reference, **settings)

    real, calls = evaluate.ais_log_marginal_likelihood, []

    def interrupted_after_two_batches(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "ais_log_marginal_likelihood", interrupted_after_two_batches)
    with pytest.raises(evaluate.EvaluationInterrupted, match="after 100 of 200 points; they are saved"):
        pv.evaluate_run(interrupted, **settings)
    name = "ais-T10-C2-L1-sigmoid"
    partial = pv.RunDirectory(interrupted).read_evaluation(name, partial=True)
    assert 0 < partial["seconds"] < 600  # the seconds spent so far, saved with the batches
    older = tmp_path / "older"  # a partial evaluation of the AIS before its pilot chains is not continued
    shutil.copytree(interrupted, older)
    before_pilots = {key: value for key, value in partial.items() if key != "pilot_chains"}
    pv.RunDirectory(older).write_evaluation(name, before_pilots, partial=True)
    with pytest.raises(ValueError, match="begun by an earlier pyro-vae, whose AIS chains adapted their own step"):
        pv.evaluate_run(older, **settings)
    pv.RunDirectory(interrupted).write_evaluation(name, {**partial, "seconds": 1000.0}, partial=True)
    monkeypatch.setattr(evaluate, "ais_log_marginal_likelihood", real)
    calls.clear()
    monkeypatch.setattr(evaluate, "ais_log_marginal_likelihood", lambda *a, **k: calls.append(1) or real(*a, **k))
    pv.evaluate_run(interrupted, **settings)
    assert len(calls) == 2  # only the two batches that were not saved
    seconds = pv.RunDirectory(interrupted).read_metrics()["evaluations"][name]["seconds"]
    assert 1000 < seconds < 1600  # the interrupted process's seconds counted once, then this one's
    a = np.load(reference / "evaluations" / f"{name}.npz")["log_px"]
    b = np.load(interrupted / "evaluations" / f"{name}.npz")["log_px"]
    assert np.array_equal(a, b)
    assert not (interrupted / "evaluations" / f"{name}.partial.npz").exists()
    made_by = np.load(interrupted / "evaluations" / f"{name}.npz")["pilot_chains"]  # the estimator recorded
    assert (
        made_by
        == pv.infer.ais.PILOT_CHAINS
        == pv.RunDirectory(interrupted).read_metrics()["evaluations"][name]["ais_pilot_chains"]
    )


def test_a_stop_after_the_finished_file_but_before_its_summary_keeps_every_batch(two_runs, monkeypatch, tmp_path):
    """The batches were deleted with the finished file's writing: a stop before metrics.json took its summary
    left a file that nothing reads, and the same command ran the whole AIS again."""
    import shutil

    from pyro_vae import evaluate

    run = tmp_path / "run"
    shutil.copytree(two_runs[0], run)
    settings = dict(method="ais", num_steps=10, num_chains=2, leapfrog_steps=1, batch_size=50, progress=False)
    real_write, real_ais, calls = pv.RunDirectory.write_metrics, evaluate.ais_log_marginal_likelihood, []

    def stopped(self, metrics):
        raise KeyboardInterrupt

    monkeypatch.setattr(pv.RunDirectory, "write_metrics", stopped)
    with pytest.raises(KeyboardInterrupt):
        pv.evaluate_run(run, **settings)
    name = "ais-T10-C2-L1-sigmoid"
    assert (
        "evaluations" not in pv.RunDirectory(run).read_metrics()
        or name not in pv.RunDirectory(run).read_metrics()["evaluations"]
    )
    monkeypatch.setattr(pv.RunDirectory, "write_metrics", real_write)
    monkeypatch.setattr(evaluate, "ais_log_marginal_likelihood", lambda *a, **k: calls.append(1) or real_ais(*a, **k))
    pv.evaluate_run(run, **settings)
    assert calls == []  # every batch was kept: none estimated again
    assert name in pv.RunDirectory(run).read_metrics()["evaluations"]
    assert not (run / "evaluations" / f"{name}.partial.npz").exists()


def test_a_subset_of_test_points_is_named_and_paired_only_with_itself(two_runs, capsys, tmp_path):
    wide, narrow = two_runs
    for run in (wide, narrow):
        assert main(["evaluate", str(run), "--samples", "50", "--test-points", "40", "--no-progress"]) == 0
    assert "40 points" in capsys.readouterr().out
    assert len(np.load(wide / "evaluations" / "is-K50-first40.npz")["log_px"]) == 40
    assert (
        main(["compare", str(wide), str(narrow), "--evaluation", "is-K50-first40", "--out", str(tmp_path / "t")]) == 0
    )
    rows = pv.compare_runs([wide, narrow], evaluation="is-K50-first40")
    assert {row["evaluation"] for row in rows} == {"is-K50-first40"} and {row["num_points"] for row in rows} == {40}
    assert "| is-K50-first40 |" in comparison_markdown(rows)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--method", "is", "--steps", "10"], "--steps does not apply to --method is"),
        (
            ["--method", "is", "--steps", str(DEFAULT_STEPS)],
            "--steps does not apply to --method is",
        ),  # the default, given
        (["--method", "ais", "--samples", "10"], "--samples does not apply to --method ais"),
        (["--method", "bdmc", "--test-points", "10"], "--test-points does not apply to --method bdmc"),
        (["--method", "auto", "--points", "10"], "--points does not apply to --method auto"),
        (["--method", "is", "--steps", "10", "--chains", "2"], "--chains, --steps do not apply to --method is"),
    ],
)
def test_evaluate_refuses_flags_its_method_ignores(two_runs, flags, message, capsys):
    with pytest.raises(SystemExit) as done:
        main(["evaluate", str(two_runs[0]), *flags])
    assert done.value.code == 2 and message in capsys.readouterr().err


def test_an_evaluation_of_older_weights_is_not_compared(two_runs, tmp_path, capsys):
    import shutil

    wide, _ = two_runs
    run = tmp_path / "run"
    shutil.copytree(wide, run)
    made = ["--samples", "20", "--test-points", "20", "--seed", "3", "--batch-size", "7"]
    assert main(["evaluate", str(run), *made, "--no-progress"]) == 0
    first = current_evaluation(run, "is-K20-first20")["log_px"]
    assert first.shape == (20,)
    assert current_evaluation(run, "is-K30-first20") is None  # never made
    # the command that remakes it has its seed and batch size, which choose its draws: the same numbers again
    again = evaluate_command(run, "is-K20-first20")
    assert again == f"pyro-vae evaluate {run} {' '.join(made)}"
    assert main([*again.split()[1:], "--no-progress"]) == 0
    np.testing.assert_array_equal(current_evaluation(run, "is-K20-first20")["log_px"], first)
    assert main(["train", "--resume", str(run), "--epochs", "3", "--eval-samples", "0", "--no-progress"]) == 0
    assert current_evaluation(run, "is-K20-first20") is None  # kept, but of the weights before
    capsys.readouterr()
    assert main(["compare", str(run), "--evaluation", "is-K20-first20"]) == 2
    err = capsys.readouterr().err
    assert "made of other weights than its best checkpoint now" in err
    assert f"make it again: pyro-vae evaluate {run} {' '.join(made)}" in err  # the command that does
    metrics = pv.RunDirectory(run).read_metrics()  # its summary is set apart, not read as the run's
    assert "is-K20-first20" in metrics["earlier_evaluations"] and "is-K20-first20" not in metrics.get("evaluations", {})
    assert main(["evaluate", str(run), *made, "--no-progress"]) == 0
    metrics = pv.RunDirectory(run).read_metrics()
    assert "is-K20-first20" in metrics["evaluations"] and "is-K20-first20" not in metrics.get("earlier_evaluations", {})
    assert main(["compare", str(run), "--evaluation", "is-K20-first20", "--out", str(tmp_path / "table")]) == 0


def test_training_on_keeps_the_evaluations_and_compare_refuses_an_older_log_px(two_runs, tmp_path, capsys):
    import shutil

    wide, _ = two_runs
    run = tmp_path / "run"
    shutil.copytree(wide, run)
    assert main(["evaluate", str(run), "--samples", "20", "--no-progress"]) == 0
    assert main(["evaluate", str(run), "--samples", "20", "--test-points", "20", "--no-progress"]) == 0
    evaluated = json.loads((run / "metrics.json").read_text())
    # nothing to train (two epochs done): the weights are the same, so evaluate's numbers all stay
    assert main(["train", "--resume", str(run), "--epochs", "2", "--eval-samples", "5", "--no-progress"]) == 0
    kept = json.loads((run / "metrics.json").read_text())
    for key in ("evaluations", "test_log_px", "test_num_samples", "active_units", "log_px_model_digest"):
        assert kept[key] == evaluated[key], key
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "1", "--no-progress"]) == 2  # below what it trained
    assert "has trained 2 epochs; resume it to at least 2 epochs in all, not 1" in capsys.readouterr().err
    assert json.loads((run / "metrics.json").read_text()) == kept  # refused before anything was written
    # trained on without a test log p(x): the named evaluations' summaries are set apart (their files record
    # their weights), and test_log_px.npy is of the older weights, which compare refuses
    assert main(["train", "--resume", str(run), "--epochs", "3", "--eval-samples", "0", "--no-progress"]) == 0
    after = json.loads((run / "metrics.json").read_text())
    assert after["earlier_evaluations"] == evaluated["evaluations"] and "evaluations" not in after
    assert "test_log_px" not in after and after["model_digest"] != after["log_px_model_digest"]
    capsys.readouterr()
    assert main(["compare", str(run)]) == 2
    assert "'test_log_px.npy' of" in capsys.readouterr().err
    # trained on with one: its per-point values go to test_log_px.npy with the headline, of the new weights
    assert main(["train", "--resume", str(run), "--epochs", "4", "--eval-samples", "5", "--no-progress"]) == 0
    last = json.loads((run / "metrics.json").read_text())
    assert last["test_num_samples"] == 5 and last["log_px_model_digest"] == last["model_digest"]
    assert np.load(run / "test_log_px.npy").mean() == pytest.approx(last["test_log_px"], rel=1e-6)
    assert main(["compare", str(run), "--out", str(tmp_path / "comparison")]) == 0  # not where the tests run


def test_metrics_of_older_weights_than_the_best_checkpoint_are_refused_and_a_record_says_its_weights(
    two_runs, tmp_path, monkeypatch, capsys
):
    """Resumed and stopped after improving, before its metrics were written, a run's best.pt holds newer
    weights than its metrics.json describes: evaluate and compare refuse it rather than put the two side by side.
    A kept record (no weights) says which weights it is of, so that compare refuses its older files."""
    import shutil

    from pyro_vae.training.engine import _Engine

    wide, narrow = two_runs
    run = tmp_path / "run"
    shutil.copytree(wide, run)
    assert main(["evaluate", str(run), "--samples", "20", "--no-progress"]) == 0
    record = pv.RunDirectory(run).keep_record(tmp_path / "record-before")
    comparison = str(record.path.parent / "comparison")  # not into the folder the tests run from
    assert main(["compare", str(record.path), "--out", comparison]) == 0  # its test_log_px.npy is of its weights

    def stopped(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(_Engine, "_finish", stopped)  # stopped after the epochs, before the metrics
        assert main(["train", "--resume", str(run), "--epochs", "5", "--no-progress"]) == 130
    metrics = json.loads((run / "metrics.json").read_text())
    assert pv.RunDirectory(run).load_checkpoint("best")["epoch"] > metrics["best_epoch"] == 2  # it improved
    capsys.readouterr()
    assert main(["evaluate", str(run), "--samples", "20", "--no-progress"]) == 2
    assert main(["compare", str(run), str(narrow)]) == 2
    err = capsys.readouterr().err
    assert err.count("describes the best weights of epoch 2, but its best checkpoint now holds those of epoch") == 2
    assert f"Finish it first (pyro-vae train --resume {run})" in err
    assert json.loads((run / "metrics.json").read_text()) == metrics  # nothing written

    # finished: the metrics are the new weights', and test_log_px.npy (evaluate's, of the older) is refused
    assert main(["train", "--resume", str(run), "--epochs", "5", "--eval-samples", "0", "--no-progress"]) == 0
    record = pv.RunDirectory(run).keep_record(tmp_path / "record-after")
    capsys.readouterr()
    for kept in (run, record.path):  # the record, without weights, by the digest its metrics.json records
        assert main(["compare", str(kept)]) == 2
        assert "'test_log_px.npy' of" in capsys.readouterr().err


def test_an_evaluation_at_another_k_keeps_the_headline_of_training_apart(two_runs, tmp_path):
    """Training's test log p(x) (eval_samples) has no evaluation file of its own: an evaluation of every test
    point at another K, which takes over the headline and test_log_px.npy, keeps it as is-K<K>; a resume with
    another eval_samples makes the headline at its K."""
    wide, _ = two_runs
    run = tmp_path / "run"
    shutil.copytree(wide, run)
    assert main(["train", "--resume", str(run), "--epochs", "3", "--eval-samples", "30", "--no-progress"]) == 0
    trained = json.loads((run / "metrics.json").read_text())
    per_point = np.load(run / "test_log_px.npy")
    assert main(["evaluate", str(run), "--samples", "5", "--no-progress"]) == 0
    after = json.loads((run / "metrics.json").read_text())
    assert after["test_num_samples"] == 5 and set(after["evaluations"]) == {"is-K5", "is-K30"}
    kept = after["evaluations"]["is-K30"]
    assert kept["log_px"] == trained["test_log_px"] and kept["num_samples"] == 30 and kept["seed"] == 0
    arrays = pv.RunDirectory(run).read_evaluation("is-K30")
    np.testing.assert_array_equal(arrays["log_px"], per_point)
    assert arrays["model_digest"] == after["model_digest"]
    assert pv.compare_runs([run], evaluation="is-K30")[0]["log_px"] == pytest.approx(trained["test_log_px"])
    # resumed with a larger --eval-samples (nothing left to train): the headline is made at the new K; with a
    # smaller one (as in the test above) it stays
    assert main(["train", "--resume", str(run), "--epochs", "3", "--eval-samples", "40", "--no-progress"]) == 0
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["test_num_samples"] == 40 and set(resumed["evaluations"]) == {"is-K5", "is-K30"}
    assert np.load(run / "test_log_px.npy").mean() == pytest.approx(resumed["test_log_px"], rel=1e-6)


def test_compare_leaves_out_the_elbo_and_active_units_beside_fewer_test_points(two_runs, capsys):
    wide, narrow = two_runs
    for run in (wide, narrow):
        assert main(["evaluate", str(run), "--samples", "20", "--test-points", "50", "--no-progress"]) == 0
    rows = pv.compare_runs([wide, narrow], evaluation="is-K20-first50")
    assert all(math.isnan(row["elbo"]) and row["active_units"] is None and row["num_points"] == 50 for row in rows)
    assert comparison_markdown(rows).splitlines()[2].endswith("| - | - | is-K20-first50 |")


def test_an_interrupted_bdmc_evaluation_continues_to_the_same_bounds(two_runs, monkeypatch, tmp_path):
    import shutil

    from pyro_vae.infer.ais import BDMC

    wide, _ = two_runs
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    shutil.copytree(wide, reference)
    shutil.copytree(wide, interrupted)
    settings = dict(method="bdmc", num_points=60, num_steps=10, num_chains=2, leapfrog_steps=1, batch_size=20)
    pv.evaluate_run(reference, **settings, progress=False)
    model = pv.load_run(reference).model  # the evaluation gives the bounds of pv.bdmc itself
    direct = pv.bdmc(model.model, model.guide, 60, num_steps=10, num_chains=2, leapfrog_steps=1, batch_size=20)
    saved = np.load(reference / "evaluations" / "bdmc-N60-T10-C2-L1-sigmoid.npz")
    assert np.array_equal(direct.lower.numpy(), saved["lower"]) and np.array_equal(direct.upper.numpy(), saved["upper"])

    real, calls = BDMC.bounds, []

    def interrupted_in_the_third_batch(self, index, bar=None):
        calls.append(index)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, index, bar)

    monkeypatch.setattr(BDMC, "bounds", interrupted_in_the_third_batch)
    with pytest.raises(pv.evaluate.EvaluationInterrupted, match="after 40 of 60 simulated points; they are saved"):
        pv.evaluate_run(interrupted, **settings, progress=False)
    calls.clear()
    pv.evaluate_run(interrupted, **settings, progress=False)
    assert calls == [2]  # only the batch that was not saved
    name = "bdmc-N60-T10-C2-L1-sigmoid"
    for key in ("lower", "upper"):
        a = np.load(reference / "evaluations" / f"{name}.npz")[key]
        b = np.load(interrupted / "evaluations" / f"{name}.npz")[key]
        assert np.array_equal(a, b)


def test_a_continued_auto_evaluation_keeps_its_importance_pass_and_batches_and_other_settings_are_refused(
    two_runs, monkeypatch, tmp_path
):
    import shutil

    from pyro_vae import evaluate

    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    shutil.copytree(two_runs[0], reference)
    shutil.copytree(two_runs[0], interrupted)
    settings = dict(method="auto", num_samples=20, num_steps=10, num_chains=2, leapfrog_steps=1, batch_size=25)
    real_ais, real_is = evaluate.ais_log_marginal_likelihood, evaluate.log_marginal_likelihood
    ais_batches = []
    monkeypatch.setattr(
        evaluate, "ais_log_marginal_likelihood", lambda *a, **k: ais_batches.append(1) or real_ais(*a, **k)
    )
    pv.evaluate_run(reference, **settings, progress=False)
    assert len(ais_batches) >= 3  # K = 20 leaves enough points unreliable for several AIS batches
    total, ais_batches[:] = len(ais_batches), []

    def interrupted_in_the_second_batch(*args, **kwargs):
        ais_batches.append(1)
        if len(ais_batches) == 2:
            raise KeyboardInterrupt
        return real_ais(*args, **kwargs)

    monkeypatch.setattr(evaluate, "ais_log_marginal_likelihood", interrupted_in_the_second_batch)
    with pytest.raises(evaluate.EvaluationInterrupted, match="after 25 of"):
        pv.evaluate_run(interrupted, **settings, progress=False)
    with pytest.raises(
        ValueError, match="begun with seed 0 and batch size 25; continue it with --seed 0 --batch-size 25"
    ):
        pv.evaluate_run(interrupted, **{**settings, "batch_size": 50}, progress=False)  # before any work
    importance_passes, ais_batches[:] = [], []
    monkeypatch.setattr(
        evaluate, "log_marginal_likelihood", lambda *a, **k: importance_passes.append(1) or real_is(*a, **k)
    )
    monkeypatch.setattr(
        evaluate, "ais_log_marginal_likelihood", lambda *a, **k: ais_batches.append(1) or real_ais(*a, **k)
    )
    pv.evaluate_run(interrupted, **settings, progress=False)
    assert importance_passes == []  # the K = 20 pass of every point was saved with the partial evaluation
    assert len(ais_batches) == total - 1  # and the AIS batch that finished before the interruption
    name = "auto-K20-T10-C2-L1-sigmoid"
    a, b = (np.load(run / "evaluations" / f"{name}.npz") for run in (reference, interrupted))
    assert np.array_equal(a["log_px"], b["log_px"]) and np.array_equal(a["escalated"], b["escalated"])


def test_compare_pairs_runs_on_tensors_of_ones_own_only_on_the_same_test_points(tmp_path, capsys):
    x = torch.bernoulli(torch.full((300, 1, 28, 28), 0.2))
    runs = {}
    for name, test in (("a", x[:50]), ("b", x[:50]), ("c", x[50:100])):
        data = pv.make_dataset(x[100:], x_test=test, val_size=50)
        pv.fit(small_vae(hidden=(16,)), data, epochs=1, run_dir=tmp_path / name, progress=False)
        with pytest.raises(ValueError, match="tensors of your own; pass them as data="):
            pv.evaluate_run(tmp_path / name, num_samples=5, progress=False)
        with pytest.raises(ValueError, match="with 50 test points; data= has 40"):
            pv.evaluate_run(tmp_path / name, num_samples=5, progress=False, data=data.subset(test=40))
        pv.evaluate_run(tmp_path / name, num_samples=5, progress=False, data=data)
        runs[name] = str(tmp_path / name)
    assert len(pv.compare_runs([runs["a"], runs["b"]])) == 2
    with pytest.raises(ValueError, match="different test points"):
        pv.compare_runs([runs["a"], runs["c"]])  # the same data spec (none) and count, other points


def test_evaluate_run_takes_the_devices_training_takes_and_refuses_others(two_runs, tmp_path):
    wide, _ = two_runs
    run = tmp_path / "copy"
    shutil.copytree(wide, run)  # the module's runs keep their evaluations as the tests above left them
    before = {path.name: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    with pytest.raises(ValueError, match="Unknown device 'tpu'"):
        pv.evaluate_run(run, num_samples=5, device="tpu", progress=False)
    assert {path.name: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before  # nothing written
    summary = pv.evaluate_run(run, num_samples=5, test_points=20, device="auto", progress=False)  # CPU here
    assert np.isfinite(summary["log_px"]) and summary["num_points"] == 20


def test_the_generative_classifier_refuses_a_model_without_a_label(two_runs, mnist):
    with pytest.raises(TypeError, match="needs a model with a label y"):
        pv.classify_generatively(pv.load_run(two_runs[0]).model, mnist.test.x[:4])
