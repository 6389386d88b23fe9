"""The training engine: one loop for every model and objective.

:func:`fit` trains any :class:`~pyro_vae.models.Model` (a VAE, M2, M1+M2, or
a model of the user's) with any :class:`~pyro_vae.infer.objective.Objective`
(the ELBO, the IWAE bound, the semi-supervised J) by stochastic variational
inference: each step computes the objective's differentiable loss of the
model and guide on a minibatch and takes one Adam step over all the model's
parameters. That is what ``SVI(model, guide, pyro.optim.Adam(...), loss).step``
does, with one torch optimiser instead of one per parameter.

Whatever the model and objective, the engine guarantees:

* **exact resume**: a checkpoint after every epoch holds the model, the
  optimiser, the objective's state, every random number generator, the
  history and, after Ctrl-C, the position within the epoch (its batch order
  and running totals); ``resume=True`` continues bit for bit as if the run
  had never stopped;
* **Ctrl-C** finishes the current step, saves that position and raises
  :class:`TrainingInterrupted`, whose message is the command that resumes;
* **a non-finite loss** leaves the parameters untouched and raises
  :class:`TrainingDiverged`, naming the epoch, the step and the fix; the
  last checkpoint on disk is kept;
* **the best checkpoint** by the objective's ``validation_metric`` where it
  has one (the bound L_K for IWAE), else the model's (the validation ELBO
  for a VAE, the accuracy for M2), in ``best.pt``; at the end
  the model holds the best epoch's weights and ``metrics.json`` their test
  evaluation;
* a progress bar, and one summary line per epoch even without it;
* **a compiled step** (``compile=True``, or ``"auto"`` for runs of at least
  :data:`AUTO_COMPILE_STEPS` steps, long enough to pay back the seconds that
  compiling takes): after the first step, which runs
  eagerly with Pyro's validation on, every full-size step replays the loss
  and its gradient recorded once and compiled by TorchInductor
  (:mod:`pyro_vae.accel.training_step`), with the eager step's random draws;
  a shorter last batch runs eagerly. The compile time is shown and recorded
  in the history (``compile_seconds``). Whether a step runs compiled depends
  only on its position, so a resumed run takes the same path as one that
  never stopped;
* **one writer**: the run directory is locked while the run writes it;
* **several starts** (``starts``): each start is a run of its own in
  ``run_dir/starts/``, with all of the above, and the best by the validation
  metric after ``start_epochs`` is continued as the run.

With ``ema_decay`` the run validates, keeps and returns an exponential
moving average of its weights over the steps (:mod:`.averaging`), while the
gradients are taken at the iterates, which the checkpoints hold beside the
average for an exact resume.

``matmul_precision`` (:mod:`.precision`) may let the optimisation's float32
matrix products round their inputs to bfloat16 or TensorFloat-32 where the
hardware multiplies those faster; validation and evaluation keep the
caller's precision.

A fresh run starts the decoder's output bias at the likelihood's constant
fit to the training points (``output_bias="data"``,
:meth:`~pyro_vae.models.Model.start_output_bias`), as Burda et al.'s code
does; ``"random"`` keeps the networks' random start.

KL warm-up and beta: the KL weight ``beta * min(1, (step + 1) / warmup_steps)`` at 0-based ``step``
(:mod:`.schedules`) reaches the latent sites through ``poutine.scale``. The
validation numbers are always the true ELBO, with unscaled densities.
Adam's learning rate follows ``lr_schedule`` (:mod:`.schedules`), set at the
start of every epoch from the epoch and the run's epochs, so a resumed run takes the same rates.
Several processes (Lightning DDP) run this same loop; :mod:`.parallel` holds
what differs.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import numbers
import time
import warnings
from pathlib import Path

import numpy as np
import pyro
import torch
from tqdm.auto import tqdm

from .._version import __version__
from ..accel.training_step import CompiledStep
from ..checks import is_whole_number
from ..data import Dataset, is_data_file, make_dataset
from ..infer import build_objective, log_marginal_likelihood
from ..infer.objective import Objective, completed_objective_config
from ..models import Model, build_model
from ..runs.directory import RunDirectory, model_config_matches
from ..runs.files import CheckpointError, atomic_write_bytes, read_json, restore_rng, rng_state, write_json
from .averaging import WeightAverage
from .interrupts import InterruptRequests
from .parallel import ProcessFailed, ReplicasDiverged, SingleProcess, parameter_digest, points_digest
from .precision import MATMUL_PRECISIONS, float32_matmul_precision
from .schedules import LR_SCHEDULES, kl_weight_schedule, length_conflict


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(RuntimeError):
    """Training stopped at a SIGINT (Ctrl-C) after finishing its current step and saving."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` picks CUDA when there is a GPU; a device that is not here, or that training does not run on
    (cpu and cuda), gets a clear error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"Unknown device {device!r}; use cpu, cuda, cuda:N or auto.") from err
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"Device {str(device)!r} is not supported; use cpu, cuda, cuda:N or auto.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but PyTorch sees no GPU here; use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= (count := torch.cuda.device_count()):
        raise ValueError(f"--device {device} was asked for, but PyTorch sees {count} GPU(s) here; give an index "
                         f"below {count}.")  # fmt: skip
    return device


def adam(parameters, lr: float, device: torch.device) -> torch.optim.Adam:
    """torch's Adam, fused into one kernel for all parameters where torch has one (CPU and CUDA)."""
    return torch.optim.Adam(parameters, lr=lr, fused=device.type in ("cpu", "cuda"))


#: Adam's moment estimates, the optimiser state that :func:`flush_subnormal_moments` clears.
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def flush_subnormal_moments(optimizer: torch.optim.Optimizer) -> None:
    """Set Adam's moment estimates that lie below their dtype's smallest normal number to zero.

    A parameter whose gradient stays exactly zero (the weights of a ReLU unit
    that no longer fires) has its first moment m decay by beta1 every step
    into the subnormal numbers, where rounding to nearest holds it at a few
    multiples of the smallest one for ever (0.9 x 4 x 2^-149 rounds to
    4 x 2^-149); the second moment v follows more slowly. A CPU takes a
    microcode assist on every subnormal operand, so a fused Adam step over
    such a state runs several times slower. Zeroing them is what flush-to-zero
    arithmetic does, for the optimiser's state alone.

    Adam's update is lr m_hat / (sqrt(v_hat) + eps), with m_hat = m / (1 - beta1^t)
    and v_hat = v / (1 - beta2^t). Zeroing an m below 2^-126 changes it by at
    most lr 2^-126 / ((1 - beta1) eps), below 2^-96 for lr <= 1 and eps = 1e-8;
    zeroing a v below 2^-126 changes sqrt(v_hat) by at most 2^-63 / sqrt(1 - beta2),
    below 2^-58, against eps = 1e-8: a relative change of the denominator below
    2^-31, under float32's rounding. So a parameter whose gradient is zero (the
    dead unit's, whose update is itself below 2^-96) does not move, and any
    other parameter above 2^-72 in magnitude moves by at most one unit in the
    last place, where the update lands on a rounding tie.
    """
    for state in optimizer.state.values():
        for name in ADAM_MOMENTS:
            if name in state:
                moment = state[name]
                moment.masked_fill_(moment.abs() < torch.finfo(moment.dtype).tiny, 0.0)


