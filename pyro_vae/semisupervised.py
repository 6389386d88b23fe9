"""Semi-supervised training of :class:`~pyro_vae.ssvae.SSVAE` (M2) from a few labels.

The objective over the whole training set is Kingma et al.'s (2014, eq. 9):

    J = sum_labelled [L(x, y) + alpha * log q(y | x)] + sum_unlabelled U(x),

with U summed over y exactly by ``TraceEnum_ELBO`` on the enumerated guide.
Every step draws one unlabelled batch and one labelled batch and adds their
losses. Each loss is scaled to its whole set by sizing the plate
(``num_data``), so the step's loss is an unbiased estimate of -J however
few labels there are. An epoch is one pass over the unlabelled points; the
labelled ones are cycled through in a fresh order as often as needed.

The labels are drawn class-balanced (the same number per class) with their
own seed, so that a label draw can be repeated or varied independently of
the training seed. The validation accuracy is measured after every epoch,
and the best epoch's weights are kept in ``best.pt`` beside the ordinary
checkpoint. The test accuracy and the test log p(x) are those of the best
epoch.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, config_enumerate
from tqdm.auto import tqdm

from .checkpoint import CHECKPOINT, CONFIG, METRICS, atomic_write_bytes, load_checkpoint, write_json
from .data import DataError, Dataset
from .marginal import log_marginal_likelihood
from .ssvae import SSVAE
from .train import (
    TrainingDiverged,
    adam,
    check_fresh,
    load_for_resume,
    resolve_device,
    run_config,
    save_run_state,
)

BEST = "best.pt"


def draw_labelled(y: torch.Tensor, num_labels: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``num_labels`` points, as many of each class as possible (the first classes get any remainder).

    Raises :class:`~pyro_vae.data.DataError` when the count is impossible.
    """
    if not 1 <= num_labels <= len(y):
        raise DataError(f"--labels must lie in [1, {len(y)}] (the training points); got {num_labels}.")
    if num_labels < num_classes:
        raise DataError(
            f"{num_labels} labels cannot cover {num_classes} classes; give at least {num_classes} (one per class)."
        )
    generator = torch.Generator().manual_seed(seed)
    per_class = [num_labels // num_classes + (c < num_labels % num_classes) for c in range(num_classes)]
    chosen = []
    for c, count in enumerate(per_class):
        members = (y.cpu() == c).nonzero().squeeze(1)
        if len(members) < count:
            raise DataError(f"Class {c} has {len(members)} training points; {count} labelled ones were asked for.")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(chosen).sort().values


def default_aux_weight(num_data: int, num_labels: int) -> float:
    """Kingma et al.'s alpha = 0.1 N on the mean over the labelled set, i.e. 0.1 N / N_labelled per labelled point."""
    return 0.1 * num_data / num_labels


def fit_ssvae(
    ssvae: SSVAE,
    data: Dataset,
    *,
    num_labels: int = 100,
    label_seed: int = 0,
    epochs: int = 50,
    batch_size: int = 200,
    lr: float = 3e-4,
    aux_weight: float | None = None,
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    run_dir: str | Path | None = None,
    resume: bool = False,
    eval_samples: int = 1000,
    progress: bool = True,
) -> list[dict]:
    """Train ``ssvae`` on ``data`` with ``num_labels`` of its training labels; return the history.

    Each history row holds the training objective (-J / N), the validation
    accuracy and the validation ELBO with y summed out.

    :param aux_weight: alpha per labelled point; default :func:`default_aux_weight`.
    :param eval_samples: K of the final test log p(x) (y drawn from q(y|x)); 0 skips it.
    """
    if data.train.y is None or data.val.y is None or data.test.y is None:
        raise DataError("Semi-supervised training needs labels for the train, validation and test splits.")
    if epochs < 0 or batch_size < 1 or lr <= 0:
        raise ValueError("Need epochs >= 0, batch_size >= 1 and lr > 0.")
    device = resolve_device(device)
    ssvae.to(device)
    data = data.to(device)
    for split in ("train", "val", "test"):
        part = getattr(data, split)
        ssvae.check_data(part.x.round() if split == "train" and data.binarize == "dynamic" else part.x, f"{split} data")
        ssvae.check_labels(part.y, part.x, f"{split} labels")
    labelled = draw_labelled(data.train.y, num_labels, ssvae.num_classes, label_seed).to(device)
    is_labelled = torch.zeros(len(data.train), dtype=torch.bool, device=device)
    is_labelled[labelled] = True
    unlabelled = (~is_labelled).nonzero().squeeze(1)
    if len(unlabelled) == 0:
        raise DataError("Every training point is labelled; use fewer --labels, or train a VAE.")
    num_data = len(data.train)
    alpha = default_aux_weight(num_data, num_labels) if aux_weight is None else float(aux_weight)
    labelled_batch = min(batch_size, num_labels)
    steps_per_epoch = math.ceil(len(unlabelled) / batch_size)
    config = run_config(
        ssvae,
        data,
        semi_supervised=True,
        num_labels=num_labels,
        label_seed=label_seed,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        aux_weight=alpha,
        seed=seed,
        device=str(device),
    )
    run_dir = None if run_dir is None else Path(run_dir)
    optimizer = adam(ssvae.parameters(), lr, device)
    unlabelled_loss = TraceEnum_ELBO(max_plate_nesting=1)
    labelled_loss = Trace_ELBO(max_plate_nesting=1)
    enumerated_guide = config_enumerate(ssvae.guide, "parallel")

    def validate() -> dict:
        ssvae.eval()
        with torch.no_grad():
            loss = sum(
                unlabelled_loss.loss(ssvae.model, enumerated_guide, data.val.x[i : i + 1000])
                for i in range(0, len(data.val), 1000)
            )
        ssvae.train()
        return {"val_accuracy": ssvae.accuracy(data.val.x, data.val.y), "val_elbo": -loss / len(data.val)}

    if resume:
        if run_dir is None:
            raise ValueError("resume=True needs the run_dir to resume from.")
        state = load_for_resume(run_dir, ssvae, config)
        optimizer.load_state_dict(state["optimizer"])
        history, start_epoch = list(state["history"]), state["epoch"]
        write_json(run_dir / CONFIG, config)
        pyro.set_rng_seed(seed + start_epoch)
    else:
        check_fresh(run_dir)
        pyro.set_rng_seed(seed)
        history, start_epoch = [{"epoch": 0, **validate()}], 0
        if run_dir is not None:
            write_json(run_dir / CONFIG, config)
            save_run_state(run_dir, ssvae, optimizer, 0, history, config)
            atomic_write_bytes(run_dir / BEST, (run_dir / CHECKPOINT).read_bytes())
    labelled_order = labelled[torch.randperm(num_labels, device=device)]
    labelled_cursor = 0

    for epoch in range(start_epoch + 1, epochs + 1):
        started = time.perf_counter()
        order = unlabelled[torch.randperm(len(unlabelled), device=device)]
        total = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{epochs}", leave=False, disable=not progress)
        for step in bar:
            if labelled_cursor + labelled_batch > num_labels:
                labelled_order, labelled_cursor = labelled[torch.randperm(num_labels, device=device)], 0
            chosen = labelled_order[labelled_cursor : labelled_cursor + labelled_batch]
            labelled_cursor += labelled_batch
            x_u = data.batch(order[step * batch_size : (step + 1) * batch_size])
            with pyro.validation_enabled(epoch == 1 and step == 0):
                loss = unlabelled_loss.differentiable_loss(
                    ssvae.model, enumerated_guide, x_u, num_data=len(unlabelled)
                ) + labelled_loss.differentiable_loss(
                    ssvae.model,
                    ssvae.guide,
                    data.batch(chosen),
                    data.train.y[chosen],
                    aux_weight=alpha,
                    num_data=num_labels,
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise TrainingDiverged(
                    f"The loss became {loss_value} at epoch {epoch}, step {step + 1}. Lower the learning rate "
                    f"(now {lr:g}); the checkpoint of epoch {epoch - 1} is kept."
                )
            optimizer.step()
            total += loss_value
        trained = time.perf_counter()
        row = {"epoch": epoch, "train_objective": -total / steps_per_epoch / num_data, **validate()}
        row.update(seconds=trained - started, val_seconds=time.perf_counter() - trained)
        best = max(r["val_accuracy"] for r in history)
        history.append(row)
        if progress:
            tqdm.write(
                f"epoch {epoch:3d}  objective {row['train_objective']:9.3f}  val ELBO {row['val_elbo']:9.3f}  "
                f"val accuracy {100 * row['val_accuracy']:.2f}%  ({row['seconds']:.1f} s)"
            )
        if run_dir is not None:
            save_run_state(run_dir, ssvae, optimizer, epoch, history, config)
            if row["val_accuracy"] > best:
                atomic_write_bytes(run_dir / BEST, (run_dir / CHECKPOINT).read_bytes())

    if run_dir is not None:
        write_ssl_metrics(run_dir, ssvae, data, history, eval_samples=eval_samples, progress=progress)
    return history


def write_ssl_metrics(
    run_dir: Path, ssvae: SSVAE, data: Dataset, history: list[dict], *, eval_samples: int, progress: bool
) -> dict:
    """The best epoch's test accuracy and test log p(x) (y sampled from q(y|x)) into ``metrics.json``."""
    best = max(history, key=lambda row: row["val_accuracy"])
    ssvae.load_state_dict(load_checkpoint(run_dir / BEST, map_location=data.test.x.device)["model"])
    ssvae.eval()
    metrics = {
        "best_epoch": best["epoch"],
        "val_accuracy": best["val_accuracy"],
        "test_accuracy": ssvae.accuracy(data.test.x, data.test.y),
        "num_test": len(data.test),
        "binarize": data.binarize,
        "train_seconds": sum(row["seconds"] + row["val_seconds"] for row in history[1:]),
    }
    if eval_samples:
        estimate = log_marginal_likelihood(
            ssvae.model, ssvae.guide, data.test.x, num_samples=eval_samples, batch_size=100, progress=progress
        )
        metrics.update({f"test_{key}": value for key, value in estimate.summary().items()})
    write_json(run_dir / METRICS, metrics)
    return metrics
