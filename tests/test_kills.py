"""SIGKILL at random moments: a killed training process loses nothing but its unfinished epoch.

Each resume continues from the last complete epoch and ends bit for bit where the run trained without a kill
ends (:func:`training_processes.assert_same_training_state`).
"""

import json
import random
import signal
import time

import pytest
from training_processes import (
    EPOCHS,
    assert_same_training_state,
    finish,
    start_training,
    wait_for_first_checkpoint,
    wait_for_training,
)

import pyro_vae as pv
from pyro_vae.runs.files import load_checkpoint

KILLS = {"vae": 4, "ssvae": 4, "m1m2": 4}


@pytest.mark.parametrize("kind", ["vae", "ssvae", "m1m2"])
def test_sigkill_at_random_moments_loses_nothing(tmp_path, reference_runs, robustness_report, kind):
    """SIGKILL at random moments until training is done; each resume continues from the last complete epoch."""
    reference, m1 = reference_runs(kind)
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
        robustness_report[f"SIGKILLs survived ({kind})"] += 1
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


def test_stale_temporary_files_do_not_block_a_resume(tmp_path, small_mnist, robustness_report):
    run = tmp_path / "run"
    pv.fit(pv.VAE((1, 28, 28), 2, hidden=(16,)), small_mnist.subset(train=100), epochs=1, run_dir=run, progress=False)
    stale = [run / ".checkpoint.pt.abc.tmp", run / "figures" / ".samples.png.def.tmp"]  # what kills while writing leave
    for path in stale:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half a file")
    pv.fit(
        pv.VAE((1, 28, 28), 2, hidden=(16,)), small_mnist.subset(train=100), epochs=2, run_dir=run, resume=True,
        progress=False,
    )  # fmt: skip
    assert not list(run.rglob(".*.tmp"))
    (run / "evaluations").mkdir(exist_ok=True)
    (run / "evaluations" / ".is-K5.npz.ghi.tmp").write_bytes(b"half an evaluation")
    pv.evaluate_run(run, num_samples=5, progress=False)
    assert not list(run.rglob(".*.tmp"))
    robustness_report["bad inputs refused or cleaned"] += 1
