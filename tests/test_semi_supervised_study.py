"""The semi-supervised study (``examples/semi_supervised_study.py``): kept records, its checks before any
training, M1+M2, and Ctrl-C.

Apart from ``tests/test_examples.py`` so that pytest-xdist, which gives each file to one worker, can run the
two files' long subprocess tests side by side.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from example_scripts import EXAMPLES, load_example, refusal_of, run_example

import pyro_vae as pv
from pyro_vae.runs.files import load_checkpoint


def test_the_semi_supervised_study_takes_kept_records_and_does_not_train_them_again(tmp_path):
    """A run finished on one machine enters the table on the next (wiped) one through its kept record."""
    tiny = ["--epochs", "1", "--subset", "2000", "--labels", "100", "--label-seeds", "0", "--samples", "5"]
    tiny += ["--keep", "kept"]

    def study(out: str, steps: str = "50") -> subprocess.CompletedProcess:
        return run_example("semi_supervised_study.py", [*tiny, "--classifier-steps", steps, "--out", out], tmp_path)

    first = study("machine-1")
    assert first.returncode == 0, first.stderr[-2000:]
    record = tmp_path / "kept" / "m2-100-labels-draw-0"
    assert {"config.json", "history.csv", "metrics.json", "generative_classifier.json"} <= {
        p.name for p in record.iterdir()
    } and not list(record.glob("*.pt"))
    second = study("machine-2")
    assert second.returncode == 0, second.stderr[-2000:]
    assert not (tmp_path / "machine-2" / "m2-100-labels-draw-0").exists()  # not trained again
    table = (tmp_path / "machine-1" / "m2_table.md").read_text()
    assert (tmp_path / "machine-2" / "m2_table.md").read_text() == table and "| 100 |" in table
    # a record of other settings is refused before any training, not mixed in
    other = refusal_of("semi_supervised_study.py", [*tiny, "--classifier-steps", "60", "--out", "machine-3"], tmp_path)
    assert other.returncode != 0 and "trained with --classifier-steps 50, not 60" in other.stderr
    assert not (tmp_path / "machine-3").exists()


def test_the_semi_supervised_study_takes_the_library_s_alpha_for_each_label_count(tmp_path):
    """Without --aux-weight each count gets default_aux_weight, and a record at another alpha is refused."""
    study = load_example("semi_supervised_study.py")
    args = argparse.Namespace(
        aux_weight=None, subset=None, model="m2", lr=3e-3, classifier_steps=1000, ema_decay=0.0, starts=1
    )
    args.output_bias, args.lr_schedule, args.epochs, args.accuracy_on = "data", "step", 200, "intensities"
    assert [study.alpha(args, labels) for labels in (100, 600, 3000)] == [46.0, 276.0, 1380.0]
    assert study.alpha(argparse.Namespace(**{**vars(args), "aux_weight": 7.5}), 600) == 7.5
    objective = {"name": "semi-supervised", "num_labels": 600, "label_seed": 0, "aux_weight": 46.0}
    objective.update(classifier_steps=1000, accuracy_on="intensities")
    config = _study_config(study, {"lr": 3e-3, "output_bias": "data", "objective": objective})
    config["train"].update(lr_schedule="step", epochs=200)
    (tmp_path / pv.RunDirectory.CONFIG).write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="trained with --aux-weight 46, not 276; give that, or another --out"):
        study.check_settings(tmp_path, args, (600, 0))  # the old default's 600-label run
    objective["aux_weight"] = 276.0
    (tmp_path / pv.RunDirectory.CONFIG).write_text(json.dumps(config))
    study.check_settings(tmp_path, args, (600, 0))  # the new default's: it goes ahead


def _study_config(study, train: dict, model: dict | None = None) -> dict:
    """The config of a run as the study trains it (its M2, batch and seed), with ``train``'s settings."""
    model = study.m2_model((1, 28, 28)).config() if model is None else model
    return {"model": model, "data": {"name": "mnist"}, "train": {"batch_size": 200, "seed": 0, **train}}


