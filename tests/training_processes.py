"""Real training processes for the kill and interrupt tests: start, signal, resume, compare bit for bit.

``tests/test_kills.py`` and ``tests/test_interrupts.py`` share the reference runs they compare against through
``conftest.py``'s session fixture ``reference_runs``: each trained once per test session, on first use, by
whichever pytest-xdist worker asks first (:func:`trained_once`).
"""

import functools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from conftest import without_timings
from filelock import FileLock

from pyro_vae.runs.files import load_checkpoint

# about 0.7 s per epoch for the VAE, 1-2 s for M2: long enough for a signal to land anywhere in it
EPOCHS = 3
COMMON = ["--subset", "3000", "--hidden", "32", "--z-dim", "2", "--batch-size", "10", "--epochs", str(EPOCHS)]
TRAIN = {
    "vae": [*COMMON, "--eval-samples", "10", "--no-progress"],
    # M2 with its weights averaged: the iterates and their average resume exactly
    "ssvae": [*COMMON, "--semi-supervised", "--labels", "100", "--ema-decay", "0.99", "--eval-samples", "10"]
    + ["--no-progress"],
    "m1m2": [*COMMON[2:], "--labels", "100", "--eval-samples", "10", "--no-progress"],  # M1's data: its subset
    "vae-compiled": [*COMMON, "--compile", "on", "--eval-samples", "10", "--no-progress"],
}


def train_m1(out: Path) -> Path:
    """A small VAE trained by command, for M1+M2 to stack on."""
    args = ["--subset", "1000", "--hidden", "32", "--z-dim", "4", "--epochs", "1", "--eval-samples", "0"]
    done = subprocess.run(
        [sys.executable, "-m", "pyro_vae.cli", "train", *args, "--no-progress", "--out", str(out), "--name", "m1"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out / "m1"


def trained_once(tmp_path_factory, name: str, train: Callable[[Path], None]) -> Path:
    """The folder ``name`` that ``train(folder)`` fills, trained once per test session.

    pytest-xdist's workers share their session's temporary folder (the parent of each one's own): the first
    worker to ask trains while holding a lock, the others wait for it and read. Training fills a fresh folder
    that takes the name once it is done, so a failed try leaves nothing that a later one would resume. A plain
    pytest run uses its own temporary folder, never one of an earlier session.
    """
    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared
    folder = shared / f"shared-{name}"
    with FileLock(shared / f"shared-{name}.lock"):
        if not folder.exists():
            attempt = Path(tempfile.mkdtemp(prefix=f"training-{name}-", dir=shared))
            train(attempt)
            attempt.rename(folder)
    return folder


def reference_runs(tmp_path_factory) -> Callable[[str], tuple[Path, Path | None]]:
    """``reference(kind)`` -> (the run of that kind trained without interruption, the M1 it stacks on or None),
    each trained on first use and kept for the session (``conftest.py``'s ``reference_runs`` fixture)."""

    @functools.cache
    def m1() -> Path:
        return trained_once(tmp_path_factory, "m1", train_m1) / "m1"

    @functools.cache
    def reference(kind: str) -> tuple[Path, Path | None]:
        stacked_on = m1() if kind == "m1m2" else None
        folder = trained_once(tmp_path_factory, f"reference-{kind}", lambda out: finish(out / "run", kind, stacked_on))
        return folder / "run", stacked_on

    return reference


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
    try:
        _, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:  # timed out: it must not train on beside the next try
            process.kill()
            process.wait()
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
    """The two runs' last checkpoints hold the same numbers, bit for bit: parameters (and the iterates beside their
    average), Adam's state and settings, history (timings aside) and the objective's state."""
    a, b = load_checkpoint(run / "checkpoint.pt"), load_checkpoint(reference / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == EPOCHS and a["position"] is None
    assert_same_values(a["model"], b["model"], "model")
    assert_same_values(a["averaging"], b["averaging"], "averaging")  # M2's iterates beside their average
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert_same_values(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer state")
    assert without_timings(a["history"]) == without_timings(b["history"])
    assert_same_values(a["objective"], b["objective"], "objective")  # M2's labelled order and cursor


def assert_same_values(a, b, where: str) -> None:
    """Nested dicts of tensors and plain values, equal key for key; tensors bit for bit."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, sorted(map(str, a)), sorted(map(str, b)))
        for key in a:
            assert_same_values(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where
