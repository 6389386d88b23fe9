"""The pyro-vae command: a smoke run on a subset, resume, --help, and its errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pyro_vae as pv
from pyro_vae import cli
from pyro_vae.cli import main
from pyro_vae.components.likelihoods import LIKELIHOODS

SMALL = ["--subset", "500", "--hidden", "64", "--eval-samples", "10", "--no-progress"]  # K = 10: no test reads it


def test_train_smoke_writes_a_readable_run_directory(tmp_path, capsys):
    args = ["train", *SMALL, "--z-dim", "2", "--epochs", "1", "--out", str(tmp_path), "--name", "smoke"]
    assert main(args) == 0
    run = tmp_path / "smoke"
    assert {p.name for p in run.iterdir()} >= {"config.json", "checkpoint.pt", "history.csv", "metrics.json", "figures"}
    figures = {p.name for p in (run / "figures").iterdir()}
    assert figures == {"learning_curves.png", "latent_space.png", "reconstructions.png", "samples.png", "manifold.png"}
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["z_dim"] == 2 and config["data"]["subset"]["train"] == 500
    assert (config["train"]["batch_size"], config["train"]["lr"], config["train"]["lr_schedule"]) == (
        128,
        1e-3,
        "constant",
    )  # the VAE's defaults
    assert config["train"]["matmul_precision"] == "highest"
    assert "test ELBO" in capsys.readouterr().out

    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    history = (run / "history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["0", "1", "2"]


def test_gaussian_likelihood_on_grayscale(tmp_path):
    args = ["train", *SMALL, "--binarize", "none", "--likelihood", "gaussian", "--sigma", "shared", "--epochs", "1"]
    assert main([*args, "--arch", "conv", "--out", str(tmp_path), "--name", "g"]) == 0
    assert json.loads((tmp_path / "g" / "config.json").read_text())["model"]["likelihood"]["sigma"] == "shared"


def test_a_run_of_averaged_weights_records_its_decay_and_resumes_with_it(tmp_path, capsys):
    args = ["train", *SMALL, "--epochs", "1", "--ema-decay", "0.9", "--out", str(tmp_path), "--name", "a"]
    assert main(args) == 0
    assert main(["train", "--resume", str(tmp_path / "a"), "--epochs", "2", "--no-progress"]) == 0
    run = pv.load_run(tmp_path / "a")
    assert run.config["train"]["ema_decay"] == 0.9 and [row["epoch"] for row in run.history] == [0, 1, 2]
    with pytest.raises(SystemExit):
        main(["train", *SMALL, "--ema-decay", "1", "--out", str(tmp_path), "--name", "b"])
    assert "argument --ema-decay: 1 is out of range; give a value in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_a_run_of_medium_precision_products_records_it_and_resumes_with_it(tmp_path):
    args = ["train", *SMALL, "--epochs", "1", "--matmul-precision", "medium", "--out", str(tmp_path), "--name", "m"]
    assert main(args) == 0
    assert main(["train", "--resume", str(tmp_path / "m"), "--epochs", "2", "--no-progress"]) == 0
    run = pv.load_run(tmp_path / "m")
    assert run.config["train"]["matmul_precision"] == "medium" and [row["epoch"] for row in run.history] == [0, 1, 2]


@pytest.mark.parametrize(
    "flags, prior, likelihood",
    [
        (["--prior", "vamp", "--components", "7", "--likelihood", "laplace", "--scale", "decoder"],
         {"name": "vamp", "num_components": 7}, {"name": "laplace", "scale": "decoder"}),
        (["--prior", "flow", "--flow-layers", "2", "--likelihood", "continuous-bernoulli", "--z-dim", "2"],
         {"name": "flow", "num_layers": 2}, {"name": "continuous-bernoulli"}),
    ],
)  # fmt: skip
def test_prior_and_likelihood_flags_reach_the_config(tmp_path, flags, prior, likelihood):
    assert main(["train", *SMALL, *flags, "--epochs", "1", "--out", str(tmp_path), "--name", "r"]) == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["model"]["prior"].items() >= prior.items()
    assert config["model"]["likelihood"].items() >= likelihood.items()
    assert config["data"]["binarize"] == "none"  # grayscale by default for likelihoods other than bernoulli
    assert main(["evaluate", str(tmp_path / "r"), "--samples", "4", "--no-progress"]) == 0


@pytest.mark.parametrize("elbo, particles", [("trace", 1), ("meanfield", 1), ("iwae", 5)])
def test_without_particles_each_objective_takes_its_own_default(tmp_path, elbo, particles):
    """``--elbo iwae`` alone trains the IWAE bound of ``pv.IWAEBound()``, K = 5, not K = 1 (which is the ELBO)."""
    flags = ["--elbo", elbo, "--epochs", "1", "--eval-samples", "0", "--out", str(tmp_path), "--name", "r"]
    assert main(["train", *SMALL, *flags]) == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["train"]["objective"]["num_particles"] == particles


def test_two_stochastic_layers_with_dreg_train_and_evaluate_per_layer(tmp_path, capsys):
    flags = ["--z-dim", "6", "3", "--upper-hidden", "16", "--elbo", "iwae", "--particles", "3", "--gradient", "dreg"]
    assert (
        main(["train", *SMALL, *flags, "--epochs", "1", "--eval-samples", "0", "--out", str(tmp_path), "--name", "h"])
        == 0
    )
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    assert config["model"]["type"] == "hierarchical" and config["model"]["hidden"] == [[64], [16]]
    assert config["model"]["activation"] == "tanh"  # Burda et al.'s, the two-layer model's default
    assert config["train"]["objective"] == {"name": "iwae", "num_particles": 3, "gradient": "dreg"}
    assert main(["evaluate", str(tmp_path / "h"), "--samples", "4", "--no-progress"]) == 0
    assert "(z1: " in capsys.readouterr().out
    metrics = json.loads((tmp_path / "h" / "metrics.json").read_text())
    assert len(metrics["active_units_per_layer"]) == 2 and metrics["latent_sizes"] == [6, 3]


def test_resume_of_a_missing_run(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_script_help():
    script = Path(sys.executable).with_name("pyro-vae")  # installed beside the interpreter, on PATH or not
    assert script.exists(), f"{script} is missing: install the package (pip install -e .)"
    out = subprocess.run([str(script), "train", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in (
        "--dataset",
        "--binarize",
        "--z-dim",
        "--hidden",
        "--arch",
        "--prior",
        "--likelihood",
        "--epochs",
        "--batch-size",
        "--lr",
        "--lr-schedule",
        "--warmup-epochs",
        "--seed",
        "--device",
        "--out",
        "--resume",
    ):
        assert flag in out


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "pyro_vae.cli", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout


PLUGIN = """
import pyro.distributions as dist
import pyro_vae as pv