def test_the_semi_supervised_study_refuses_a_run_of_another_schedule_length_under_step_or_precision(tmp_path):
    """The step schedule's rates depend on the run's epochs: a 100-epoch run is not the start of a 200-epoch one.
    A run of reduced-precision products (--matmul-precision medium), one of another average of the weights
    (--ema-decay), or one whose accuracy classified other images (--accuracy-on), is not mixed into the table."""
    study = load_example("semi_supervised_study.py")
    args = argparse.Namespace(
        aux_weight=None, subset=None, model="m2", lr=3e-3, classifier_steps=1000, ema_decay=0.0, starts=1
    )
    args.output_bias, args.lr_schedule, args.epochs, args.accuracy_on = "data", "step", 200, "intensities"
    objective = {"name": "semi-supervised", "num_labels": 100, "label_seed": 0, "aux_weight": 46.0}
    objective.update(classifier_steps=1000, accuracy_on="intensities")
    train = {"lr": 3e-3, "output_bias": "data", "objective": objective, "epochs": 200, "starts": 4, "start_epochs": 10}
    args.starts, args.start_epochs = 4, 10
    model = study.m2_model((1, 28, 28)).config()
    for settings, message in [
        ({}, "trained with --lr-schedule constant, not step"),  # a run written before the option
        ({"lr_schedule": "constant"}, "trained with --lr-schedule constant, not step"),
        ({"lr_schedule": "step", "lr": 1e-3}, "trained with --lr 0.001, not 0.003; give that, or another --out"),
        ({"lr_schedule": "step", "epochs": 100},
         "follows the step learning-rate schedule over 100 epochs.*give --epochs 100, or another --out"),
        ({"lr_schedule": "step", "matmul_precision": "medium"},
         "trained with --matmul-precision medium; the study trains in float32 \\(highest\\): give another --out"),
        ({"lr_schedule": "step", "ema_decay": 0.9999}, "trained with --ema-decay 0.9999, not 0; give that, or another"),
        ({"lr_schedule": "step", "objective": {**objective, "accuracy_on": "binarised"}},
         "measured its accuracy on the binarised images, not the intensities; give --accuracy-on binarised, or"),
        ({"lr_schedule": "step", "objective": {key: objective[key] for key in objective if key != "accuracy_on"}},
         "measured its accuracy on the binarised images"),  # a run written before the option
        ({"lr_schedule": "step", "batch_size": 100}, "trained with batch size 100, not the study's 200"),
        ({"lr_schedule": "step", "starts": 1}, "trained with --starts 1, not 4; give that, or another --out"),
        ({"lr_schedule": "step", "starts": None}, "trained with --starts 1, not 4"),  # a run written before the option
        ({"lr_schedule": "step", "start_epochs": 5}, "trained with --start-epochs 5, not 10; give that, or another"),
        ({"lr_schedule": "step", "seed": 3}, "trained with seed 3, not the study's 0"),
        ({"lr_schedule": "step", "objective": {**objective, "label_seed": 2}},
         "trained on 100 labels of draw 2, not the 100 labels of draw 0 its name says"),
        ({"lr_schedule": "step", "model": {**model, "z_dim": 10}}, "holds another model than this study's"),
        ({"lr_schedule": "step", "model": {**model, "activation": "relu"}}, "holds another model than this study's"),
        ({"lr_schedule": "step", "model": {**model, "class_prior": "learned"}}, "holds another model than this"),
        ({"lr_schedule": "step", "matmul_precision": "highest"}, None),  # the study's own
    ]:  # fmt: skip
        settings = dict(settings)
        config = _study_config(study, {**train, **settings}, settings.pop("model", None))
        config["train"].pop("model", None)
        config["train"] = {key: value for key, value in config["train"].items() if value is not None}
        (tmp_path / pv.RunDirectory.CONFIG).write_text(json.dumps(config))
        if message is None:
            study.check_settings(tmp_path, args, (100, 0))
            continue
        with pytest.raises(SystemExit, match=message):
            study.check_settings(tmp_path, args, (100, 0))


def test_the_semi_supervised_study_refuses_a_record_longer_than_its_epochs(tmp_path):
    """Under a rate that does not depend on the length, a 200-epoch record chose its best among more epochs than
    a 100-epoch study's runs: refused, not tabulated beside them; a shorter one is trained again."""
    study = load_example("semi_supervised_study.py")
    args = argparse.Namespace(
        aux_weight=None, subset=None, model="m2", lr=3e-3, classifier_steps=1000, ema_decay=0.0, starts=1
    )
    args.output_bias, args.lr_schedule, args.accuracy_on = "data", "constant", "intensities"
    objective = {"name": "semi-supervised", "num_labels": 100, "label_seed": 0, "aux_weight": 46.0}
    objective.update(classifier_steps=1000, accuracy_on="intensities")
    config = _study_config(study, {"lr": 3e-3, "output_bias": "data", "objective": objective, "epochs": 200})
    config["train"]["lr_schedule"] = "constant"
    (tmp_path / pv.RunDirectory.CONFIG).write_text(json.dumps(config))
    (tmp_path / pv.RunDirectory.METRICS).write_text(json.dumps({"epochs": 200}))
    (tmp_path / study.GENERATIVE).write_text("{}")
    with pytest.raises(SystemExit, match="has trained 200 epochs, more than --epochs 100; give --epochs 200, or"):
        study.kept(tmp_path, argparse.Namespace(**vars(args), epochs=100), (100, 0))
    assert study.kept(tmp_path, argparse.Namespace(**vars(args), epochs=200), (100, 0))
    assert not study.kept(tmp_path, argparse.Namespace(**vars(args), epochs=300), (100, 0))  # trained on