def as_dataset(data) -> Dataset:
    """``data`` itself, or a tensor or array of points ``(N, *x_shape)`` wrapped by :func:`pyro_vae.make_dataset`."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, torch.Tensor | np.ndarray):
        return make_dataset(data)
    raise TypeError(
        f"fit needs a pv.Dataset, or a tensor or array of shape (N, *x_shape); got {type(data).__name__}. "
        "Build a Dataset with pv.load_dataset(...) or pv.make_dataset(x, y)."
    )


def as_objective(objective, model: Model) -> Objective:
    """An :class:`Objective`, from itself, a short name, a config dict, or None (the model's default)."""
    if isinstance(objective, Objective):
        return objective
    return build_objective(model.default_objective if objective is None else objective)


def check_settings(objective: Objective, **settings) -> None:
    """Refuse impossible training settings before any work, naming the valid range."""
    real = lambda value: isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)  # noqa: E731
    checks = {
        "epochs": (is_whole_number(settings["epochs"]) and settings["epochs"] >= 0, "an integer >= 0"),
        "batch_size": (is_whole_number(settings["batch_size"]) and settings["batch_size"] >= 1, "an integer >= 1"),
        "lr": (real(settings["lr"]) and settings["lr"] > 0, "a number > 0"),
        "lr_schedule": (settings["lr_schedule"] in LR_SCHEDULES, f"one of {', '.join(map(repr, LR_SCHEDULES))}"),
        "beta": (real(settings["beta"]) and settings["beta"] > 0, "a number > 0"),
        "warmup_epochs": (real(settings["warmup_epochs"]) and settings["warmup_epochs"] >= 0, "a number >= 0"),
        "eval_samples": (
            is_whole_number(settings["eval_samples"]) and settings["eval_samples"] >= 0,
            "an integer >= 0 (0 skips the test log p(x))",
        ),
        "output_bias": (settings["output_bias"] in OUTPUT_BIAS_STARTS, f"one of {OUTPUT_BIAS_STARTS}"),
        "matmul_precision": (
            settings["matmul_precision"] in MATMUL_PRECISIONS,
            f"one of {', '.join(map(repr, MATMUL_PRECISIONS))}",
        ),
        "seed": (
            is_whole_number(settings["seed"]) and 0 <= settings["seed"] <= MAX_SEED,
            f"an integer from 0 to {MAX_SEED}",
        ),
        "ema_decay": (
            real(settings["ema_decay"]) and 0 <= settings["ema_decay"] < 1,
            "a number from 0 (no averaging) to below 1",
        ),
        "starts": (
            is_whole_number(settings["starts"]) and settings["starts"] >= 1,
            "an integer >= 1 (1: the run from its seed alone)",
        ),
        "start_epochs": (
            is_whole_number(settings["start_epochs"]) and 1 <= settings["start_epochs"],
            "an integer >= 1 (the epochs of each start before the choice)",
        ),
    }
    for name, (valid, what) in checks.items():
        if not valid:
            raise ValueError(f"{name} must be {what}; got {settings[name]!r}.")
    if settings["starts"] > 1 and settings["start_epochs"] > settings["epochs"]:
        raise ValueError(
            f"start_epochs ({settings['start_epochs']}) must not exceed the run's epochs ({settings['epochs']}): the "
            "starts are the first epochs of the run."
        )
    if settings["seed"] + settings["starts"] - 1 > MAX_SEED:
        raise ValueError(f"the starts' seeds run from seed to seed + starts - 1, which must not exceed {MAX_SEED}.")
    if not objective.supports_kl_weight and (settings["warmup_epochs"] or settings["beta"] != 1.0):
        raise ValueError(
            f"KL warm-up and beta do not apply to the {objective.name!r} objective; use the 'trace' ELBO for them."
        )


def take_step(
    model: Model,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    data: Dataset,
    indices: torch.Tensor,
    *,
    kl_weight: float = 1.0,
    processes: SingleProcess | None = None,
    compiled: CompiledStep | None = None,
) -> tuple[float, float]:
    """One step of stochastic variational inference on the points at ``indices``, over every process.

    Returns the loss summed over the processes and the number of points it
    stands for. The same update as ``SVI(model.model, model.guide,
    pyro.optim.Adam(...), loss).step(x)`` (``tests/test_train.py`` checks that
    the parameters agree), with one torch optimiser over all parameters. A
    non-finite loss leaves the parameters untouched. With ``compiled`` (from
    :func:`compiled_step`) the loss and gradient come from its replay wherever
    it has one.
    """
    processes = processes or SingleProcess()
    optimizer.zero_grad(set_to_none=True)
    if len(indices):
        batch = objective.batch(data, indices)
        replayed = None
        if compiled is not None:
            replayed = compiled(*batch, torch.tensor(kl_weight, dtype=batch[0].dtype, device=batch[0].device))
        if replayed is None:
            loss = objective.loss(model, *batch, kl_weight=kl_weight)
            loss.backward()
        else:
            loss, gradients = replayed
            for parameter, gradient in zip(compiled.parameters, gradients, strict=True):
                parameter.grad = gradient
        total, count = loss.item(), objective.points(batch)
    else:  # a process whose share of a short last batch is empty: no gradient, but every collective
        total, count = 0.0, 0
    weight = 1.0  # of this process's gradient in the global batch's
    if processes.world_size > 1:
        totals = torch.tensor([total, float(count), float(len(indices))], dtype=torch.float64, device=processes.device)
        total, count, global_batch = processes.all_reduce(totals).tolist()
        if objective.loss_scaled_to_data:  # each process's loss estimates the whole set's: weigh them by share
            weight = len(indices) / global_batch
    if math.isfinite(total):
        processes.sum_gradients([p for p in model.parameters() if p.requires_grad], weight)
        optimizer.step()
    return total, count


def compiled_step(model: Model, objective: Objective) -> CompiledStep:
    """The :class:`~pyro_vae.accel.training_step.CompiledStep` of ``objective``'s loss that :func:`take_step` replays.

    Its inputs are the tensors of ``objective.batch`` followed by the KL weight as a 0-d tensor.
    """
    return CompiledStep(lambda *inputs: objective.loss(model, *inputs[:-1], kl_weight=inputs[-1]), model)


#: The seed and batch size of the test log p(x) that a run with ``eval_samples`` estimates when it finishes
#: (``pyro-vae evaluate RUN --samples K`` at its defaults makes the same numbers).
TEST_LOG_PX_SEED, TEST_LOG_PX_BATCH = 0, 100
#: With ``compile="auto"``, runs of at least this many steps are compiled: in shorter runs compiling
#: costs more than the replays save (benchmarks/RESULTS.md, "Training speed").
AUTO_COMPILE_STEPS = 2000

#: How a fresh run starts the decoder's output bias: at the likelihood's constant fit to the training
#: points, or where the networks' random initialisation put it.
OUTPUT_BIAS_STARTS = ("data", "random")
#: The largest seed: numpy's seeds are 0 to 2^32 - 1, and pyro.set_rng_seed sets numpy's too.
MAX_SEED = 2**32 - 1

