"""Every invalid value on the command line: one line naming the valid range, exit code 2, nothing left behind."""

import argparse
import json
import subprocess
import sys

import pytest
import torch

import pyro_vae as pv
from pyro_vae import cli
from pyro_vae.training.engine import resolve_device

SMALL = ["--subset", "200", "--hidden", "16", "--epochs", "1", "--no-progress"]

TRAIN_VALUES = [
    (["--z-dim", "0"], "give a value >= 1"),
    (["--z-dim", "-3"], "give a value >= 1"),
    (["--z-dim", "two"], "is not an integer"),
    (["--hidden", "0"], "give a value >= 1"),
    (["--hidden", "64", "0"], "give a value >= 1"),
    (["--epochs", "-1"], "give a value >= 1"),
    (["--epochs", "0"], "give a value >= 1"),
    (["--subset", "0"], "give a value >= 1"),
    (["--subset", "60000"], "--subset 60000 exceeds the 50000 training points of mnist; give at most 50000"),
    (["--batch-size", "0"], "give a value >= 1"),
    (["--lr", "0"], "give a value > 0"),
    (["--lr=-1e-3"], "give a value > 0"),
    (["--lr", "-1e-3"], "-1e-3 is out of range; give a value > 0"),  # a value, not an option
    (["--lr", "-inf"], "not a finite number"),
    (["--lr", "nan"], "not a finite number"),
    (["--lr", "inf"], "not a finite number"),
    (["--particles", "0"], "give a value >= 1"),
    (["--warmup-epochs", "-1"], "give a value >= 0"),
    (["--beta", "0"], "give a value > 0"),
    (["--seed", "-1"], "give a value in [0, 4294967295]"),
    (["--seed", str(2**32)], "give a value in [0, 4294967295]"),
    (["--device", "gpu9"], "Unknown device"),
    (["--device", "cuda"], "sees no GPU"),
    (["--device", "meta"], "Device 'meta' is not supported; use cpu, cuda"),
    (["--device", "mps"], "Device 'mps' is not supported"),
    (["--device", "cpu", "--devices", "2"], "--device does not apply with --devices"),
    (["--eval-samples", "-1"], "give a value >= 0"),
    (["--components", "0"], "give a value >= 1"),
    (["--flow-layers", "0"], "give a value >= 1"),
    (["--init-scale", "0"], "give a scale > 0.001"),
    (["--init-scale", "0.0005"], "give a scale > 0.001"),
    (["--semi-supervised", "--labels", "0"], "give a value >= 1"),
    (["--semi-supervised", "--labels", "70000"], "--labels 70000 is not below the "),
    (["--semi-supervised", "--labels", "5"], "5 labels cannot cover 10 classes; give --labels 10 or more"),
    (["--semi-supervised", "--label-seed", "-2"], "give a value in [0, 4294967295]"),
    (["--semi-supervised", "--aux-weight", "-1"], "give a value >= 0"),
    (["--semi-supervised", "--classifier-steps", "-5"], "give a value >= 0"),
    (["--devices", "0"], "give a value >= 1"),
    (["--devices", "many"], "is not an integer"),
    (["--num-nodes", "0"], "give a value >= 1"),
    (["--name", "a/b"], "without slashes"),
    (["--name", ""], "without slashes"),
    (["--dataset", "cifar"], "unknown data set"),
    (["--dataset", "missing.npy"], "missing.npy"),
    (["--prior", "laplace"], "invalid choice"),
    (["--likelihood", "poisson"], "invalid choice"),
    (["--binarize", "sometimes"], "invalid choice"),
    (["--arch", "transformer"], "invalid choice"),
    (["--scale", "huge"], "invalid choice"),
    (["--elbo", "renyi"], "invalid choice"),
    (["--accelerator", "tpu"], "invalid choice"),
    (["--semi-supervised", "--class-prior", "zipf"], "invalid choice"),
    # flags that would be silently ignored
    (["--labels", "50"], "--labels applies only with --semi-supervised or --m1"),
    (["--aux-weight", "3"], "applies only with --semi-supervised or --m1"),
    (["--classifier-steps", "10"], "applies only with --semi-supervised or --m1"),
    (["--aux-weight", "46"], "applies only with --semi-supervised or --m1"),  # the default at 100 labels: still given
    (["--labels", "100", "--label-seed", "1"], "--labels, --label-seed apply only with --semi-supervised or --m1"),
    (["--semi-supervised", "--elbo", "iwae"], "--elbo applies only to VAE training"),
    (["--elbo", "iwae", "--beta", "2"], "do not apply to the IWAE bound"),
    (["--elbo", "iwae", "--warmup-epochs", "1"], "do not apply to the IWAE bound"),
    (["--semi-supervised", "--arch", "conv"], "--arch applies only to the VAE"),
    (["--gradient", "dreg"], "--gradient dreg needs --elbo iwae"),
    (["--elbo", "iwae", "--gradient", "stl"], "--gradient stl needs --elbo trace"),
    (["--semi-supervised", "--gradient", "stl"], "--gradient applies only to VAE training"),
    (["--z-dim", "100", "50", "--elbo", "meanfield"], "needs a mean-field guide"),
    (["--z-dim", "100", "50", "--arch", "conv"], "apply only to the MLP VAE"),
    (["--semi-supervised", "--z-dim", "10", "5"], "apply only to the MLP VAE"),
    (["--upper-hidden", "50"], "applies only with several stochastic layers"),
    (["--arch", "conv", "--activation", "tanh"], "--activation applies to MLPs only"),
    (["--arch", "conv", "--hidden", "400", "300"], "--arch conv has one dense layer: give one --hidden size"),
    (["--activation", "gelu"], "invalid choice"),
    (["--val-size", "0"], "neither a count of points"),
    (["--val-size", "100", "--subset", "500"], "give --val-size or --subset, not both"),
    (["--val-size", "2.5"], "neither a count of points"),
    (["--val-size", "ten"], "neither a count of points"),
    (["--components", "5"], "--components applies only to the mixture and vamp priors"),
    (["--flow-layers", "2"], "--flow-layers applies only to the flow prior"),
    (["--scale", "shared"], "apply only to the gaussian and laplace likelihoods"),
    (["--data-dir", "data"], "--data-dir applies only to the torchvision data sets"),
    (["--dataset", "mnist", "--download"], "--dataset mnist does not need it: drop it"),
    (["--data-dir", "data", "--download"], "--dataset mnist needs neither: drop them"),
    (["--seed", "4294967295", "--epochs", "0"], "give a value >= 1"),
    (["--start-epochs", "5"], "--start-epochs applies only with --starts 2 or more"),
    (["--starts", "2", "--start-epochs", "5"], "--start-epochs 5 exceeds --epochs 1"),
    (["--semi-supervised", "--epochs", "100", "--start-epochs", "101"], "--start-epochs 101 exceeds --epochs 100"),
    (["--starts", "0"], "give a value >= 1"),
    (["--starts", "2", "--start-epochs", "1", "--devices", "2"], "--starts 2 trains its starts on one process"),
    (
        ["--starts", "2", "--start-epochs", "1", "--seed", "4294967295"],
        "needs seeds above 4294967295; give a lower --seed",
    ),
    (["--binarize", "none"], "--binarize dynamic"),  # Bernoulli on grayscale: the fix named
    (["--likelihood", "bernoulli", "--binarize", "none"], "binarise"),
]


