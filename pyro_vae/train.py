"""Training: stochastic variational inference on a VAE's model and guide.

Each step draws a minibatch, computes Pyro's differentiable ELBO loss
(``Trace_ELBO`` or ``TraceMeanField_ELBO``) of ``vae.model`` and
``vae.guide`` and takes one Adam step over all the VAE's parameters -- what
``SVI.step`` does, with one torch optimiser instead of one per parameter.

KL warm-up and beta: the KL weight ``kl_weight = beta * min(1, step / warmup_steps)``
reaches the model and guide through ``poutine.scale`` on the "z" site, so the
objective is E_q[log p(x|z)] - kl_weight * KL(q(z|x) || p(z)) (Bowman et al. 2016;
Higgins et al. 2017 for beta). The validation ELBO is always the true ELBO,
evaluated with unscaled densities.

Every number is per data point, in nats. With a ``run_dir``, a checkpoint
(model, optimiser, history, RNG state) is written atomically after every
epoch, and ``resume=True`` continues exactly where the last complete epoch ended.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import (
    CHECKPOINT,
    CONFIG,
    HISTORY,
    METRICS,
    CheckpointError,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    write_history_csv,
    write_json,
)
from .data import Dataset
from .iwae import IWAE_ELBO
from .marginal import elbo_per_point
from .vae import VAE

ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO, "iwae": IWAE_ELBO}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(RuntimeError):
    """Training stopped at a SIGINT (Ctrl-C) after finishing its current step and saving."""


class _InterruptRequests:
    """While active, the first SIGINT only sets ``requested``, so the current step can finish and be saved.

    A second SIGINT interrupts at once, as usual. Outside the main thread
    (where Python cannot install signal handlers) it does nothing.
    """

    def __enter__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Interrupt: finishing the current step and saving (press Ctrl-C again to stop at once).")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` picks CUDA when there is a GPU; an unavailable CUDA gets a clear error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but PyTorch sees no GPU here; use --device cpu.")
    return device


def check_dataset(vae: VAE, data: Dataset) -> None:
    """Check every split as the model will see it, before any training starts."""
    for split in ("train", "val", "test"):
        x = getattr(data, split).x
        if split == "train" and data.binarize == "dynamic":
            x = x.round()  # batches are resampled binary; the pixels were checked to lie in [0, 1]
        vae.check_data(x, f"{split} data")


def kl_weight_schedule(step: int, *, beta: float, warmup_steps: int) -> float:
    """Linear KL warm-up from ``beta / warmup_steps`` to ``beta``; constant ``beta`` without warm-up."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, (step + 1) / warmup_steps)


def _interrupted(where: str, run_dir: Path | None) -> TrainingInterrupted:
    resume = f"; saved to {run_dir}. Continue with: pyro-vae train --resume {run_dir}" if run_dir else "."
    return TrainingInterrupted(f"Interrupted {where}{resume}")


def adam(parameters, lr: float, device: torch.device) -> torch.optim.Adam:
    """torch's Adam, fused into one kernel for all parameters where torch has one (CPU and CUDA).

    The default, a few small kernels per tensor, took about a millisecond of
    a 5 ms step of the 784-400-20 VAE at batch 128 (cProfile); see
    benchmarks/train_speed.py for the effect on an epoch.
    """
    return torch.optim.Adam(parameters, lr=lr, fused=device.type in ("cpu", "cuda"))