@pv.likelihoods.register_likelihood
class StudentT(pv.likelihoods.Likelihood):
    name = "student-t"

    def forward(self, params):
        return dist.StudentT(3.0, self._param(params, 0), 0.1).to_event(len(self.x_shape))
"""


def install_plugin(folder, module: str, source: str):
    """A package that declares ``module`` as a pyro_vae.plugins entry point, as pip would install it."""
    (folder / f"{module}.py").write_text(source)
    info = folder / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[pyro_vae.plugins]\n{module} = {module}\n")


def test_a_likelihood_from_an_installed_plugin_trains_and_evaluates_by_command(tmp_path, monkeypatch, capsys):
    install_plugin(tmp_path, "pyro_vae_test_plugin", PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "runs" / "t"
    try:
        args = ["train", *SMALL, "--likelihood", "student-t", "--epochs", "1", "--out", str(run.parent), "--name", "t"]
        assert main(args) == 0
        del LIKELIHOODS["student-t"], sys.modules["pyro_vae_test_plugin"]  # as a new process starts
        assert main(["evaluate", str(run), "--samples", "4", "--test-points", "20", "--no-progress"]) == 0
    finally:
        LIKELIHOODS._classes.pop("student-t", None)
        sys.modules.pop("pyro_vae_test_plugin", None)
    sys.path.remove(str(tmp_path))  # the plugin uninstalled: its run's error names the fix
    capsys.readouterr()
    assert main(["evaluate", str(run), "--samples", "4", "--no-progress"]) == 2
    assert "Unknown likelihood 'student-t'" in (err := capsys.readouterr().err) and "'pyro_vae.plugins'" in err


def test_a_module_named_in_pyro_vae_plugins_is_imported_from_the_current_folder(tmp_path, monkeypatch, capsys):
    """No package to install: PYRO_VAE_PLUGINS=module finds ./module.py; a module that fails is named."""
    (tmp_path / "my_student_t.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the folder load_plugins adds goes with the test
    monkeypatch.setenv("PYRO_VAE_PLUGINS", "my_student_t")
    try:
        args = ["train", *SMALL, "--likelihood", "student-t", "--epochs", "1", "--out", "runs", "--name", "t"]
        assert main(args) == 0
        del LIKELIHOODS["student-t"], sys.modules["my_student_t"]  # as a new process starts
        assert main(["evaluate", "runs/t", "--samples", "4", "--test-points", "20", "--no-progress"]) == 0
    finally:
        LIKELIHOODS._classes.pop("student-t", None)
        sys.modules.pop("my_student_t", None)
    monkeypatch.setenv("PYRO_VAE_PLUGINS", "my_student_t, no_such_module")
    capsys.readouterr()
    try:
        assert main(["train", "--help"]) == 2
    finally:
        LIKELIHOODS._classes.pop("student-t", None)
        sys.modules.pop("my_student_t", None)
    assert "'no_such_module' named in PYRO_VAE_PLUGINS failed to import" in capsys.readouterr().err


def test_a_plugin_that_fails_to_import_is_named(tmp_path, monkeypatch, capsys):
    install_plugin(tmp_path, "pyro_vae_broken_plugin", "raise RuntimeError('broken on purpose')")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["train", "--help"]) == 2
    err = capsys.readouterr().err
    assert "entry point 'pyro_vae_broken_plugin'" in err and "broken on purpose" in err


def test_a_small_data_file_trains_with_a_validation_split_of_its_size(tmp_path, capsys):
    np.save(tmp_path / "small.npy", np.random.default_rng(0).random((600, 4, 4), dtype=np.float32))
    args = ["train", "--dataset", str(tmp_path / "small.npy"), "--likelihood", "gaussian", "--hidden", "8"]
    args += ["--epochs", "1", "--eval-samples", "4", "--no-progress", "--out", str(tmp_path)]
    assert main([*args, "--name", "default"]) == 2  # 10,000 validation points of 540
    assert "choose a val_size (pyro-vae train --val-size) between 1 and 539" in capsys.readouterr().err
    assert not (tmp_path / "default").exists()
    assert main([*args, "--name", "tenth", "--val-size", "0.1"]) == 0
    assert json.loads((tmp_path / "tenth" / "config.json").read_text())["data"]["val_size"] == 0.1


def test_semi_supervised_training_takes_the_classes_of_a_data_files_labels(tmp_path, capsys):
    """M2 from a file of three classes has a label of three values (the command line once fixed it at MNIST's ten,
    and the file's run failed at its labels' check); labels of one class are refused before anything is written."""
    rng = np.random.default_rng(0)
    x = rng.random((300, 4, 4), dtype=np.float32)
    np.savez(tmp_path / "three.npz", x=x, y=np.arange(300) % 3)
    np.savez(tmp_path / "one.npz", x=x, y=np.zeros(300, dtype=np.int64))
    args = ["train", "--semi-supervised", "--labels", "6", "--likelihood", "continuous-bernoulli", "--hidden", "8"]
    args += ["--z-dim", "2", "--val-size", "30", "--epochs", "1", "--eval-samples", "0", "--no-progress"]
    args += ["--out", str(tmp_path)]
    assert main([*args, "--dataset", str(tmp_path / "three.npz"), "--name", "three"]) == 0
    assert json.loads((tmp_path / "three" / "config.json").read_text())["model"]["num_classes"] == 3
    assert pv.load_run(tmp_path / "three").model.classify(torch.as_tensor(x[:5]).unsqueeze(1)).max() <= 2
    capsys.readouterr()
    assert main([*args, "--dataset", str(tmp_path / "one.npz"), "--name", "one"]) == 2
    assert "The labels hold one class (0); semi-supervised training needs two or more" in capsys.readouterr().err
    assert not (tmp_path / "one").exists()


def test_an_output_bias_start_from_the_data_that_the_model_has_not_is_refused(tmp_path, capsys):
    """The conv decoder has no start at the data: by default it keeps its random start (the config says so),
    but --output-bias data typed out is refused, not ignored, before anything is written."""
    conv = [
        "--arch",
        "conv",
        "--subset",
        "200",
        "--z-dim",
        "2",
        "--epochs",
        "1",
        "--eval-samples",
        "0",
        "--no-progress",
    ]
    assert main(["train", *conv, "--output-bias", "data", "--out", str(tmp_path / "runs")]) == 2
    assert "--output-bias data: this vae has no output bias to start at the data" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    assert main(["train", *conv, "--out", str(tmp_path / "runs"), "--name", "conv"]) == 0
    assert pv.RunDirectory(tmp_path / "runs" / "conv").read_config()["train"]["output_bias"] == "random"


def test_an_out_or_a_name_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "runs").write_text("not a folder")
    assert main(["train", *SMALL, "--epochs", "1", "--out", str(tmp_path / "runs")]) == 2
    assert "--out" in (err := capsys.readouterr().err) and "is a file; give the folder" in err
    assert (tmp_path / "runs").read_text() == "not a folder"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "taken").write_text("not a run")
    assert main(["train", *SMALL, "--epochs", "1", "--out", str(tmp_path / "out"), "--name", "taken"]) == 2
    assert "taken is a file; choose another name for the run, or move the file away" in capsys.readouterr().err
    assert (tmp_path / "out" / "taken").read_text() == "not a run"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is of a machine without a GPU")
def test_gpu_processes_on_a_machine_without_a_gpu_are_refused_before_any_launch(tmp_path, capsys):
    assert main(["train", *SMALL, "--accelerator", "gpu", "--devices", "2", "--out", str(tmp_path)]) == 2
    assert "PyTorch sees no GPU here; use --accelerator cpu" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_running_out_of_memory_or_an_unwritable_path_is_one_line_that_names_the_fix(tmp_path, monkeypatch, capsys):
    """PyTorch's CPU allocator raises a RuntimeError (``--hidden 100000000`` asks for 313 GB), and a file system can
    refuse a path that looked writable (``--out /proc/runs``): no traceback."""

    def refused(args):
        raise PermissionError(13, "Permission denied", "/proc/runs")

    monkeypatch.setattr(cli, "_train", refused)
    assert main(["train", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        "pyro-vae: error: Permission denied: /proc/runs; check that path and its permissions.\n"
    )

    def allocating(args):  # PyTorch's own allocator refusing a petabyte, its message as it is
        torch.empty(2**50, dtype=torch.uint8)

    monkeypatch.setattr(cli, "_train", allocating)
    assert main(["train", "--hidden", "100000000", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyro-vae: error: out of memory (") and "can't allocate memory" in err
    assert err.endswith("; give smaller sizes (--hidden, --z-dim, --batch-size, --particles), or free memory.\n")
    assert err.count("\n") == 1

    def failing(args):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(cli, "_train", failing)
    with pytest.raises(RuntimeError, match="some other failure"):  # only memory is turned into a message
        main(["train", "--out", str(tmp_path)])


def test_the_seed_leaves_the_split_and_the_label_draw_to_the_split_seed(tmp_path):
    """`--seed` seeded the validation split until 2026-12-07, so that M2 runs of two seeds were given two label
    draws: now the runs of any --seed share a split (and their labels); --split-seed draws another."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "two.npz", x=rng.random((300, 4, 4), dtype=np.float32), y=np.arange(300) % 2)
    args = ["train", "--dataset", str(tmp_path / "two.npz"), "--semi-supervised", "--labels", "4", "--hidden", "8"]
    args += ["--likelihood", "continuous-bernoulli", "--z-dim", "2", "--val-size", "30", "--epochs", "1"]
    args += ["--eval-samples", "0", "--no-progress", "--out", str(tmp_path)]
    runs = {"seed-0": [], "seed-3": ["--seed", "3"], "split-3": ["--split-seed", "3"]}
    configs = {}
    for name, flags in runs.items():
        assert main([*args, *flags, "--name", name]) == 0
        configs[name] = json.loads((tmp_path / name / "config.json").read_text())
    assert [configs[name]["data"]["seed"] for name in runs] == [0, 0, 3]
    assert configs["seed-3"]["train"]["seed"] == 3
    assert configs["seed-0"]["data_digests"] == configs["seed-3"]["data_digests"]
    assert configs["seed-0"]["data_digests"]["train"] != configs["split-3"]["data_digests"]["train"]