def test_the_semi_supervised_study_keeps_each_run_as_it_finishes_and_checks_every_count_first(tmp_path, monkeypatch):
    """A stop in the second run leaves the first one's record kept; an impossible label count trains nothing."""
    study = load_example("semi_supervised_study.py")
    train_m2 = study.train_m2

    def stopped_in_the_second_run(labels, label_seed, args, out):
        if label_seed == 1:
            raise KeyboardInterrupt
        return train_m2(labels, label_seed, args, out)

    monkeypatch.setattr(study, "train_m2", stopped_in_the_second_run)
    monkeypatch.chdir(tmp_path)
    tiny = ["--epochs", "1", "--subset", "2000", "--classifier-steps", "50", "--samples", "0", "--keep", "kept"]
    monkeypatch.setattr(sys, "argv", ["study", *tiny, "--labels", "100", "--label-seeds", "0", "1", "--out", "s"])
    with pytest.raises(SystemExit) as stop:
        study.main()
    assert stop.value.code == 130
    assert (tmp_path / "kept" / "m2-100-labels-draw-0" / "metrics.json").exists()
    assert not (tmp_path / "kept" / "m2-100-labels-draw-1").exists()
    monkeypatch.setattr(sys, "argv", ["study", *tiny, "--labels", "100", "--label-seeds", "0", "--out", "s"])
    study.main()  # draw 0 finished: its table, without a test log p(x) (--samples 0)
    assert "| 100 | " in (tmp_path / "s" / "m2_table.md").read_text()

    impossible = [*tiny, "--labels", "200", "5", "--label-seeds", "0", "--out", "t"]
    refused = refusal_of("semi_supervised_study.py", impossible, tmp_path)
    assert refused.returncode == 2 and not (tmp_path / "t").exists()
    assert "--labels 5: 5 labels cannot cover 10 classes" in refused.stderr

    # a run of another --subset is not trained on, and --m1 is refused where no M1 is stacked on
    smaller = ["--epochs", "2", "--subset", "1000", "--labels", "100", "--label-seeds", "0", "--out", "s"]
    refused = refusal_of("semi_supervised_study.py", smaller, tmp_path)
    assert refused.returncode == 1 and "trained on --subset 2000; give that, or another --out" in refused.stderr
    refused = refusal_of("semi_supervised_study.py", [*smaller, "--m1", "s"], tmp_path)
    assert refused.returncode == 2 and "applies to --model m1m2 only" in refused.stderr
    assert pv.RunDirectory(tmp_path / "s" / "m2-100-labels-draw-0").load_checkpoint("last")["epoch"] == 1


def test_a_run_held_by_another_process_stops_the_study_with_one_line(tmp_path, monkeypatch):
    """Two studies on one --out: the second stops with the lock's message, not a traceback of RunLocked."""
    study = load_example("semi_supervised_study.py")

    def locked_run(labels, label_seed, args, out):
        run = pv.RunDirectory(out / study.run_name("m2", labels, label_seed))
        with run.lock(), run.lock():  # a second hold of one lock, as a second process would try
            pass

    monkeypatch.setattr(study, "train_m2", locked_run)
    monkeypatch.chdir(tmp_path)
    tiny = ["--epochs", "1", "--subset", "2000", "--labels", "100", "--label-seeds", "0", "--out", "s"]
    monkeypatch.setattr(sys, "argv", ["study", *tiny])
    with pytest.raises(SystemExit, match=r"is being written by another process \(pid \d+\).*give this one another"):
        study.main()