def _run(argv, capsys):
    """The exit code and standard error of ``pyro-vae ARGV`` (argparse's refusals exit; the others return)."""
    try:
        code = cli.main(argv)
    except SystemExit as done:
        code = done.code
    return code, capsys.readouterr().err


def test_a_gpu_that_is_not_here_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"--device cuda:3 was asked for, but PyTorch sees 1 GPU\(s\) here; give an "):
        resolve_device("cuda:3")
    assert resolve_device("cuda:0") == torch.device("cuda:0")


@pytest.mark.parametrize("flags, message", TRAIN_VALUES, ids=[" ".join(f) for f, _ in TRAIN_VALUES])
def test_an_invalid_train_value_is_refused_before_any_work(flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "sees no GPU" on a machine with one too
    try:
        code = cli.main(["train", *SMALL, *flags, "--out", str(tmp_path / "runs")])
    except SystemExit as done:
        code = done.code
    out, err = capsys.readouterr()
    assert code == 2, err
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err  # one line
    assert "run directory" not in out, out  # refused before a run directory was announced
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run directory


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert cli.main(["train", *SMALL, "--z-dim", "2", "--eval-samples", "0", "--out", str(out), "--name", "r"]) == 0
    return out / "r"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--z-dim", "5"], "--z-dim cannot change a run on --resume"),
        (["--prior", "vamp", "--lr", "0.1"], "--prior, --lr cannot change a run on --resume"),
        (["--matmul-precision", "medium"], "--matmul-precision cannot change a run on --resume"),
        (["--semi-supervised"], "cannot change a run on --resume"),
        (["--epochs", "0"], "give a value >= 1"),
    ],
)
def test_resume_refuses_flags_its_config_fixes(finished_run, flags, message, capsys):
    before = (finished_run / "config.json").read_text()
    code, err = _run(["train", "--resume", str(finished_run), *flags, "--no-progress"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert (finished_run / "config.json").read_text() == before


@pytest.mark.parametrize(
    "command, example",
    [
        (["train", "--resume"], "pyro-vae train --resume"),
        (["evaluate"], "pyro-vae evaluate"),
        (["compare"], "pyro-vae compare"),
        (["train", "--semi-supervised", "--labels", "100", "--m1"], "e.g."),
    ],
    ids=["resume", "evaluate", "compare", "m1"],
)
def test_a_folder_of_runs_or_a_file_of_a_run_is_refused_naming_the_run_in_the_command_given(
    finished_run, command, example, capsys
):
    code, err = _run([*command, str(finished_run.parent)], capsys)
    assert code == 2
    assert "is a folder of runs (r)" in err and f"{example} {finished_run}" in err, err
    code, err = _run([*command, str(finished_run / "config.json")], capsys)
    assert code == 2
    assert "config.json is a file, not a run's folder" in err and f"{example} {finished_run}." in err, err


def test_runs_of_one_default_name_get_their_own_folders(tmp_path):
    """Runs started in the same second (a sweep's) share their default name: the later ones take name-2, ..."""
    stem = "mnist-bernoulli-standard-normal-20261207-120000"
    assert cli._free_name(tmp_path, stem) == stem
    for taken in (stem, f"{stem}-2"):
        (tmp_path / taken).mkdir()
    assert cli._free_name(tmp_path, stem) == f"{stem}-3"


def test_a_file_where_the_figures_go_is_refused_before_training(tmp_path, capsys, monkeypatch):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "figures").write_text("a file")
    monkeypatch.setattr(cli, "_new_model", lambda args: pytest.fail("the model was built before the refusal"))
    code, err = _run(["train", *SMALL, "--out", str(tmp_path), "--name", "r"], capsys)
    assert code == 2 and "figures is a file where the run's figures go; move it away" in err


def test_a_new_run_never_overwrites_an_old_one(finished_run, capsys, monkeypatch):
    config = (finished_run / "config.json").read_text()

    def building_the_model(args):
        raise AssertionError("the data and the model were built before the refusal")

    monkeypatch.setattr(cli, "_new_model", building_the_model)
    code, err = _run(["train", *SMALL, "--out", str(finished_run.parent), "--name", "r"], capsys)
    assert code == 2 and "already holds a run" in err
    assert (finished_run / "config.json").read_text() == config


@pytest.mark.parametrize(
    "argv, message",
    [
        (["evaluate", "RUN", "--samples", "0"], "give a value >= 1"),
        (["evaluate", "RUN", "--batch-size", "0"], "give a value >= 1"),
        (["evaluate", "RUN", "--seed", "-1"], "give a value in [0, 4294967295]"),
        (["evaluate", "RUN", "--device", "tpu"], "Unknown device"),
        (["evaluate", "RUN", "--test-points", "100000"], "test_points must be at most the run's"),
        (["evaluate", "NOWHERE"], "does not exist"),
        (["compare", "NOWHERE"], "does not exist"),
        (["compare", "RUN"], "has no per-point log p(x); run `pyro-vae evaluate"),
        (["compare", "RUN", "RUN"], "a run is given twice; give each run once"),
        (["compare", "RUN", "--out", ""], "names no file; give a path and a name, e.g. --out runs/comparison"),
        (["compare", "RUN", "--out", "AFILE/table"], "--out AFILE is a file; give a path whose folder can be written"),
        (["compare", "RUN", "--out", "RUN/history"], "is a run directory, whose own files (history.csv among them)"),
        (["train", "--out", "AFILE/runs"], "--out AFILE/runs cannot be made a folder (AFILE is a file)"),
        (["train", "--m1", "NOWHERE"], "does not exist"),
        (["train", "--m1", "RUN", "--output-bias", "data"], "--output-bias cannot be used with --m1"),
    ],
)
def test_evaluate_compare_and_train_refuse_bad_values_and_paths(finished_run, tmp_path, argv, message, capsys):
    (tmp_path / "afile").write_text("a file, not a folder")
    names = {"RUN": str(finished_run), "NOWHERE": str(tmp_path / "nowhere")}
    argv = [names.get(a, a.replace("AFILE", str(tmp_path / "afile")).replace("RUN/", f"{finished_run}/")) for a in argv]
    metrics, history = (finished_run / "metrics.json").read_text(), (finished_run / "history.csv").read_text()
    code, err = _run(argv, capsys)
    assert code == 2 and message.replace("AFILE", str(tmp_path / "afile")) in err and err.count("\n") == 1, err
    assert (tmp_path / "afile").read_text() == "a file, not a folder"
    assert (finished_run / "metrics.json").read_text() == metrics
    assert (finished_run / "history.csv").read_text() == history


@pytest.mark.parametrize("value", [0, 2.0, True])
@pytest.mark.parametrize("setting", ["num_steps", "num_chains", "leapfrog_steps", "test_points", "num_samples"])
def test_evaluate_run_checks_its_settings_before_importance_sampling(finished_run, setting, value):
    metrics = (finished_run / "metrics.json").read_text()
    with pytest.raises(ValueError, match=f"{setting} must be a whole number >= 1; got {value!r}"):
        pv.evaluate_run(finished_run, method="auto", **{setting: value})
    for seed in (None, -1, 2**32, 1.0):
        with pytest.raises(ValueError, match=f"seed must be an integer from 0 to 4294967295; got {seed!r}"):
            pv.evaluate_run(finished_run, method="auto", seed=seed)
    assert (finished_run / "metrics.json").read_text() == metrics


def test_help_states_each_default_once():
    parser = cli.build_parser()
    for command, sub in parser.commands.items():
        formatter = cli._HelpFormatter(command)
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = formatter._get_help_string(action)
            assert "None" not in text, (command, action.dest, text)
            assert text.count("default") <= 1, (command, action.dest, text)
    out = subprocess.run(
        [sys.executable, "-m", "pyro_vae.cli", "train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "(default: None)" not in out
    assert "[default: 30; 200 for --semi-supervised without --m1; with --resume" in " ".join(out.split())
    assert "[default: 1e-3; 3e-3 for" in " ".join(out.split())  # the rate of each kind of run


@pytest.mark.parametrize(
    "flags, schedule",
    [
        (["--semi-supervised"], "step"),  # M2's default
        (["--semi-supervised", "--lr-schedule", "constant"], "constant"),  # a flag given wins
        (["--m1", "RUN", "--labels", "100"], "constant"),  # M1+M2 keeps the VAE's
        ([], "constant"),
        (["--lr-schedule", "cosine"], "cosine"),
    ],
)
def test_each_kind_of_run_gets_its_learning_rate_schedule_unless_one_is_given(flags, schedule):
    args = cli.build_parser().parse_args(["train", *flags])
    cli.fill_mode_defaults(args)
    assert args.lr_schedule == schedule


@pytest.mark.parametrize(
    "flags, epochs",
    [
        (["--semi-supervised"], 200),  # M2's default: the study's length, which reaches the paper's accuracy
        (["--semi-supervised", "--epochs", "7"], 7),
        (["--m1", "RUN", "--labels", "100"], 30),  # M1+M2 keeps the VAE's
        ([], 30),
    ],
)
def test_each_kind_of_run_gets_its_length_unless_one_is_given(flags, epochs):
    args = cli.build_parser().parse_args(["train", *flags])
    cli.fill_mode_defaults(args)
    assert args.epochs == epochs


@pytest.mark.parametrize(
    "flags, starts",
    [
        (["--semi-supervised"], 8),  # M2 from pixels, 200 epochs: its first epochs settle it (docs, "Several starts")
        (["--semi-supervised", "--epochs", "100"], 8),
        (["--semi-supervised", "--epochs", "99"], 1),  # a quick look trains one
        (["--semi-supervised", "--starts", "2"], 2),
        (["--m1", "RUN", "--labels", "100", "--epochs", "300"], 1),  # M1+M2 and the VAE: one unless asked
        ([], 1),
        (["--starts", "3"], 3),
        (["--semi-supervised", "--devices", "2"], 1),  # the starts train on one process
    ],
)
def test_m2_from_pixels_trains_several_starts_unless_the_run_is_short_or_told(flags, starts):
    args = cli.build_parser().parse_args(["train", *flags])
    cli.fill_mode_defaults(args)
    assert (args.starts, args.start_epochs) == (starts, 5)


def test_the_config_records_what_the_flags_said(finished_run):
    config = json.loads((finished_run / "config.json").read_text())
    assert config["train"]["objective"] == {"name": "trace", "num_particles": 1}
    assert config["model"]["type"] == "vae" and config["model"]["z_dim"] == 2