#: The values of settings added to ``fit`` after runs were written without them: what those runs did (the
#: random start of the output bias, no learning-rate schedule, float32 products, no averaging).
LEGACY_SETTINGS = {
    "output_bias": "random", "lr_schedule": "constant", "matmul_precision": "highest", "ema_decay": 0.0, "starts": 1,
}  # fmt: skip
#: Training settings that a resumed run must share with the run it continues.
RESUMED_SETTINGS = (
    "batch_size", "lr", "lr_schedule", "objective", "warmup_epochs", "beta", "seed", "matmul_precision", "ema_decay",
    "starts",
)  # fmt: skip


def training_seconds(history: list[dict]) -> float:
    """The seconds of a run's epochs, their validation included (row 0, the start, has none)."""
    return sum(row["seconds"] + row.get("val_seconds", 0.0) for row in history[1:])


def check_same_training(run: RunDirectory, saved: dict, current: dict) -> None:
    """Refuse to resume a run with other training settings than its own (the epoch target may change)."""
    saved, current = {**LEGACY_SETTINGS, **saved}, {**LEGACY_SETTINGS, **current}
    for settings in (saved, current):
        if isinstance(settings.get("objective"), dict):
            settings["objective"] = completed_objective_config(settings["objective"])
    compared = (*RESUMED_SETTINGS, "start_epochs") if saved["starts"] > 1 else RESUMED_SETTINGS
    changed = [key for key in compared if key in saved and saved[key] != current.get(key)]
    if changed:
        details = ", ".join(f"{key} {saved[key]!r} -> {current[key]!r}" for key in changed)
        raise CheckpointError(
            f"{run.path} was trained with other settings ({details}); resume it with its own "
            "(pv.resume_run, or pyro-vae train --resume), or start a new run."
        )


def data_points(data) -> dict[str, int]:
    """The number of points in each split, which a run records beside its data's spec."""
    return {split: len(getattr(data, split)) for split in ("train", "val", "test")}


def data_digests(data) -> dict[str, dict[str, str | None]]:
    """The digests of each split's points ``x`` and labels ``y`` (None without), which a run records: a data file
    changed in place (the same name and counts, other values) is refused when the run is resumed or evaluated."""
    return {
        name: {"x": points_digest(split.x), "y": None if split.y is None else points_digest(split.y)}
        for name, split in (("train", data.train), ("val", data.val), ("test", data.test))
    }


def _what_the_data_are(spec: dict) -> dict:
    """A data set's spec without where its files are: no ``data_dir``, a data file by its file name (runs before
    2026-12-06 recorded the path as typed, later ones the absolute path), and no subset as ``subset`` None."""
    spec = {key: value for key, value in spec.items() if key != "data_dir"}
    if is_data_file(spec.get("name", "")):
        spec["name"] = Path(spec["name"]).name
    return {"subset": None, **spec}


def check_same_data(run: RunDirectory, saved: dict, current: dict) -> None:
    """Refuse to resume a run on other data than its own: another data set, binarisation, split or subset (where
    the files are may change: ``data_dir``, a data file's folder), or other numbers of points (tensors of one's
    own have no spec). Runs written before the counts were recorded are checked on their spec alone."""
    saved_spec, spec = saved.get("data"), current["data"]
    changed = []
    if saved_spec is not None and spec is not None:
        saved_spec, spec = _what_the_data_are(saved_spec), _what_the_data_are(spec)
        shared = sorted(saved_spec.keys() & spec.keys())  # keys a spec of older runs lacks are not compared
        changed += [f"{key} {saved_spec[key]!r} -> {spec[key]!r}" for key in shared if saved_spec[key] != spec[key]]
    elif (saved_spec is None) != (spec is None):
        changed.append(f"data {saved_spec!r} -> {spec!r}")
    if (counts := saved.get("data_points")) is not None and counts != current["data_points"]:
        changed.append(f"points {counts} -> {current['data_points']}")
    if changed:
        raise CheckpointError(
            f"{run.path} was trained on other data ({', '.join(changed)}); resume it on its own data (pv.resume_run "
            "and pyro-vae train --resume rebuild it from the run's config), or start a new run."
        )
    digests = saved.get("data_digests") or {}  # runs written before 2026-12-07 did not record them
    read = ("x", "y") if current["train"]["objective"]["name"] == "semi-supervised" else ("x",)  # what it trains on
    differ = [
        f"{split} {'points' if part == 'x' else 'labels'}"
        for split, recorded in digests.items()
        for part in read
        if recorded[part] != current["data_digests"][split][part]
    ]
    if differ:
        raise CheckpointError(
            f"{run.path} was trained on other values of the same data: its {', '.join(differ)} differ from those it "
            f"recorded{_where(current['data'])}. Restore the data it was trained on, or start a new run."
        )


def _where(spec: dict | None) -> str:
    """Where a data set's values come from, in words, for a message (a data file's path)."""
    if spec is None:
        return " (the tensors given)"
    return f" ({spec['name']})" if is_data_file(spec["name"]) else ""


