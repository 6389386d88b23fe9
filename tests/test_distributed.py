"""Lightning DDP: two CPU processes (gloo) train one VAE and leave an ordinary run directory; the global gradient."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from conftest import small_vae

import pyro_vae as pv
from pyro_vae import cli
from pyro_vae.infer import build_objective
from pyro_vae.runs.files import read_json
from pyro_vae.training.engine import adam, take_step
from pyro_vae.training.parallel import LightningProcesses, SingleProcess, parameter_digest

needs_lightning = pytest.mark.skipif(
    importlib.util.find_spec("lightning") is None, reason="needs pyro-vae[distributed]"
)

SMALL = ["--subset", "512", "--hidden", "32", "--z-dim", "4", "--batch-size", "32", "--eval-samples", "10"]
SMALL += ["--no-progress"]  # K = 10 for the test log p(x): no test reads it


def train(*args: str, cwd, faults: str | None = None) -> subprocess.CompletedProcess:
    """``pyro-vae train`` on two CPU processes; ``faults``, Python that every process loads first (a
    ``sitecustomize``), injects a failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores
    if faults is not None:
        (cwd / "faults").mkdir()
        (cwd / "faults" / "sitecustomize.py").write_text(faults)
        env["PYTHONPATH"] = str(cwd / "faults")
    return subprocess.run(
        [sys.executable, "-m", "pyro_vae.cli", "train", "--devices", "2", "--accelerator", "cpu", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


@needs_lightning
def test_two_processes_train_one_model(tmp_path):
    # From the random output-bias start the loss falls fast and steadily; from the data's means (the default) it is
    # already near -207 nats and three epochs on 512 points barely move it.
    done = train(
        *SMALL, "--epochs", "3", "--output-bias", "random", "--out", str(tmp_path), "--name", "ddp", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "ddp"
    for name in ("config.json", "checkpoint.pt", "history.csv", "metrics.json", "figures/samples.png"):
        assert (run / name).exists(), name

    # The same run-directory format as one process: load_run rebuilds the trained model.
    loaded = pv.load_run(run)
    metrics = read_json(run / "metrics.json")
    assert loaded.epoch == 3 and metrics["world_size"] == 2
    # Every process's final parameters, hashed at the end: identical, and the ones saved.
    digests = metrics["replica_parameter_digests"]
    assert len(digests) == 2 and digests[0] == digests[1] == parameter_digest(loaded.model)

    # The loss falls: the training objective and the validation ELBO rise epoch on epoch.
    objectives = [row["train_objective"] for row in loaded.history[1:]]
    val_elbos = [row["val_elbo"] for row in loaded.history]
    assert objectives == sorted(objectives) and val_elbos == sorted(val_elbos), (objectives, val_elbos)
    assert val_elbos[-1] > val_elbos[0] + 50  # untrained: about -543 nats; after 3 epochs: about -455

    # A distributed run resumes on one process, like any other run.
    assert cli.main(["train", "--resume", str(run), "--epochs", "4", "--no-progress"]) == 0
    assert pv.load_run(run).epoch == 4


@needs_lightning
def test_a_distributed_run_never_overwrites_another(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "checkpoint.pt").write_bytes(b"an earlier run")
    done = train(*SMALL, "--epochs", "1", "--out", str(tmp_path), "--name", "taken", cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.count("already holds a run") == 2  # each process refuses it, none waits for the other
    assert (tmp_path / "taken" / "checkpoint.pt").read_bytes() == b"an earlier run"


@needs_lightning
def test_a_run_held_by_another_job_is_refused_by_every_process(tmp_path):
    """Process 0 alone took the lock: its refusal left process 1 waiting in a collective, which failed (gloo:
    "Connection closed by peer") or hung (NCCL). Every process now refuses, with the holder named."""
    assert (
        cli.main(["train", *SMALL, "--epochs", "1", "--eval-samples", "0", "--out", str(tmp_path), "--name", "r"]) == 0
    )
    with pv.RunDirectory(tmp_path / "r").lock():  # another job writing it
        done = train("--resume", str(tmp_path / "r"), "--epochs", "2", "--no-progress", cwd=tmp_path)
    assert done.returncode != 0
    assert "is being written by another process" in done.stderr, done.stderr[-3000:]
    assert "Process 0 could not take" in done.stderr and "Connection closed" not in done.stderr
    assert pv.load_run(tmp_path / "r").epoch == 1


#: Loaded by every process of the run below (``sitecustomize``, from PYTHONPATH): the disk fills after epoch 1.
FULL_DISK_AFTER_EPOCH_1 = """
from pyro_vae.runs.directory import RunDirectory

save_checkpoint = RunDirectory.save_checkpoint


def full_after_epoch_1(self, *, epoch, **kwargs):
    if epoch > 1:
        raise OSError(28, "No space left on device", str(self.path / "checkpoint.pt"))
    return save_checkpoint(self, epoch=epoch, **kwargs)


RunDirectory.save_checkpoint = full_after_epoch_1
"""


@needs_lightning
def test_a_write_that_fails_on_process_0_stops_every_process(tmp_path):
    """Process 0 alone writes the run: its failed checkpoint left process 1 in the next epoch's first
    collective, which failed (gloo: "Connection closed by peer") or hung (NCCL). Every process now stops with an
    error that says what failed, and the epochs saved before it are kept."""
    args = [*SMALL, "--epochs", "3", "--eval-samples", "0", "--out", str(tmp_path), "--name", "r"]
    done = train(*args, cwd=tmp_path, faults=FULL_DISK_AFTER_EPOCH_1)
    assert done.returncode != 0
    assert "No space left on device" in done.stderr, done.stderr[-3000:]  # process 0's own error
    assert "Process 0 failed to write the checkpoint of epoch 2 in" in done.stderr, done.stderr[-3000:]
    assert "Connection closed" not in done.stderr
    assert pv.load_run(tmp_path / "r").epoch == 1


#: Loaded by every process of the run below (``sitecustomize``): process 0's validation of epoch 2 fails.
VALIDATION_FAILS_AT_EPOCH_2 = """
from pyro_vae.training.engine import _Engine

start = _Engine.__init__


def started(self, *args, **kwargs):
    start(self, *args, **kwargs)
    validate, epochs = self.objective.validate, []

    def failing(model, data, prefix):
        if len(data) > 2:  # not the check of its metrics on two points at the start
            epochs.append(len(epochs))
            if epochs[-1] == 2 and self.processes.is_writer:
                raise RuntimeError("the validation blew up")
        return validate(model, data, prefix)

    self.objective.validate = failing


_Engine.__init__ = started
"""


@needs_lightning
def test_a_validation_that_fails_on_process_0_stops_every_process(tmp_path):
    """Validation runs on process 0 alone: its failure left process 1 in the next collective call."""
    args = [*SMALL, "--epochs", "3", "--eval-samples", "0", "--out", str(tmp_path), "--name", "r"]
    done = train(*args, cwd=tmp_path, faults=VALIDATION_FAILS_AT_EPOCH_2)
    assert done.returncode != 0
    assert "the validation blew up" in done.stderr, done.stderr[-3000:]  # process 0's own error
    assert "Process 0 failed to validate epoch 2; its error says why; the epochs saved before it are kept" in (
        done.stderr
    ), done.stderr[-3000:]
    assert "Connection closed" not in done.stderr
    assert pv.load_run(tmp_path / "r").epoch == 1


def test_a_strategy_that_does_not_replicate_the_model_by_re_running_the_command_is_refused(tmp_path, capsys):
    """ddp_spawn needs a function to start processes from (a TypeError deep in Lightning), FSDP and DeepSpeed
    shard the model the engine sums the gradients of: refused before anything starts, by the API and the CLI."""
    for strategy in ("ddp_spawn", "fsdp", "deepspeed"):
        with pytest.raises(ValueError, match=f"strategy '{strategy}' is not one a run can take; choose one of"):
            LightningProcesses(devices=2, strategy=strategy)
        with pytest.raises(SystemExit):
            cli.main(["train", "--devices", "2", "--strategy", strategy, "--out", str(tmp_path)])
        assert "argument --strategy: invalid choice" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_without_lightning_the_error_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lightning", None)  # import lightning now fails
    monkeypatch.setitem(sys.modules, "lightning.fabric", None)
    code = cli.main(["train", "--devices", "2", *SMALL, "--epochs", "1", "--out", str(tmp_path)])
    assert code == 2
    assert 'pip install "pyro-vae[distributed]"' in capsys.readouterr().err


class TwoProcesses(SingleProcess):
    """Process 0 of two, the other's step given: its totals (loss, points, batch share) are added by the
    all-reduce, and the weight this process gives its gradient in the global sum is recorded."""

    world_size = 2

    def __init__(self, others_totals):
        self.others_totals, self.weights = torch.tensor(others_totals, dtype=torch.float64), []

    def all_reduce(self, tensor):
        return tensor + self.others_totals

    def sum_gradients(self, parameters, weight=1.0):
        self.weights.append(weight)


def test_the_global_gradient_sums_summed_losses_and_weighs_whole_set_estimates_by_share(small_mnist):
    """The ELBO sums over each process's points: their gradients add up to the global batch's. M2's loss is an
    estimate of the whole set's on each process: their gradients are weighed by each one's share of the global
    batch. Averaging both over the processes gave the ELBO half its gradient, and gave M2's short last batch,
    all of it on one process, half of its."""
    data = small_mnist.subset(train=300)
    vae = small_vae()
    elbo = build_objective("trace")
    elbo.setup(vae, data, batch_size=4)
    processes = TwoProcesses([-400.0, 4, 4])
    take_step(vae, elbo, adam(vae.parameters(), 1e-3, torch.device("cpu")), data, torch.arange(4), processes=processes)
    assert processes.weights == [1.0]

    m2 = pv.SSVAE((1, 28, 28), 2, hidden=(8,))
    semi = build_objective({"name": "semi-supervised", "num_labels": 20, "classifier_steps": 0})
    semi.setup(m2, data, batch_size=4)
    optimizer = adam(m2.parameters(), 1e-3, torch.device("cpu"))
    # one point here, and none, one or three on the other process: a short last batch, even and uneven shares
    for others_share, weight in ((0, 1.0), (1, 0.5), (3, 0.25)):
        processes = TwoProcesses([-100.0, semi.num_data, others_share])
        take_step(m2, semi, optimizer, data, semi.unlabelled[:1], processes=processes)
        assert processes.weights == [weight]