def training_step(
    loss_fn, vae: VAE, optimizer: torch.optim.Optimizer, x: torch.Tensor, *, kl_weight: float = 1.0, validate=False
) -> float:
    """One step of stochastic variational inference; returns the loss (the negative annealed objective).

    The same update as ``SVI(vae.model, vae.guide, pyro.optim.Adam(...), loss_fn).step(x)``
    (``tests/test_train.py`` checks that the parameters agree), with one torch
    optimiser over all parameters instead of one per parameter and without
    the param-store round trip. A non-finite loss leaves the parameters untouched.
    """
    with pyro.validation_enabled(validate):
        loss = loss_fn.differentiable_loss(vae.model, vae.guide, x, kl_weight=kl_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    loss_value = loss.item()
    if math.isfinite(loss_value):
        optimizer.step()
    return loss_value


def evaluate_elbo(
    vae: VAE, x: torch.Tensor, *, num_particles: int = 1, batch_size: int = 1000, prefix: str = ""
) -> dict:
    """Mean ELBO per data point (with standard error), reconstruction and KL terms."""
    was_training = vae.training
    vae.eval()
    try:
        estimate = elbo_per_point(vae.model, vae.guide, x, num_particles=num_particles, batch_size=batch_size)
    finally:
        vae.train(was_training)
    return estimate.summary(prefix)


def fit(
    vae: VAE,
    data: Dataset,
    *,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 1e-3,
    elbo: str = "trace",
    num_particles: int = 1,
    warmup_epochs: float = 0.0,
    beta: float = 1.0,
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Train ``vae`` on ``data`` and return the history, one dict per epoch.

    Row 0 evaluates the untrained model. Each row holds ``train_objective``
    (the mean annealed objective over the epoch's batches; the ELBO once
    ``kl_weight`` is 1), ``val_elbo`` with its terms, ``kl_weight``,
    ``seconds`` (the optimisation pass) and ``val_seconds`` (the validation).

    :param elbo: ``"trace"`` (``Trace_ELBO``), ``"meanfield"``
        (``TraceMeanField_ELBO``: analytic KL where one exists) or ``"iwae"``
        (the importance-weighted bound with ``num_particles`` samples, :mod:`pyro_vae.iwae`).
    :param warmup_epochs: epochs over which the KL weight rises linearly to ``beta``.
    :param beta: final weight of the KL term (1 gives the ELBO).
    :param run_dir: write config, checkpoint, history and metrics here.
    :param resume: continue from ``run_dir``'s checkpoint up to ``epochs`` in all.
    """
    loss_fn = build_elbo(
        elbo,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        num_particles=num_particles,
        warmup_epochs=warmup_epochs,
        beta=beta,
    )
    device = resolve_device(device)
    vae.to(device)
    data = data.to(device)
    check_dataset(vae, data)

    optimizer = adam(vae.parameters(), lr, device)
    steps_per_epoch = data.num_batches(batch_size)
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    config = run_config(
        vae,
        data,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        elbo=elbo,
        num_particles=num_particles,
        warmup_epochs=warmup_epochs,
        beta=beta,
        seed=seed,
        device=str(device),
    )
    run_dir = None if run_dir is None else Path(run_dir)
    history, start_epoch, position = _start(vae, optimizer, data, run_dir, config, resume, seed)

    validate = True
    with _InterruptRequests() as interrupt:
        for epoch in range(start_epoch + 1, epochs + 1):
            started = time.perf_counter()
            if position is None:
                position = {"epoch": epoch, "step": 0, "total": 0.0, "count": 0}
                position["order"] = torch.randperm(len(data.train), device=device)
            vae.train()
            steps = range(position["step"], steps_per_epoch)
            bar = tqdm(steps, desc=f"epoch {epoch}/{epochs}", leave=False, disable=not progress)
            for step in bar:
                global_step = (epoch - 1) * steps_per_epoch + step
                kl_weight = kl_weight_schedule(global_step, beta=beta, warmup_steps=warmup_steps)
                x = data.batch(position["order"][step * batch_size : (step + 1) * batch_size])
                # Pyro's argument and support checks run on the first step only; they cost time on every step.
                loss_value = training_step(loss_fn, vae, optimizer, x, kl_weight=kl_weight, validate=validate)
                validate = False
                if not math.isfinite(loss_value):
                    raise TrainingDiverged(
                        f"The loss became {loss_value} at epoch {epoch}, step {step + 1}. Lower the learning rate "
                        f"(now {lr:g}) or check the data for extreme values"
                        + (f"; the checkpoint of epoch {epoch - 1} in {run_dir} is kept." if run_dir else ".")
                    )
                position.update(step=step + 1, total=position["total"] + loss_value, count=position["count"] + len(x))
                if progress and step % 25 == 0:
                    bar.set_postfix(objective=f"{-position['total'] / position['count']:.2f}")
                if interrupt.requested and step + 1 < steps_per_epoch:
                    if run_dir is not None:
                        save_run_state(run_dir, vae, optimizer, epoch - 1, history, config, position)
                    raise _interrupted(f"at epoch {epoch}, step {step + 1} of {steps_per_epoch}", run_dir)
            trained = time.perf_counter()
            row = {"epoch": epoch, "train_objective": -position["total"] / position["count"], "kl_weight": kl_weight}
            row.update(evaluate_elbo(vae, data.val.x, prefix="val_"))
            row.update(seconds=trained - started, val_seconds=time.perf_counter() - trained)
            history.append(row)
            position = None
            if progress:
                tqdm.write(
                    f"epoch {epoch:3d}  train objective {row['train_objective']:9.3f}  "
                    f"val ELBO {row['val_elbo']:9.3f}  ({row['seconds']:.1f} s)"
                )
            if run_dir is not None:
                save_run_state(run_dir, vae, optimizer, epoch, history, config)
            if interrupt.requested and epoch < epochs:
                raise _interrupted(f"after epoch {epoch}", run_dir)

    if run_dir is not None:
        write_test_metrics(run_dir, vae, data, history, epochs=epochs)
    return history


def build_elbo(
    elbo: str, *, epochs: int, batch_size: int, lr: float, num_particles: int, warmup_epochs: float, beta: float
):
    """The training objective named ``elbo``, after checking the training settings."""
    if elbo not in ELBOS:
        raise ValueError(f"Unknown ELBO {elbo!r}; choose one of {sorted(ELBOS)}.")
    if epochs < 0 or batch_size < 1 or lr <= 0 or beta <= 0 or num_particles < 1:
        raise ValueError("Need epochs >= 0, batch_size >= 1, lr > 0, beta > 0 and num_particles >= 1.")
    if elbo == "iwae":
        if warmup_epochs or beta != 1.0:
            raise ValueError("KL warm-up and beta do not apply to the IWAE bound; use elbo='trace' for them.")
        return IWAE_ELBO(num_particles=num_particles)
    return ELBOS[elbo](num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1)


def run_config(vae: VAE, data: Dataset, **train) -> dict:
    """The run's ``config.json``: enough to rebuild the model and data and to resume training."""
    return {
        "pyro_vae_version": __version__,
        "model": None if getattr(vae, "custom_nets", False) else vae.config(),
        "data": data.spec,
        "train": train,
    }


def write_test_metrics(run_dir: Path, vae: VAE, data: Dataset, history: list[dict], **extra) -> dict:
    """The test ELBO and its terms, with the training budget, into the run's ``metrics.json``."""
    metrics = evaluate_elbo(vae, data.test.x, prefix="test_")
    metrics.update(
        num_test=len(data.test),
        binarize=data.binarize,
        train_seconds=sum(row["seconds"] + row.get("val_seconds", 0.0) for row in history[1:]),  # older runs lack it
        **extra,
    )
    write_json(run_dir / METRICS, metrics)
    return metrics


def _start(vae, optimizer, data, run_dir, config, resume, seed) -> tuple[list[dict], int, dict | None]:
    """A fresh start (seeded, epoch-0 evaluation), or the last complete epoch and any saved position after it."""
    if resume:
        if run_dir is None:
            raise ValueError("resume=True needs the run_dir to resume from.")
        state = load_for_resume(run_dir, vae, config)
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state)
        write_json(run_dir / CONFIG, config)  # records the new epoch target
        return list(state["history"]), state["epoch"], state.get("position")
    check_fresh(run_dir)
    pyro.set_rng_seed(seed)
    history = [{"epoch": 0, **evaluate_elbo(vae, data.val.x, prefix="val_")}]
    if run_dir is not None:
        write_json(run_dir / CONFIG, config)
        save_run_state(run_dir, vae, optimizer, 0, history, config)
    return history, 0, None


def check_fresh(run_dir: Path | None) -> None:
    """A new run must not overwrite a finished or interrupted one."""
    if run_dir is not None and (run_dir / CHECKPOINT).exists():
        raise CheckpointError(f"{run_dir} already holds a run; resume it (--resume) or choose another name.")


def load_for_resume(run_dir: Path, vae: VAE, config: dict) -> dict:
    """Load the run's checkpoint into ``vae`` (after checking it is the same model) and return the whole state."""
    for stale in run_dir.glob(".*.tmp"):  # left by a process killed while writing
        stale.unlink(missing_ok=True)
    state = load_checkpoint(run_dir / CHECKPOINT, map_location=next(vae.parameters()).device)
    saved = state["config"]["model"]
    if saved != config["model"]:
        raise CheckpointError(
            f"The checkpoint in {run_dir} was written for the model {saved}, not {config['model']}; "
            "rebuild the VAE from the run's config.json (pyro_vae.load_run)."
        )
    vae.load_state_dict(state["model"])
    return state


def save_run_state(run_dir: Path, vae, optimizer, epoch: int, history: list[dict], config: dict, position=None) -> None:
    """The checkpoint (atomically) and the history table, after ``epoch`` (and ``position`` within the next)."""
    save_checkpoint(
        run_dir / CHECKPOINT,
        model_state=vae.state_dict(),
        optimizer_state=optimizer.state_dict(),
        epoch=epoch,
        history=history,
        config=config,
        position=position,
    )
    write_history_csv(run_dir / HISTORY, history)