def fit(
    model: Model,
    data,
    *,
    objective: Objective | str | dict | None = None,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 1e-3,
    lr_schedule: str = "constant",
    warmup_epochs: float = 0.0,
    beta: float = 1.0,
    seed: int = 0,
    output_bias: str = "data",
    device: str | torch.device | None = "cpu",
    run_dir: str | Path | None = None,
    resume: bool = False,
    eval_samples: int = 0,
    progress: bool = True,
    processes: SingleProcess | None = None,
    compile: bool | str = "auto",
    matmul_precision: str = "highest",
    ema_decay: float = 0.0,
    starts: int = 1,
    start_epochs: int = 5,
    stop_after: int | None = None,
) -> list[dict]:
    """Train ``model`` on ``data`` and return the history, one dict per epoch.

    Row 0 evaluates the model before training (after the objective's
    :meth:`~Objective.start`). Each row holds ``train_objective`` (the mean
    annealed objective per point over the epoch's batches),
    ``kl_weight``, the objective's validation metrics (``val_elbo`` and its
    terms; ``val_accuracy`` for the semi-supervised objective), ``seconds``
    (the optimisation pass), ``val_seconds`` (the validation) and, with
    ``compile``, ``compile_seconds`` (the part of ``seconds`` spent
    recording and compiling the step, in the epoch that did it). An epoch
    stopped part-way and resumed counts the seconds of both parts.

    :param data: a :class:`~pyro_vae.data.Dataset`, or a tensor or array of points.
    :param objective: an :class:`~pyro_vae.infer.objective.Objective`, its short name
        (``"trace"``, ``"meanfield"``, ``"iwae"``, ``"semi-supervised"``) or config
        dict (``{"name": "iwae", "num_particles": 50}``); by default the model's own.
    :param lr: Adam's learning rate, or the base rate of ``lr_schedule``.
    :param lr_schedule: the learning rate by epoch, one of
        :data:`~pyro_vae.training.schedules.LR_SCHEDULES`: ``"constant"``, ``"iwae"`` (Burda et
        al.'s 3^i epochs at ``lr * 10^(-i/7)``), ``"cosine"`` (annealed from ``lr`` towards 0 over
        the run's ``epochs``) or ``"step"`` (``lr / 10`` for the last tenth of the run's ``epochs``);
        a cosine or step run resumes only to the same ``epochs``.
    :param warmup_epochs: epochs over which the KL weight rises linearly to ``beta``.
    :param beta: final weight of the KL term (1 gives the ELBO).
    :param output_bias: ``"data"`` starts a fresh run's decoder output bias at the likelihood's
        constant fit to the training points (:meth:`~pyro_vae.models.Model.start_output_bias`;
        models and likelihoods without one keep their random start, and the config records
        ``"random"``); ``"random"`` always keeps it.
    :param run_dir: write config, checkpoints, history and metrics here.
    :param resume: continue from ``run_dir``'s checkpoint up to ``epochs`` in all.
    :param eval_samples: K of a test log p(x) of the best checkpoint in ``metrics.json`` and
        ``test_log_px.npy`` (with ``run_dir``), seed 0 and batches of 100 as ``pyro-vae evaluate RUN --samples
        K`` makes it; 0 skips it. A resumed run whose best weights are those of its headline keeps it where it
        was made with at least K samples; one made with fewer is kept apart as the evaluation ``is-K<its K>``.
    :param processes: :class:`~pyro_vae.training.parallel.LightningProcesses` to train on several.
    :param compile: True replays every full-size step after the first
        compiled (:mod:`pyro_vae.accel.training_step`); False runs every step
        eagerly; ``"auto"`` compiles runs of at least :data:`AUTO_COMPILE_STEPS`
        steps (``epochs`` times the steps per epoch), and a resumed run as the
        run it continues was (its config's ``compile``).
    :param matmul_precision: the precision of the optimisation's float32 matrix products,
        one of :data:`~pyro_vae.training.precision.MATMUL_PRECISIONS`: ``"highest"``
        (float32), ``"high"`` (TensorFloat-32 where the hardware has it) or ``"medium"``
        (bfloat16 inputs, float32 sums, where the hardware has them); used for the
        objective's start and every step, whatever the caller set, and not for
        validation or evaluation, which keep the caller's setting
        (:mod:`pyro_vae.training.precision`). A run resumes only with its own.
    :param ema_decay: d of the exponential moving average of the weights over the steps
        (:mod:`~pyro_vae.training.averaging`, Kingma & Ba's temporal averaging, its decay warmed
        up as min(d, t / (t + 9)) at step t) that the run validates, keeps as its best and
        returns; 0 keeps the iterates themselves. A run resumes only with its own.
    :param starts: with more than 1, train that many starts of the run for ``start_epochs`` epochs, each with
        its own seed (``seed``, ``seed + 1``, ...), the first from the model's weights and the others from
        weights drawn under their seed, in ``run_dir/starts/``, and continue the one whose validation metric
        is best at that epoch; the run is then that start's, epoch for epoch, and ``metrics.json`` names its
        seed (``start_seed``). Needs ``run_dir``, one process, and a model that its config describes.
    :param start_epochs: how many of the run's epochs each start trains before the choice (at most ``epochs``).
    :param stop_after: return after this epoch without finishing (no test metrics; resuming without it
        goes on to ``epochs`` at the rates of a run of ``epochs``, and finishes), the model holding the weights
        it trains (the iterates, where ``ema_decay`` averages them); a run of several starts returns after its
        choice at the earliest. None trains to ``epochs`` and finishes.
    """
    objective = as_objective(objective, model)
    settings = dict(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        lr_schedule=lr_schedule,
        warmup_epochs=warmup_epochs,
        beta=beta,
        eval_samples=eval_samples,
        output_bias=output_bias,
        matmul_precision=matmul_precision,
        ema_decay=ema_decay,
        starts=starts,
        start_epochs=start_epochs,
    )
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile must be True, False or 'auto'; got {compile!r}.")
    check_settings(objective, seed=seed, **settings)
    if resume and run_dir is None:
        raise ValueError("resume=True needs the run_dir to resume from.")
    if stop_after is not None and not (is_whole_number(stop_after) and stop_after >= 0):
        raise ValueError(f"stop_after must be None or an epoch >= 0; got {stop_after!r}.")
    if starts > 1 and run_dir is None:
        raise ValueError(f"starts={starts} trains each start in run_dir/starts/; give run_dir.")
    if starts > 1 and not model.describable:
        raise ValueError(
            f"starts={starts} draws each start's weights by rebuilding the model from its config, which cannot "
            "describe networks of one's own; train one start (starts=1), or several runs with their own seeds."
        )
    if starts > 1 and processes is not None and processes.world_size > 1 and not RunDirectory(run_dir).holds_run():
        raise ValueError(
            f"starts={starts} trains its starts on one process; train them without several processes (a run whose "
            "start is chosen resumes on several)."
        )
    if eval_samples and run_dir is None:
        raise ValueError(
            "eval_samples writes the test log p(x) into the run directory's metrics.json; give run_dir, or estimate "
            "it with pv.log_marginal_likelihood after training."
        )
    processes = processes or SingleProcess()
    device = processes.device or resolve_device(device)
    data = as_dataset(data)
    run = None if run_dir is None else RunDirectory(run_dir)
    if run is not None:  # before the data moves or the model is checked; on every process, which all refuse alike
        if resume:
            run.check_resumable()
            run.check_weights(resuming=True)
        else:
            run.check_fresh()  # before the lock makes the folder, so that a refused run leaves nothing behind
    if resume and compile == "auto":  # a resumed run steps as the run it continues did, compiled or eager
        compile = run.read_config()["train"].get("compile", "auto")
    engine = _Engine(model, data.to(device), objective, processes, device, settings, seed, progress, compile)
    if run is None:
        return engine.train(run, resume, stop_after)
    with contextlib.ExitStack() as held:
        refused = None
        if processes.is_writer:
            try:
                held.enter_context(run.lock())
                if not resume:
                    run.check_fresh()  # again: another process may have started it meanwhile
            except CheckpointError as err:
                refused = err
        # process 0 tells the others whether it holds the run, before any of them waits for it in a collective
        if processes.broadcast(torch.tensor(float(refused is not None), device=processes.device)).item():
            raise refused or CheckpointError(f"Process 0 could not take {run.path} for writing; its error says why.")
        return engine.train(run, resume, stop_after)


