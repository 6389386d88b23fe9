"""Ctrl-C (SIGINT) during training: the step finishes, everything is saved, and the resume matches bit for bit."""

import signal
import time
from pathlib import Path

import pytest
from training_processes import (
    assert_same_training_state,
    finish,
    start_training,
    wait_for_first_checkpoint,
    wait_for_training,
)

from pyro_vae.runs.files import load_checkpoint

# two SIGINTs for the VAE (a resume of a resume); one for the others, whose engine is the same. A fresh run's
# delay counts from its first checkpoint (epoch 0, written once the Ctrl-C handler is in place), a resume's from
# its announcement: a busy machine can take longer than any fixed delay to get from announcing to training.
SIGINT_DELAYS = {"vae": (0.4, 0.8), "ssvae": (0.6,), "m1m2": (0.6,), "vae-compiled": (1.5,)}


@pytest.mark.parametrize("kind", ["vae", "ssvae", "m1m2"])
def test_sigint_finishes_the_step_saves_and_exits_cleanly(tmp_path, reference_runs, robustness_report, kind):
    reference, m1 = reference_runs(kind)
    interrupt_resume_and_compare(tmp_path / "run", reference, kind, m1, robustness_report)


def test_sigint_in_a_compiled_run_resumes_bit_for_bit(tmp_path, reference_runs, robustness_report):
    """The compiled step: a SIGINT while compiling or part-way through an epoch saves, and the resume matches."""
    compiled_reference, _ = reference_runs("vae-compiled")
    history = load_checkpoint(compiled_reference / "checkpoint.pt")["history"]
    assert history[1]["compile_seconds"] > 0  # the reference compiled its step
    interrupt_resume_and_compare(tmp_path / "run", compiled_reference, "vae-compiled", None, robustness_report)


def interrupt_resume_and_compare(run: Path, reference: Path, kind: str, m1: Path | None, report) -> None:
    """SIGINT a run after each of its kind's delays, resume it each time, finish it, compare it bit for bit."""
    interrupted_at = []
    for delay in SIGINT_DELAYS[kind]:  # after loading the data, part-way through an epoch
        fresh = not (run / "checkpoint.pt").exists()
        process = start_training(run, not fresh, kind, m1)
        wait_for_training(process)
        if fresh:
            wait_for_first_checkpoint(run, process)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
        report[f"SIGINTs survived ({kind})"] += 1
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
