"""Every example script finishes on the embedded data on a tiny budget, and prints what it promises.

Each example runs in its own process on one thread; pytest-xdist runs them side by side with the
rest of the suite.
"""

import argparse
import json
import subprocess

import pytest
from conftest import small_vae
from example_scripts import EXAMPLES, load_example, refusal_of, run_example

import pyro_vae as pv

TINY = {
    "basic_vae.py": (["--epochs", "1", "--subset", "500"], "validation ELBO after 1 epochs"),
    "custom_likelihood.py": (["--epochs", "1", "--subset", "500", "--samples", "10"], "learned Student-t: nu ="),
    "compare_priors.py": (
        ["--epochs", "1", "--subset", "500", "--samples", "10", "--components", "5", "--out", "study"],
        "samples from each prior",
    ),
    "semi_supervised.py": (["--epochs", "1", "--subset", "2000", "--samples", "10"], "model argmax log p(x, y)"),
    "semi_supervised_study.py": (
        ["--epochs", "1", "--subset", "2000", "--labels", "100", "--label-seeds", "0", "1", "--classifier-steps", "50"]
        + ["--samples", "5", "--jobs", "2", "--out", "study"],
        "best epoch | training minutes per run (on the threads each had: --jobs runs one each) |",
    ),
    "iwae_study.py": (
        [
            "--epochs",
            "1",
            "--subset",
            "300",
            "--samples",
            "10",
            "--ais-points",
            "2",
            "--runs",
            "1-layer-iwae-k5",
            "1-layer-iwae-k50",
        ]
        + ["--out", "study", "--keep", "kept"],
        "| NLL by IS (K = 10), the same points |",
    ),
    "gradient_snr.py": (["--train-epochs", "1", "--subset", "200", "--repeats", "10", "--out", "snr.png"], "| dreg |"),
    "hand_written_model.py": (["--steps", "50", "--subset", "500", "--test", "50"], "exact test log p(x)"),
}


def test_every_example_is_tested():
    assert sorted(path.name for path in EXAMPLES.glob("*.py")) == sorted(TINY)


@pytest.mark.parametrize("script", sorted(TINY))
def test_example_runs(script, tmp_path):
    result = run_example(script, TINY[script][0], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert TINY[script][1] in result.stdout


def test_the_iwae_study_takes_a_kept_run_that_its_out_folder_no_longer_holds(tmp_path):
    """A run trained into one folder (a wiped machine's) still enters the table through its kept record."""
    tiny = ["--epochs", "1", "--subset", "300", "--samples", "10", "--keep", "kept", "--lr-schedule", "iwae"]

    def study(run: str, out: str) -> subprocess.CompletedProcess:
        return run_example("iwae_study.py", [*tiny, "--runs", run, "--out", out], tmp_path)

    first = study("1-layer-iwae-k50", "machine-1")
    assert first.returncode == 0, first.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "kept" / "1-layer-iwae-k50").iterdir()) == [
        "config.json", "evaluations", "history.csv", "metrics.json", "test_log_px.npy"
    ]  # fmt: skip
    second = study("1-layer-iwae-k5", "machine-2")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "| IWAE k = 50 |" in second.stdout and "| k = 50 beats k = 5 |" in second.stdout
    assert "--lr-schedule iwae" in second.stdout  # the table's command
    assert pv.RunDirectory(tmp_path / "machine-2" / "1-layer-iwae-k5").read_config()["train"]["lr_schedule"] == "iwae"
    assert not (tmp_path / "machine-2" / "1-layer-iwae-k50").exists()
    # a run whose record is complete is not trained again when asked for: the command rebuilds the table
    again = study("1-layer-iwae-k50", "machine-4")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "1-layer-iwae-k50: kept in kept/1-layer-iwae-k50" in again.stdout and "| IWAE k = 50 |" in again.stdout
    assert not (tmp_path / "machine-4" / "1-layer-iwae-k50").exists()
    assert "--runs 1-layer-iwae-k5 1-layer-iwae-k50" in again.stdout  # the table's command names its runs
    # a record trained past --epochs is refused, not trained again from the start and kept over
    metrics_file = tmp_path / "kept" / "1-layer-iwae-k50" / pv.RunDirectory.METRICS
    metrics = json.loads(metrics_file.read_text())
    metrics_file.write_text(json.dumps({**metrics, "epochs": 5}))
    past = refusal_of("iwae_study.py", [*tiny, "--runs", "1-layer-iwae-k50", "--out", "machine-5"], tmp_path)
    assert past.returncode != 0 and "keeps a run of 5 epochs, past --epochs 1: give --epochs 5" in past.stderr
    assert not (tmp_path / "machine-5").exists()
    metrics_file.write_text(json.dumps(metrics))
    # another output-bias start is another study: its runs are not kept over the records of this one, and a run
    # of the other start refuses it, both before any training
    random = [*tiny, "--runs", "1-layer-iwae-k5", "--out", "machine-3", "--output-bias", "random"]
    refused = refusal_of("iwae_study.py", random, tmp_path)
    assert refused.returncode != 0 and "give another --keep" in refused.stderr
    assert not (tmp_path / "machine-3").exists()
    mixed = refusal_of("iwae_study.py", [*tiny, "--runs", "1-layer-iwae-k5", "--out", "machine-2", "--output-bias",
                                          "random", "--keep", "kept-random"], tmp_path)  # fmt: skip
    assert mixed.returncode != 0 and "give it --output-bias data, or another --out" in mixed.stderr
    # so are another batch size in --out, and more AIS points than the test set holds
    other = refusal_of("iwae_study.py", [*tiny, "--runs", "1-layer-iwae-k5", "--out", "machine-2", "--batch-size",
                                          "50", "--keep", "kept-50"], tmp_path)  # fmt: skip
    assert other.returncode != 0 and "holds a run of --batch-size 100: give it --batch-size 100" in other.stderr
    too_many = refusal_of("iwae_study.py", [*tiny, "--runs", "1-layer-vae", "--out", "m", "--ais-points", "61"],
                           tmp_path)  # fmt: skip
    assert too_many.returncode != 0 and "--ais-points 61 exceeds the 60 test points" in too_many.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "kept-50").exists()
    (tmp_path / "RESULTS.md").write_text("# results\n")
    smoke = refusal_of("iwae_study.py", [*tiny, "--runs", "1-layer-vae", "--out", "m", "--results", "RESULTS.md"],
                        tmp_path)  # fmt: skip
    assert smoke.returncode != 0 and "leave out --subset (a smoke test's table would replace" in smoke.stderr
    # the table holds only runs evaluated at --samples: the record of K = 10 leaves it when K = 20 is asked for
    other_k = run_example("iwae_study.py", [*tiny[:4], "--samples", "20", *tiny[6:], "--runs", "1-layer-iwae-k5",
                                            "--out", "machine-2"], tmp_path)  # fmt: skip
    assert other_k.returncode == 0, other_k.stderr[-2000:]
    assert "our NLL (K = 20)" in other_k.stdout and "| IWAE k = 50 |" not in other_k.stdout