class _Engine:
    """One call of :func:`fit`: the model, data, objective and optimiser, and the loop over them."""

    def __init__(self, model, data, objective, processes, device, settings, seed, progress, compile):
        self.model, self.data, self.objective, self.processes = model, data, objective, processes
        self.device, self.settings, self.seed, self.progress = device, settings, seed, progress
        model.to(device)
        model.check_dataset(data)
        objective.setup(model, data, batch_size=settings["batch_size"])
        self.metric = objective.validation_metric or model.validation_metric
        self._check_validation_metric()  # in every process, before the first collective call
        processes.share(model)
        self.optimizer = adam(model.parameters(), settings["lr"], device)
        self.average = WeightAverage(model, settings["ema_decay"]) if settings["ema_decay"] else None
        self.points = objective.training_points(data)
        self.global_batch = settings["batch_size"] * processes.world_size
        self.steps_per_epoch = math.ceil(len(self.points) / self.global_batch)
        self.warmup_steps = round(settings["warmup_epochs"] * self.steps_per_epoch)
        if self.warmup_steps > (steps := settings["epochs"] * self.steps_per_epoch) > 0:  # resuming can finish it
            warnings.warn(
                f"The KL warm-up (warmup_epochs, --warmup-epochs {settings['warmup_epochs']:g}) is longer than the "
                f"{settings['epochs']} epochs: the KL weight reaches only {steps / self.warmup_steps:.2g} of beta "
                f"by the last step. Train for {math.ceil(settings['warmup_epochs'])} epochs or more (resume this run "
                "with --epochs) to finish it.",
                UserWarning,
                stacklevel=3,
            )
        if compile == "auto":
            compile = settings["epochs"] * self.steps_per_epoch >= AUTO_COMPILE_STEPS
        self.compiled = compiled_step(model, objective) if compile else None
        self.config = {
            "pyro_vae_version": __version__,
            "model": model.config() if model.describable else None,
            "data": data.spec,
            "data_points": data_points(data),
            "data_digests": data_digests(data),
            "train": {
                "epochs": settings["epochs"],
                "batch_size": settings["batch_size"],
                "lr": settings["lr"],
                "lr_schedule": settings["lr_schedule"],
                "objective": objective.config(),
                "warmup_epochs": settings["warmup_epochs"],
                "beta": settings["beta"],
                "seed": seed,
                "output_bias": settings["output_bias"],
                "device": str(device),
                "compile": compile,
                "matmul_precision": settings["matmul_precision"],
                "ema_decay": settings["ema_decay"],
                "eval_samples": settings["eval_samples"],
                "starts": settings["starts"],
                "start_epochs": settings["start_epochs"],
            },
        }
        if processes.config() is not None:
            self.config["distributed"] = processes.config()
        self.history: list[dict] = []
        self.best_epoch, self.best_state = 0, None
        self.run: RunDirectory | None = None  # the run directory on process 0, its one writer
        self.source: RunDirectory | None = None  # the run directory on every process, which all read

    def _check_validation_metric(self) -> None:
        """Refuse, before any work, an objective whose validation lacks the metric that picks the best epoch
        (M2's ``val_accuracy`` under a plain ELBO): every epoch would count as the best."""
        measured = self.objective.validate(self.model, self.data.val.subset(2), "val_")
        if self.metric not in measured:
            raise ValueError(
                f"A {type(self.model).__name__} picks its best epoch by {self.metric}, which the "
                f"{self.objective.name!r} objective does not measure (it gives {', '.join(sorted(measured))}); "
                f"train it with its own objective, {self.model.default_objective!r} (a run begun with another one "
                "cannot be continued: start a new run)."
            )

    # --------------------------------------------------------------- start
    def train(self, run: RunDirectory | None, resume: bool, stop_after: int | None = None) -> list[dict]:
        self.run = run if self.processes.is_writer else None
        self.source = run
        epochs = self.settings["epochs"]
        last = epochs if stop_after is None else min(stop_after, epochs)
        if self.settings["starts"] > 1 and not (resume and run.holds_run()):
            self.choose_start(run, resume)
            resume = True
        elif self.settings["starts"] > 1:
            self._drop_starts_weights(run)  # what a stop between the choice and its clean-up left
        with InterruptRequests() as interrupt:  # a Ctrl-C while starting stops after the first step, saved
            position, start_epoch = self._resume(run) if resume else self._start_fresh()
            for epoch in range(start_epoch + 1, last + 1):
                self._train_epoch(epoch, position, interrupt)
                position = None
                if self._interrupted(interrupt) and (epoch < epochs or stop_after is not None):
                    raise self._interruption(f"after epoch {epoch}")
        if stop_after is None:
            self._finish()
        return self.history

    def choose_start(self, run: RunDirectory, resume: bool) -> None:
        """Train each of the run's starts for ``start_epochs`` epochs, and make the best of them this run.

        Start k is this run with the seed ``seed + k``: the first from the model's weights as given, the
        others from weights drawn under their seed (:meth:`_start_weights`), each with its own start of the
        objective (M2's classifier from the labels), batch order and draws. Each is a run of its own in
        ``starts/seed-S/``, so that Ctrl-C, resuming and a non-finite loss work there as in any run, paused
        after ``start_epochs`` of this run's ``epochs`` (the rates of the whole run's schedule). A start whose
        loss diverges is left out of the choice (resumed, it diverges again at the same step). The start
        whose validation metric is best at that epoch (the first of equals) becomes this run: its
        checkpoints are copied here (:meth:`RunDirectory.continue_from`) and training resumes from them, so
        the run is, epoch for epoch, the chosen start's.
        ``starts/starts.json`` records every start's metric and seconds and the choice; the starts keep
        their config and history, not their weights. The model's weights as given are written first
        (``starts/initial.pt``, removed after the choice), so that a stopped choice resumes with them.
        """
        folder, initial = run.file(run.STARTS), run.file(run.STARTS) / run.INITIAL_WEIGHTS
        if resume:  # a choice stopped part-way goes on as it began
            saved = run.read_config()
            self._check_continues(run, saved)
            self.settings["output_bias"] = saved["train"]["output_bias"]
        else:
            run.write_config(self.config)
            folder.mkdir(exist_ok=True)
        starts, epochs = self.settings["starts"], self.settings["start_epochs"]
        with InterruptRequests() as interrupt:  # between the starts, and while they are compared and copied
            if not initial.exists():  # no start can have begun before this file was written
                buffer = io.BytesIO()
                torch.save(self.model.state_dict(), buffer)
                atomic_write_bytes(initial, buffer.getvalue())
            weights = torch.load(initial, map_location=self.device, weights_only=True)
            trained = []
            for k in range(starts):
                seed, start = self.seed + k, run.start(self.seed + k)
                where = f"in start {k + 1} of {starts} (seed {seed})"
                diverged = None
                if not start.holds_run() or start.load_checkpoint("last")["epoch"] < epochs:
                    tqdm.write(f"start {k + 1} of {starts} (seed {seed}): {epochs} epochs in {start.path}")
                    diverged = self._train_start(start, seed, self._start_weights(k, weights), where)
                if interrupt.requested:
                    raise self._interruption(f"after start {k + 1} of {starts}")
                if diverged is not None:
                    tqdm.write(f"start {k + 1} of {starts} (seed {seed}) diverged and is left out: {diverged}")
                    trained.append({"seed": seed, self.metric: None, "diverged": str(diverged)})
                    continue
                history = start.load_checkpoint("last")["history"]
                score = next(row for row in history if row["epoch"] == epochs)[self.metric]
                trained.append({"seed": seed, self.metric: score, "seconds": training_seconds(history)})
            candidates = [start for start in trained if start[self.metric] is not None]
            if not candidates:
                raise TrainingDiverged(
                    f"Every start of {run.path} diverged ({starts} of them); start a new run with a lower learning "
                    f"rate (now {self.settings['lr']:g})."
                )
            chosen = max(candidates, key=lambda start: start[self.metric])
            record = {"metric": self.metric, "epoch": epochs, "starts": trained, "chosen_seed": chosen["seed"]}
            write_json(folder / run.STARTS_RECORD, record)
            # how the chosen start began its decoder's output bias (a model without a constant fit: "random")
            self.config["train"]["output_bias"] = run.start(chosen["seed"]).read_config()["train"]["output_bias"]
            run.continue_from(run.start(chosen["seed"]), self.config)
            self._drop_starts_weights(run)
            scores = ", ".join("diverged" if s[self.metric] is None else f"{s[self.metric]:.4f}" for s in trained)
            tqdm.write(
                f"continuing the start of seed {chosen['seed']}: {self.metric} {chosen[self.metric]:.4f} at epoch "
                f"{epochs}, the best of the {starts} starts' ({scores})"
            )
            if interrupt.requested:
                raise self._interruption(f"after the choice of the start of seed {chosen['seed']}")

    def _start_weights(self, k: int, given: dict) -> dict:
        """The weights start ``k`` begins from: the model's as given for the first; for the others the parameters
        that train drawn afresh under the seed ``seed + k`` (the model rebuilt from its config), and the
        rest (a frozen M1, buffers) as given."""
        if k == 0:
            return given
        pyro.set_rng_seed((self.seed + k) % 2**32)
        fresh = build_model(self.model.config()).state_dict()
        trains = {name for name, parameter in self.model.named_parameters() if parameter.requires_grad}
        return {name: fresh[name].to(value.device) if name in trains else value for name, value in given.items()}

    def _train_start(self, start: RunDirectory, seed: int, weights: dict, where: str) -> TrainingDiverged | None:
        """Train (or resume) one start to ``start_epochs``: a run of its own from ``weights`` with ``seed``."""
        model = copy.deepcopy(self.model)
        model.load_state_dict(weights)
        settings = {key: value for key, value in self.settings.items() if key not in ("starts", "eval_samples")}
        try:
            fit(
                model, self.data, objective=copy.deepcopy(self.objective), seed=seed, run_dir=start.path,
                resume=start.holds_run(), stop_after=self.settings["start_epochs"], device=self.device,
                progress=self.progress, compile=self.config["train"]["compile"], **settings,
            )  # fmt: skip
        except TrainingInterrupted:
            raise self._interruption(where) from None
        except TrainingDiverged as err:
            return err
        return None

    @staticmethod
    def _drop_starts_weights(run: RunDirectory) -> None:
        """Remove the starts' weights and the weights they began from, once the run holds the chosen one's."""
        folder = run.file(run.STARTS)
        for start in folder.glob("seed-*"):
            RunDirectory(start).drop_weights()
        (folder / run.INITIAL_WEIGHTS).unlink(missing_ok=True)

    def _start_fresh(self) -> tuple[None, int]:
        pyro.set_rng_seed((self.seed + self.processes.rank) % 2**32)
        if self.settings["output_bias"] == "data" and not self.model.start_output_bias(self.data.train.x):
            self.config["train"]["output_bias"] = "random"  # what the run did: this model has no constant fit
        with float32_matmul_precision(self.settings["matmul_precision"]):
            self.objective.start(self.model, self.data, progress=self.progress and self.processes.is_writer)
        self.processes.share(self.model)  # process 0's start for every process
        self.history = [{"epoch": 0, **self._validate(0)}]
        self.best_epoch = 0
        if self.source is not None:
            self._by_process_0(lambda: self.run.write_config(self.config), "write the run's config")
        self._save(0, best=True)
        return None, 0

    def _resume(self, run: RunDirectory) -> tuple[dict | None, int]:
        if self.processes.is_writer:
            run.remove_stale_temporaries()
        state = run.load_checkpoint("last", map_location=self.device)
        self._check_continues(run, state["config"], state)
        self._by_process_0(lambda: run.check_best_before_resuming(state), f"check the best checkpoint of {run.path}")
        if self.average is None:
            self.model.load_state_dict(state["model"])
        else:  # the iterates go on from where they were; "model" holds their average
            self.model.load_state_dict(state["averaging"]["iterates"])
            self.average.load(state["model"], state["averaging"]["steps"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.compiled is not None and state.get("compiled_step"):  # a dropped recording stays dropped
            self.compiled.load_state_dict(state["compiled_step"])
        self.history, epoch = list(state["history"]), state["epoch"]
        self.best_epoch = state["best_epoch"] if state["best_epoch"] is not None else self._best_epoch_of_history()
        world, rank = self.processes.world_size, self.processes.rank
        per_rank = state["rng"].get("per_rank")
        if world == 1 and per_rank is None:
            restore_rng(state["rng"])
            self.objective.load_state_dict(state["objective"])
        elif per_rank is not None and len(per_rank) == world:
            restore_rng(per_rank[rank])
            self.objective.load_state_dict(state["objective"]["per_rank"][rank])
        else:  # another number of processes: a fresh stream per process and resumption
            pyro.set_rng_seed((self.seed + world * epoch + rank) % 2**32)
        # how the run started, not this call's default (runs written before the option started at random)
        self.config["train"]["output_bias"] = state["config"].get("train", {}).get("output_bias", "random")
        position = state["position"]
        if position is not None and position.get("global_batch", self.global_batch) != self.global_batch:
            position = None  # stopped part-way with another number of processes: the epoch starts again
        self._by_process_0(lambda: self.run.write_config(self.config), "write the run's config")  # the new target
        if not run.file(run.BEST).exists():  # a run written before best.pt: the resumed weights are its best
            self.best_epoch = epoch
            self._save(epoch, best=True, position=position)
        return position, epoch

    def _check_continues(self, run: RunDirectory, saved: dict, state: dict | None = None) -> None:
        """Refuse to continue the run in ``run``, whose config is ``saved``, as another model, to fewer epochs
        than its checkpoint ``state`` has trained, over another length of a schedule that depends on it, or with
        other training settings or data."""
        if not model_config_matches(saved["model"], self.config["model"]):
            raise CheckpointError(
                f"The checkpoint in {run.path} was written for the model {saved['model']}, not "
                f"{self.config['model']}: resume it with the model it was written for (where its config.json came "
                "from another run, restore the one written with this checkpoint)."
            )
        saved_train = saved.get("train", {})
        if state is not None:
            trained = state["epoch"] + (state["position"] is not None)  # a run stopped part-way is in its next epoch
            if self.settings["epochs"] < trained:
                raise ValueError(
                    f"{run.path} has trained {state['epoch']} epochs"
                    f"{' and part of the next' if state['position'] is not None else ''}; resume it to at least "
                    f"{trained} epochs in all, not {self.settings['epochs']} (its target is "
                    f"{saved_train.get('epochs', 'not recorded')})."
                )
        schedule = self.settings["lr_schedule"]
        if saved_train.get("lr_schedule") == schedule and (
            conflict := length_conflict(schedule, saved_train.get("epochs"), self.settings["epochs"])
        ):
            raise ValueError(
                f"{run.path} {conflict}; resume it to {saved_train.get('epochs')} epochs (pyro-vae train --resume "
                f"without --epochs), or start a new run of {self.settings['epochs']}."
            )
        check_same_training(run, saved_train, self.config["train"])
        check_same_data(run, saved, self.config)

    def _best_epoch_of_history(self) -> int:
        scored = [row for row in self.history if self.metric in row]
        return max(scored, key=lambda row: row[self.metric])["epoch"] if scored else self.history[-1]["epoch"]

    # --------------------------------------------------------------- epochs
    def _train_epoch(self, epoch: int, position: dict | None, interrupt: InterruptRequests) -> None:
        started = time.perf_counter()
        lr = LR_SCHEDULES[self.settings["lr_schedule"]](epoch, self.settings["lr"], self.settings["epochs"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if position is None:  # a fresh epoch (one resumed part-way was flushed at its start)
            flush_subnormal_moments(self.optimizer)
            order = self.points[torch.randperm(len(self.points), device=self.device)]
            position = {"epoch": epoch, "step": 0, "total": 0.0, "count": 0, "order": self.processes.broadcast(order)}
            position["global_batch"] = self.global_batch
        # an epoch resumed part-way also counts the seconds (and the compiling) of its part before the stop
        started -= position.get("seconds", 0.0)
        compile_seconds = position.get("compile_seconds", 0.0)
        order, rank, world = position["order"], self.processes.rank, self.processes.world_size
        self.model.train()
        bar = tqdm(
            range(position["step"], self.steps_per_epoch),
            desc=f"epoch {epoch}/{self.settings['epochs']}",
            leave=False,
            disable=not (self.progress and self.processes.is_writer),
        )
        kl_weight = self.settings["beta"]
        for step in bar:
            global_step = (epoch - 1) * self.steps_per_epoch + step
            kl_weight = kl_weight_schedule(global_step, beta=self.settings["beta"], warmup_steps=self.warmup_steps)
            batch = order[step * self.global_batch : (step + 1) * self.global_batch][rank::world]
            # Pyro's argument and support checks run on the first step only; they cost time on every step. A
            # short last batch steps eagerly: a resumed run's first step may be one, which must not be recorded.
            full = len(batch) == self.settings["batch_size"]
            compiled = self.compiled if global_step > 0 and full else None
            compiling = compiled is not None and compiled.compiled is None and not compiled.failed
            if compiling:
                bar.set_postfix_str("compiling the step")
            with pyro.validation_enabled(global_step == 0), float32_matmul_precision(self.settings["matmul_precision"]):
                total, count = take_step(
                    self.model, self.objective, self.optimizer, self.data, batch, kl_weight=kl_weight,
                    processes=self.processes, compiled=compiled,
                )  # fmt: skip
            if compiling and compiled.compiled is not None:
                compile_seconds += compiled.compile_seconds
                if self.progress and self.processes.is_writer:
                    tqdm.write(f"compiled the training step in {compiled.compile_seconds:.1f} s")
            stop = self._interrupted(interrupt)
            if not math.isfinite(total):
                kept = (
                    f" Its checkpoints in {self.run.path} are kept, but resuming it would repeat this step: its "
                    "seed and rate are fixed."
                    if self.run is not None
                    else ""
                )
                raise TrainingDiverged(
                    f"The loss became {total} at epoch {epoch}, step {step + 1}.{kept} Start a new run with a lower "
                    f"learning rate (now {self.settings['lr']:g}), or check the data for extreme values."
                )
            if self.average is not None:
                self.average.update(self.model)
            position.update(step=step + 1, total=position["total"] + total, count=position["count"] + count)
            if self.progress and step % 25 == 0:
                bar.set_postfix(objective=f"{-position['total'] / position['count']:.2f}")
            if stop and step + 1 < self.steps_per_epoch:
                position.update(seconds=time.perf_counter() - started, compile_seconds=compile_seconds)
                self._save(epoch - 1, position=position)
                raise self._interruption(f"at epoch {epoch}, step {step + 1} of {self.steps_per_epoch}")
        bar.close()
        trained = time.perf_counter()
        row = {"epoch": epoch, "train_objective": -position["total"] / position["count"], "kl_weight": kl_weight}
        if self.settings["lr_schedule"] != "constant":
            row["lr"] = lr
        row.update(self._validate(epoch))
        row.update(seconds=trained - started, val_seconds=time.perf_counter() - trained)
        if self.compiled is not None:
            row["compile_seconds"] = compile_seconds
        self.history.append(row)
        self._summarise(row)
        best_so_far = self.history[self.best_epoch_index].get(self.metric, -math.inf)  # older rows may lack it
        best = self.metric not in row or row[self.metric] > best_so_far
        best = bool(self.processes.broadcast(torch.tensor([float(best)], device=self.device)).item())  # process 0's
        if best:
            self.best_epoch = epoch
        self._save(epoch, best=best)

    @property
    def best_epoch_index(self) -> int:
        return next(i for i, row in enumerate(self.history) if row["epoch"] == self.best_epoch)

    def _interrupted(self, interrupt: InterruptRequests) -> bool:
        """Whether any process was asked to stop (every process stops at the same step)."""
        if self.processes.world_size == 1:
            return interrupt.requested
        flag = torch.tensor([float(interrupt.requested)], dtype=torch.float64, device=self.device)
        return bool(self.processes.all_reduce(flag).item() > 0)

    def _interruption(self, where: str) -> TrainingInterrupted:
        resume = (
            f"; saved to {self.run.path}. Continue with: pyro-vae train --resume {self.run.path}" if self.run else "."
        )
        return TrainingInterrupted(f"Interrupted {where}{resume}")

    def _validate(self, epoch: int) -> dict:
        """The validation metrics of ``epoch`` on process 0 (the average's, where the run keeps one); {} elsewhere."""

        def validate() -> dict:
            with self.average.applied(self.model) if self.average is not None else contextlib.nullcontext():
                return self.objective.validate(self.model, self.data.val, "val_")

        return self._by_process_0(validate, f"validate epoch {epoch}") or {}

    def _kept_state(self) -> dict:
        """The weights the run keeps and evaluates: the average over the steps, or the iterates themselves."""
        return self.average.state_of(self.model) if self.average is not None else self.model.state_dict()

    def _summarise(self, row: dict) -> None:
        if not self.processes.is_writer:
            return
        metrics = "  ".join(
            f"{key} {100 * value:.2f}%" if key.endswith("accuracy") else f"{key} {value:.3f}"
            for key, value in row.items()
            if key.startswith("val_") and key in ("val_elbo", "val_accuracy", self.metric)
        )
        tqdm.write(
            f"epoch {row['epoch']:3d}/{self.settings['epochs']}  train objective {row['train_objective']:.3f}  "
            f"{metrics}  ({row['seconds']:.1f} s)"
        )

    # ---------------------------------------------------------------- saving
    def _save(self, epoch: int, *, best: bool = False, position: dict | None = None) -> None:
        """The checkpoint after ``epoch`` (every process's RNG and objective state), and the best weights."""
        rngs = self.processes.gather(rng_state())
        objective_states = self.processes.gather(self.objective.state_dict())
        if self.source is None:
            if best:  # kept in memory, since there is no best.pt
                self.best_state = copy.deepcopy(self._kept_state())
            return
        world = self.processes.world_size

        def write(run: RunDirectory) -> None:
            run.save_checkpoint(
                best=best,
                model_state=self._kept_state(),
                averaging=None
                if self.average is None
                else {"iterates": self.model.state_dict(), "steps": self.average.steps},
                optimizer_state=self.optimizer.state_dict(),
                epoch=epoch,
                history=self.history,
                config=self.config,
                position=position,
                objective_state=objective_states[0] if world == 1 else {"per_rank": objective_states},
                best_epoch=self.best_epoch,
                rng=rngs[0] if world == 1 else {**rngs[0], "per_rank": rngs},
                compiled_step=None if self.compiled is None else self.compiled.state_dict(),
            )

        self._by_process_0(lambda: write(self.run), f"write the checkpoint of epoch {epoch} in {self.source.path}")

    def _by_process_0(self, action, what: str):
        """``action()`` on process 0 alone (the run's writes, validation), its result there; every process
        learns whether it failed.

        An error there (a full disk, a validation out of memory) stops every process with it, instead of
        leaving the others to wait for process 0 in their next collective call (NCCL waits for ever; gloo
        fails with "Connection closed by peer"). One broadcast of a flag, and only with several processes.
        """
        result, error = None, None
        if self.processes.is_writer:
            try:
                result = action()
            except Exception as err:  # every process raises, process 0 its own error
                error = err
        if self.processes.world_size > 1:
            flag = torch.tensor([float(error is not None)], device=self.device)
            if self.processes.broadcast(flag).item() and error is None:
                kept = (
                    "."
                    if self.source is None
                    else (
                        f"; the epochs saved before it are kept: resume with pyro-vae train --resume {self.source.path}"
                    )
                )
                raise ProcessFailed(f"Process 0 failed to {what}; its error says why{kept}")
        if error is not None:
            raise error
        return result

    def _finish(self) -> None:
        """Every process ends with the best weights; process 0 writes their test metrics."""
        digests = self.processes.gather(parameter_digest(self.model))
        if len(set(digests)) != 1:
            raise ReplicasDiverged(f"The {len(digests)} processes ended with different parameters: {digests}.")
        if self.source is not None and self.source.file(self.source.BEST).exists():
            self.best_state = self.source.load_checkpoint("best", map_location=self.device)["model"]
        best = self.best_state if self.best_state is not None else self._kept_state()
        self.model.load_state_dict(best)
        if self.run is None:
            return
        pyro.set_rng_seed(self.seed)  # the test metrics depend on the weights and the seed, not on how training went
        best_digest = parameter_digest(self.model)
        metrics = {"best_epoch": self.best_epoch, "model_digest": best_digest}  # the weights every number is of
        best_row = self.history[self.best_epoch_index]
        if self.metric in best_row:
            metrics[self.metric] = best_row[self.metric]
        metrics.update(self.objective.validate(self.model, self.data.test, "test_"))
        evaluated = self._evaluations_kept(best_digest)
        num_samples = self.settings["eval_samples"]
        if num_samples and (
            evaluated.get(self.run.LOG_PX_DIGEST) != best_digest or evaluated.get("test_num_samples", 0) < num_samples
        ):  # new weights, or the same estimated with fewer samples (kept apart, then replaced); more are kept
            self.run.keep_headline_apart(evaluated, best_digest, num_samples)
            evaluated = {key: value for key, value in evaluated.items() if not key.startswith("test_")}
            self.model.eval()
            estimate = log_marginal_likelihood(
                self.model.model,
                self.model.guide,
                self.data.test.x,
                num_samples=num_samples,
                batch_size=TEST_LOG_PX_BATCH,
                seed=TEST_LOG_PX_SEED,
                progress=self.progress,
            )
            metrics.update({f"test_{key}": value for key, value in estimate.summary().items()})
            # its per-point values, as pyro-vae evaluate RUN --samples K writes them, which remakes them
            self.run.write_log_px(estimate.log_px.double().cpu().numpy())
            evaluated.update(log_px_seed=TEST_LOG_PX_SEED, log_px_batch_size=TEST_LOG_PX_BATCH)
            evaluated[self.run.LOG_PX_DIGEST] = best_digest
            evaluated[self.run.LOG_PX_TEST_DIGEST] = points_digest(self.data.test.x)
        metrics.update(
            num_test=len(self.data.test),
            binarize=self.data.binarize,
            epochs=self.settings["epochs"],
            train_seconds=training_seconds(self.history),
        )
        if self.processes.world_size > 1:
            metrics.update(world_size=self.processes.world_size, replica_parameter_digests=digests)
        if (record_path := self.run.file(self.run.STARTS) / self.run.STARTS_RECORD).exists():
            record = read_json(record_path)
            others = [start.get("seconds", 0.0) for start in record["starts"] if start["seed"] != record["chosen_seed"]]
            metrics.update(start_seed=record["chosen_seed"], starts_seconds=sum(others))
        self.run.write_metrics({**metrics, **evaluated})

    def _evaluation_digest(self, name: str) -> str | None:
        """The digest of the weights the evaluation ``name`` was made of (None: no file, or none recorded)."""
        if not self.run.evaluation_path(name).exists():
            return None
        made_of = self.run.read_evaluation(name).get("model_digest")
        return None if made_of is None else str(made_of)

    def _evaluations_kept(self, digest: str) -> dict:
        """What ``pyro-vae evaluate`` wrote into a resumed run's metrics and still holds.

        The summaries of the named evaluations of the best weights (``digest``) stay under
        ``evaluations``; those of earlier weights move to ``earlier_evaluations``, so that no number of
        other weights reads as the run's (their files stay, and ``compare`` refuses them). The digest of
        ``test_log_px.npy``'s weights is kept, and the headline numbers evaluate wrote (test log p(x),
        active units, ...) only while the best weights are still those.
        """
        previous = self.run.read_metrics()
        kept = {key: previous[key] for key in (self.run.LOG_PX_DIGEST,) if key in previous}
        evaluations, earlier = {}, dict(previous.get("earlier_evaluations", {}))
        for name, summary in previous.get("evaluations", {}).items():
            made_of = self._evaluation_digest(name)
            (evaluations if made_of in (None, digest) else earlier)[name] = summary  # None: cannot tell, kept
        kept.update({"evaluations": evaluations} if evaluations else {})
        kept.update({"earlier_evaluations": earlier} if earlier else {})
        if previous.get(self.run.LOG_PX_DIGEST) != digest:
            return kept
        training = {"best_epoch", "model_digest", self.metric, "num_test", "binarize", "epochs", "train_seconds",
                    "world_size", "replica_parameter_digests", "evaluations", "earlier_evaluations", "start_seed",
                    "starts_seconds"}  # fmt: skip
        return {**{key: value for key, value in previous.items() if key not in training}, **kept}