def test_the_semi_supervised_study_runs_m1_plus_m2(tmp_path):
    tiny = ["--m1-epochs", "1", "--epochs", "1", "--subset", "2000", "--labels", "100", "--label-seeds", "0"]
    # one epoch of M1 on 2,000 points from the data's means has no active unit yet; from the random start it has
    tiny += ["--output-bias", "random"]
    result = run_example(
        "semi_supervised_study.py",
        [*tiny, "--model", "m1m2", "--samples", "5", "--out", "s", "--keep", "kept"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "M1: s/m1" in result.stdout and "| 100 |" in result.stdout
    assert (tmp_path / "s" / "m1m2-100-labels-draw-0" / "config.json").exists()
    assert (tmp_path / "kept" / "m1m2-100-labels-draw-0" / "stacked_on.json").exists()  # which M1, by its digest
    other_start = refusal_of("semi_supervised_study.py", [*tiny[:-2], "--model", "m1m2", "--out", "s"], tmp_path)
    assert other_start.returncode != 0 and "m1 started its output bias 'random'" in other_start.stderr
    for ignored in (["--model", "m2"], ["--model", "m1m2", "--m1", "s/m1"]):  # no M1 to train: refused, not ignored
        refused = refusal_of("semi_supervised_study.py", [*tiny, *ignored, "--out", "t"], tmp_path)
        assert refused.returncode == 2 and "--m1-epochs sets the M1 that --model m1m2 trains" in refused.stderr
    given = ["--epochs", "1", "--subset", "2000", "--labels", "100", "--label-seeds", "0", "--model", "m1m2"]
    again = run_example("semi_supervised_study.py", [*given, "--m1", "s/m1", "--samples", "5", "--out", "s"], tmp_path)
    assert again.returncode == 0 and "| 100 |" in again.stdout, again.stderr[-2000:]  # the same M1: the same table
    # a finished run stacked on another M1 is refused, not tabulated beside runs of this one
    shutil.copytree(tmp_path / "s" / "m1", tmp_path / "other-m1")
    best = load_checkpoint(tmp_path / "other-m1" / "best.pt")
    next(iter(best["model"].values())).add_(1.0)
    torch.save(best, tmp_path / "other-m1" / "best.pt")
    other = refusal_of("semi_supervised_study.py", [*given, "--m1", "other-m1", "--out", "s"], tmp_path)
    assert other.returncode != 0 and "is stacked on another M1 than other-m1" in other.stderr
    # and so is a kept record of one, which has no weights to compare: its record names its M1's digest
    kept = refusal_of(
        "semi_supervised_study.py", [*given, "--m1", "other-m1", "--keep", "kept", "--out", "u"], tmp_path
    )
    assert kept.returncode != 0 and "The records in --keep are stacked on another M1 than other-m1" in kept.stderr
    with_bias = refusal_of("semi_supervised_study.py", [*given, "--m1", "s/m1", "--output-bias", "data"], tmp_path)
    assert with_bias.returncode == 2 and "--output-bias sets the start of the M1" in with_bias.stderr
    # an M1 that would train on under runs stacked on it (more --m1-epochs) is refused before it trains
    longer = refusal_of("semi_supervised_study.py", [*tiny[2:], "--model", "m1m2", "--out", "s"], tmp_path)
    assert longer.returncode != 0 and "s/m1 would train further" in longer.stderr, longer.stderr[-2000:]
    assert load_checkpoint(tmp_path / "s" / "m1" / "checkpoint.pt")["epoch"] == 1


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_ctrl_c_saves_the_semi_supervised_study_runs_in_progress_and_starts_no_other(tmp_path, jobs):
    """SIGINT to the process group (a terminal's Ctrl-C) saves the runs in progress and starts none of the others.

    150 epochs of 10 steps stay below the steps at which a run is compiled, so the runs train at once; one
    start each, so that the signal lands in the continued run (a Ctrl-C among the starts: ``test_starts.py``).
    """
    args = ["--epochs", "150", "--subset", "2000", "--labels", "100", "--label-seeds", "0", "1", "2"]
    args += ["--classifier-steps", "50", "--samples", "0", "--starts", "1", "--jobs", str(jobs), "--out", "study"]
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "semi_supervised_study.py"), *args],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    runs = [tmp_path / "study" / f"m2-100-labels-draw-{draw}" for draw in range(3)]
    deadline = time.monotonic() + 300
    try:
        while not all((run / "checkpoint.pt").exists() for run in runs[:jobs]):  # each has its Ctrl-C handler
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-2000:]
            time.sleep(0.2)
        time.sleep(1.0)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=120)  # a study that goes on to the third run does not stop
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130 and "the same command resumes the study" in err, err[-2000:]
    for run in runs[:jobs]:
        assert 0 <= pv.RunDirectory(run).load_checkpoint("last")["epoch"] < 150
    assert not any(run.exists() for run in runs[jobs:])
    assert "Traceback" not in err, err[-2000:]