def test_the_prior_study_refuses_a_run_of_other_settings_before_training(tmp_path, mnist):
    """A run in --out trained otherwise (a smoke test's, say) is named with its flags, not trained on."""
    study = load_example("compare_priors.py")
    args = argparse.Namespace(epochs=3, warmup_epochs=10.0, components=5, subset=500, seed=0, output_bias="data")
    vae = pv.VAE((1, 28, 28), 4, prior=pv.priors.build_prior(study.prior_config("mixture", args)), hidden=(16,))
    with pytest.warns(UserWarning, match="KL warm-up"):  # 10 epochs of warm-up in a run of 1
        pv.fit(vae, mnist.quick_subset(500), epochs=1, warmup_epochs=10, run_dir=tmp_path / "mixture", progress=False)
    study.check_before_training(args, tmp_path)  # the same settings: it goes ahead
    for change, message in [
        ({"components": None}, "was trained with --components 5; give that"),
        ({"subset": None, "seed": 1}, "was trained with --seed 0 --subset 500; give that"),
        ({"epochs": 0}, "has trained 1 epochs, past --epochs 0"),
    ]:
        with pytest.raises(SystemExit, match=message):
            study.check_before_training(argparse.Namespace(**{**vars(args), **change}), tmp_path)


def test_the_iwae_study_refuses_a_step_run_of_another_length_before_training(tmp_path, small_mnist):
    """Under a schedule whose rates depend on the run's epochs, a run in --out trained for another length is not
    resumed to --epochs (the engine would refuse it late, after other runs); it is named with the fix."""
    study = load_example("iwae_study.py")
    data = small_mnist.quick_subset(300)
    pv.fit(small_vae(), data, epochs=2, batch_size=100, lr_schedule="step", run_dir=tmp_path / "1-layer-vae",
           progress=False)  # fmt: skip
    args = argparse.Namespace(runs=["1-layer-vae"], keep=None, epochs=3, lr_schedule="step", output_bias="data",
                              batch_size=100, seed=0, subset=300, ais_points=0, results=None)  # fmt: skip
    with pytest.raises(
        SystemExit, match="follows the step learning-rate schedule over 2 epochs.*give --epochs 2, or another --out"
    ):
        study.check_before_training(args, tmp_path)
    study.check_before_training(argparse.Namespace(**{**vars(args), "epochs": 2}), tmp_path)  # its own length


def test_the_iwae_study_refuses_a_kept_record_of_reduced_precision_products(tmp_path):
    study = load_example("iwae_study.py")
    (tmp_path / "kept" / "1-layer-vae").mkdir(parents=True)
    train = {"objective": {"name": "iwae"}, "matmul_precision": "medium"}
    config = {"model": {"type": "vae"}, "data": {"name": "mnist"}, "train": train}
    (tmp_path / "kept" / "1-layer-vae" / pv.RunDirectory.CONFIG).write_text(json.dumps(config))
    args = argparse.Namespace(runs=["1-layer-vae"], keep=tmp_path / "kept", epochs=3, lr_schedule="constant",
                              output_bias="data", batch_size=100, seed=0, subset=None, ais_points=0,
                              results=None)  # fmt: skip
    message = r"kept/1-layer-vae was trained with --matmul-precision medium; the study trains in float32 \(highest\)"
    with pytest.raises(SystemExit, match=message + ": give another --keep"):
        study.check_before_training(args, tmp_path / "out")
