"""Evaluating trained runs by their marginal likelihood, and comparing them.

:func:`evaluate_run` estimates the test log p(x) of a run's best checkpoint
by one of four methods:

* ``"is"``: importance sampling with K samples from the guide
  (:func:`~pyro_vae.infer.importance.log_marginal_likelihood`), with ESS and
  Pareto-k diagnostics; its per-point values also go to ``test_log_px.npy``;
* ``"ais"``: annealed importance sampling from the guide
  (:func:`~pyro_vae.infer.ais.ais_log_marginal_likelihood`; for a
  semi-supervised model with each label given, the labels summed out,
  :func:`~pyro_vae.infer.ais.ais_log_marginal_likelihood_by_label`);
* ``"auto"``: importance sampling on every point, then AIS on the points
  where importance sampling cannot be trusted: Pareto-k above
  min(1 - 1 / log10 K, 0.7) (0.67 at K = 1000;
  :func:`~pyro_vae.infer.importance.pareto_threshold`), or not assessable
  (K < 46 gives every point's weights too short a tail to fit);
* ``"bdmc"``: bidirectional Monte Carlo bounds on points simulated from the
  model (:func:`~pyro_vae.infer.ais.bdmc`), which bound the error of AIS at
  its settings on such points, in expectation (on the test points only as
  far as their posteriors are no harder, as when the model fits the data);
  refused for semi-supervised models, whose label is discrete.

Each evaluation's per-point values go to ``evaluations/<name>.npz`` under a
name that records the method and its settings, and its summary to
``metrics.json`` under ``evaluations``. An AIS evaluation is saved batch by
batch: a killed or interrupted one continues where it stopped, with the
same numbers (each batch has its own seed).

:func:`compare_runs` reads the per-point values. All runs are scored on the
same test points, so the difference between two models is a *paired*
difference: its standard error is that of the per-point differences, much
smaller than the two separate standard errors would suggest.
"""

from __future__ import annotations

import csv
import io
import math
import re
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .checks import is_whole_number, whole_number
from .data import Dataset
from .infer import (
    BDMC,
    AISEstimate,
    BDMCEstimate,
    ais_log_marginal_likelihood,
    ais_log_marginal_likelihood_by_label,
    log_marginal_likelihood,
)
from .infer.ais import (
    DEFAULT_BDMC_POINTS,
    DEFAULT_CHAINS,
    DEFAULT_LEAPFROG_STEPS,
    DEFAULT_SCHEDULE,
    DEFAULT_STEPS,
    PILOT_CHAINS,
    SCHEDULES,
    ais_summary,
)
from .infer.densities import evaluating, standard_error
from .infer.importance import DEFAULT_NUM_SAMPLES, untrusted
from .models import Model, SemiSupervisedModel
from .models.base import ACTIVE_UNIT_THRESHOLD
from .runs import RunDirectory, load_run
from .training.engine import MAX_SEED, TEST_LOG_PX_BATCH, resolve_device
from .training.parallel import parameter_digest, points_digest, state_digest

METHODS = ("is", "ais", "auto", "bdmc")
#: Test points per batch of an evaluation (each batch saved as it finishes) unless told otherwise.
DEFAULT_EVALUATION_BATCH = TEST_LOG_PX_BATCH  # so that training's test log p(x) is evaluate's
#: The per-point results an AIS evaluation saves (attributes of ``AISEstimate``).
AIS_COLUMNS = ("log_px", "chain_std", "acceptance", "step_size")


class EvaluationInterrupted(RuntimeError):
    """An evaluation stopped at Ctrl-C; its finished batches are saved."""


@torch.no_grad()
def active_units(
    model: Model, x: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD, batch_size: int = 1000
) -> int:
    """Latent dimensions u with Cov_x(E_{q(u|x)}[u]) > ``threshold`` (Burda et al. 2016, section 5.2)."""
    return sum(active_units_per_layer(model, x, threshold, batch_size))


@torch.no_grad()
def active_units_per_layer(
    model: Model, x: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD, batch_size: int = 1000
) -> list[int]:
    """The active units of each latent layer (``model.latent_sizes``), from the data side."""
    active = model.latent_means(x, batch_size).var(0) > threshold
    return [int(layer.sum()) for layer in active.split(model.latent_sizes)]


@torch.no_grad()
def classify_generatively(model, x: torch.Tensor, *, num_samples: int = 10, batch_size: int = 500, seed: int = 0):
    """The generative classifier of a semi-supervised model: argmax_y log p(x, y) for each point.

    log p(x, y) = log p(y) + log p(x | y) is estimated for every class by
    importance sampling with the guide given y, q(z | x, y) (K =
    ``num_samples``), so it judges the generative model p(x | y, z) rather
    than the classifier q(y | x) (Kingma et al. 2014 classify with q). The
    estimate is biased low by how far q(z | x, y) is from p(z | x, y), and
    that gap can differ between the classes, so at small K it judges the
    encoder a little too.
    """
    if not isinstance(model, SemiSupervisedModel):
        raise TypeError(
            "classify_generatively needs a model with a label y (pv.SSVAE, pv.StackedSSVAE); "
            f"got {type(model).__name__}."
        )
    model.check_data(x)
    with evaluating(model):
        scores = [
            log_marginal_likelihood(
                model.model, model.guide, x, y=torch.tensor(label, device=x.device), num_samples=num_samples,
                batch_size=batch_size, seed=seed, max_plate_nesting=1, replay=False,
            ).log_px
            for label in range(model.num_classes)
        ]  # fmt: skip
    return torch.stack(scores, -1).argmax(-1)


def evaluation_name(
    method: str, *, num_samples: int, ais: dict, num_points: int, test_points: int | None = None
) -> str:
    """The file name of an evaluation: its method, the settings that change what it estimates, and its points.

    The seed and the batch size change only its random draws; ``metrics.json`` records the seed beside the
    evaluation's summary, and an evaluation made again with another seed replaces it.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {METHODS}.")
    annealing = f"T{ais['num_steps']}-C{ais['num_chains']}-L{ais['leapfrog_steps']}-{ais['schedule']}"
    return {
        "is": f"is-K{num_samples}",
        "ais": f"ais-{annealing}",
        "auto": f"auto-K{num_samples}-{annealing}",
        "bdmc": f"bdmc-N{num_points}-{annealing}",
    }[method] + ("" if test_points is None or method == "bdmc" else f"-first{test_points}")


#: The command-line flag of each number in an evaluation's name (:func:`evaluation_name`).
_NAME_FLAGS = {"K": "--samples", "T": "--steps", "C": "--chains", "L": "--leapfrog", "N": "--points",
               "first": "--test-points"}  # fmt: skip


def evaluate_command(run_dir: str | Path, name: str | None = None) -> str:
    """The ``pyro-vae evaluate`` command that makes the evaluation ``name`` of a run (by default
    ``test_log_px.npy``'s) again, with the settings, seed and batch size it was made with (the batch size
    changes the random draws, not what is estimated)."""
    metrics = RunDirectory(run_dir).read_metrics()
    if name is None:
        name = f"is-K{metrics.get('test_num_samples', DEFAULT_NUM_SAMPLES)}"
        seed, batch_size = metrics.get("log_px_seed", 0), metrics.get("log_px_batch_size", DEFAULT_EVALUATION_BATCH)
    else:
        made = metrics.get("evaluations", {}).get(name) or metrics.get("earlier_evaluations", {}).get(name, {})
        seed, batch_size = made.get("seed", 0), made.get("batch_size", DEFAULT_EVALUATION_BATCH)
    method, *parts = name.split("-")
    flags = [] if method == "is" else [f"--method {method}"]
    for part in parts:
        number = re.fullmatch(r"(K|T|C|L|N|first)(\d+)", part)
        flags.append(f"{_NAME_FLAGS[number[1]]} {number[2]}" if number else f"--schedule {part}")
    flags += [f"--seed {seed}"] if seed else []
    flags += [f"--batch-size {batch_size}"] if batch_size != DEFAULT_EVALUATION_BATCH else []
    return " ".join(["pyro-vae evaluate", str(run_dir), *flags])


def current_evaluation(run_dir: str | Path, name: str) -> dict | None:
    """The arrays of the evaluation ``name`` of a run, if it was made of the weights of its best checkpoint now.

    None where the run has no such evaluation, or where it trained further since (the evaluation's
    ``model_digest`` is not the best checkpoint's ``parameter_digest``): then evaluate it again. A kept
    record (no checkpoint) has no weights to check against: its evaluation is returned as it is.
    """
    directory = RunDirectory(run_dir)
    if name not in directory.read_metrics().get("evaluations", {}):
        return None
    arrays = directory.read_evaluation(name)
    return arrays if _of_current_weights(directory, arrays.get("model_digest")) else None


def _current_digest(directory: RunDirectory) -> str | None:
    """The digest of the weights a run's numbers must be of: its best checkpoint's, or for a kept record (no
    checkpoint) the one its ``metrics.json`` records (None: a record of a run that finished before 2026-12-07)."""
    if directory.holds_run():
        return state_digest(directory.load_checkpoint("best")["model"])
    made_of = directory.read_metrics().get("model_digest")
    return None if made_of is None else str(made_of)


def _of_current_weights(directory: RunDirectory, made_of) -> bool:
    """Whether values made of the weights of digest ``made_of`` describe the run's best weights now.

    Values saved without a digest, or a record that does not say which weights it is of, cannot be checked: True.
    """
    current = _current_digest(directory)
    return made_of is None or current is None or str(made_of) == current


def check_metrics_of_best(directory: RunDirectory) -> None:
    """Refuse a run whose ``metrics.json`` describes other weights than its best checkpoint.

    A run writes its metrics (best epoch, test ELBO, ...) when it finishes. Resumed and stopped part-way
    after it improved on them, its best checkpoint holds newer weights than its metrics describe, and an
    evaluation of those beside them would mix two models' numbers.
    """
    metrics = directory.read_metrics()
    if not directory.holds_run() or "best_epoch" not in metrics:
        return
    best = directory.load_checkpoint("best")
    recorded = metrics.get("model_digest")
    if (recorded is None and metrics["best_epoch"] == best["epoch"]) or recorded == state_digest(best["model"]):
        return
    raise ValueError(
        f"{directory.path}'s metrics.json describes the best weights of epoch {metrics['best_epoch']}, but its best "
        f"checkpoint now holds those of epoch {best['epoch']}: training was stopped part-way after improving on "
        f"them, and a run writes its metrics when it finishes. Finish it first (pyro-vae train --resume "
        f"{directory.path}), then evaluate or compare it."
    )


def evaluate_run(
    run_dir: str | Path,
    *,
    method: str = "is",
    num_samples: int = DEFAULT_NUM_SAMPLES,
    batch_size: int = DEFAULT_EVALUATION_BATCH,
    num_steps: int = DEFAULT_STEPS,
    num_chains: int = DEFAULT_CHAINS,
    leapfrog_steps: int = DEFAULT_LEAPFROG_STEPS,
    schedule: str = DEFAULT_SCHEDULE,
    num_points: int = DEFAULT_BDMC_POINTS,
    test_points: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    model: Model | None = None,
    data: Dataset | None = None,
    data_dir: str | None = None,
    download: bool = False,
) -> dict:
    """Evaluate a run's best checkpoint (the one ``metrics.json`` reports) by ``method``; returns the summary.

    The model and test data are rebuilt from ``config.json``; pass ``model`` for a run with custom
    networks and ``data`` for one trained on your own tensors (its test split is evaluated). A torchvision
    data set whose files moved is found at ``data_dir``, or fetched with ``download``.

    A finished AIS, ``auto`` or BDMC evaluation of the same name, weights, points, seed and batch size is not
    made again: its summary comes back with ``"kept": True``. One made otherwise is replaced, and the summary
    says how it was made (``"replaced"``).

    :param num_samples: K of importance sampling (``"is"``, ``"auto"``).
    :param num_steps, num_chains, leapfrog_steps, schedule: the AIS settings (``"ais"``, ``"auto"``, ``"bdmc"``).
    :param num_points: simulated points of ``"bdmc"``.
    :param device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA where there is a GPU), as for training.
    :param test_points: evaluate only the first this many test points (the name records it, and
        :func:`compare_runs` pairs only evaluations of the same points); None evaluates all of them.
    """
    sizes = {"num_samples": num_samples, "batch_size": batch_size, "num_points": num_points, "num_steps": num_steps}
    sizes |= {"num_chains": num_chains, "leapfrog_steps": leapfrog_steps}
    for key, value in {**sizes, **({"test_points": test_points} if test_points is not None else {})}.items():
        whole_number(value, key)
    if not is_whole_number(seed) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer from 0 to {MAX_SEED}; got {seed!r}.")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}; got {schedule!r}.")
    # NumPy's integers made Python's, which the summary's JSON can hold
    num_samples, batch_size, num_points, num_steps, num_chains, leapfrog_steps = map(int, sizes.values())
    seed, test_points = int(seed), None if test_points is None else int(test_points)
    ais = {"num_steps": num_steps, "num_chains": num_chains, "leapfrog_steps": leapfrog_steps, "schedule": schedule}
    name = evaluation_name(method, num_samples=num_samples, ais=ais, num_points=num_points, test_points=test_points)
    device = resolve_device(device)
    directory = RunDirectory(run_dir)
    directory.check_resumable("pyro-vae evaluate")
    check_metrics_of_best(directory)
    run = load_run(directory.path, model=model, map_location=device)
    if method == "bdmc" and isinstance(run.model, SemiSupervisedModel):
        raise ValueError(
            "BDMC simulates points with their latents from the model and anneals every latent, but the label y "
            f"of {type(run.model).__name__} is discrete; estimate its log p(x) with method 'ais' (which sums y "
            "out) or 'is'."
        )
    if data is not None and run.config["data"] is not None:
        raise ValueError(
            f"{directory.path} was trained on {run.config['data']['name']!r}, whose test points its config rebuilds; "
            "leave data= out (it is for runs trained on tensors of your own)."
        )
    if data is not None and not isinstance(data, Dataset):
        raise TypeError(f"data= must be the pv.Dataset the run was trained on; got {type(data).__name__}.")
    if data is not None and (counts := run.config.get("data_points")) and len(data.test) != counts["test"]:
        raise ValueError(
            f"{directory.path} was trained on data with {counts['test']} test points; data= has {len(data.test)}. "
            "Give the pv.Dataset the run was trained on."
        )
    test_split = (run.load_data(data_dir=data_dir, download=download) if data is None else data).test
    recorded = (run.config.get("data_digests") or {}).get("test")  # runs before 2026-12-07 recorded none
    if recorded is not None and recorded["x"] != points_digest(test_split.x):  # log p(x) reads no labels
        raise ValueError(
            f"{directory.path} was trained with other test points than these (their values differ from the digest "
            "its config records: the data changed since). Restore the data it was trained on."
        )
    test = test_split.x
    if test_points is not None and test_points > len(test):
        raise ValueError(
            f"test_points must be at most the run's {len(test)} test points; got {test_points} "
            "(leave it out to evaluate all of them)."
        )
    x = test[:test_points].to(device)
    run.model.check_data(x, "test data")
    model, clock = run.model, _WallClock()
    identity = {"model_digest": parameter_digest(model), "seed": seed, "batch_size": batch_size}
    if method != "is":  # AIS's estimator: until 2026-12-07 its chains adapted their own step size, without pilots
        identity["pilot_chains"] = PILOT_CHAINS
    if method != "bdmc":  # BDMC's points are simulated
        identity["test_digest"] = points_digest(x)
    with directory.lock():
        directory.remove_stale_temporaries()
        _check_partial_evaluation(directory, name, identity)
        finished = directory.read_evaluation(name) if name in directory.evaluation_names() else None
        if method != "is" and finished is not None and _same_identity(finished, identity):
            kept = directory.read_metrics().get("evaluations", {}).get(name)
            if kept is not None:  # the same weights, points, seed and batch size: the same numbers again
                return {"evaluation": name, "kept": True, **kept}
        if method == "bdmc":
            bounds = _resumable_bdmc(directory, name, model, num_points, batch_size, ais, seed, progress, identity,
                                     clock)  # fmt: skip
            arrays = {"lower": bounds.lower.numpy(), "upper": bounds.upper.numpy()}
            summary = bounds.summary()
        else:
            arrays, summary = _evaluate_test_points(directory, name, model, x, method, num_samples, batch_size,
                                                    ais, seed, progress, identity, clock)  # fmt: skip
        summary.update(method=method, seconds=clock.seconds(), seed=seed, batch_size=batch_size)
        test_digest = identity.get("test_digest")
        points = {} if test_digest is None else {"test_digest": test_digest}
        estimator = {"pilot_chains": identity["pilot_chains"]} if "pilot_chains" in identity else {}  # AIS's
        made = {"model_digest": identity["model_digest"], "seed": seed, "batch_size": batch_size}  # what remakes it
        directory.write_evaluation(name, {**arrays, **made, **points, **estimator})
        metrics = directory.read_metrics()
        metrics.setdefault("evaluations", {})[name] = summary
        earlier = metrics.pop("earlier_evaluations", {})
        earlier.pop(name, None)  # its file now holds these weights' numbers
        metrics.update({"earlier_evaluations": earlier} if earlier else {})
        if method == "is" and test_points is None:  # the headline numbers and test_log_px.npy: all test points
            directory.keep_headline_apart(metrics, identity["model_digest"], num_samples)
            kept_apart = ("method", "seed", "batch_size", "seconds")
            headline = {key: value for key, value in summary.items() if key not in kept_apart}
            metrics.update({f"test_{key}": value for key, value in headline.items()})
            per_layer = active_units_per_layer(model, x)
            metrics.update({"active_units": sum(per_layer), "z_dim": model.z_dim, "log_px_seed": seed})
            metrics["log_px_batch_size"] = batch_size
            metrics[RunDirectory.LOG_PX_DIGEST] = identity["model_digest"]  # the weights test_log_px.npy describes
            metrics[RunDirectory.LOG_PX_TEST_DIGEST] = test_digest  # and the points
            if len(per_layer) > 1:
                metrics.update(active_units_per_layer=per_layer, latent_sizes=list(model.latent_sizes))
            directory.write_log_px(arrays["log_px"])
        directory.write_metrics(metrics)
        directory.remove_partial_evaluation(name)  # only now: a stop before this continues from every batch
    replaced = {} if finished is None else {"replaced": _how_made(finished, identity)}
    if method == "is" and test_points is None:
        return {
            "evaluation": name,
            **replaced,
            **{key: value for key, value in metrics.items() if key != "evaluations"},
        }
    return {"evaluation": name, **replaced, **summary}


def _how_made(earlier: dict, identity: dict) -> str:
    """How an evaluation replaced by one made as ``identity`` says differed from it, in words."""
    if str(earlier.get("model_digest")) != identity["model_digest"]:
        return "of earlier weights"
    if (
        "test_digest" in earlier
        and "test_digest" in identity
        and str(earlier["test_digest"]) != identity["test_digest"]
    ):
        return "of other test points"
    if _same_identity(earlier, identity):
        return "with the same settings (an importance-sampled estimate is made again; its numbers are the same)"
    settings = [f"{key.replace('_', ' ')} {earlier[key]}" for key in ("seed", "batch_size") if key in earlier]
    return f"with {', '.join(settings)}" if settings else "by an earlier pyro-vae"


def _evaluate_test_points(
    directory, name, model, x, method, num_samples, batch_size, ais, seed, progress, identity, clock
):
    """Per-point arrays and summary of an ``is``, ``ais`` or ``auto`` evaluation of the test points."""
    if method == "ais":
        estimate = _resumable_ais(
            directory, name, model, x, np.arange(len(x)), batch_size, ais, seed, progress, identity, clock
        )
        return estimate, ais_summary(*(estimate[key] for key in AIS_COLUMNS), ais)
    saved = directory.read_evaluation(name, partial=True) if method == "auto" else None
    if saved is not None and _same_identity(saved, identity) and "is_log_px" in saved:
        is_log_px, pareto_k = saved["is_log_px"], saved["pareto_k"]  # a continued "auto": its IS pass is kept
    else:
        importance = log_marginal_likelihood(
            model.model, model.guide, x, num_samples=num_samples, batch_size=batch_size, seed=seed, progress=progress
        )
        is_log_px, pareto_k = importance.log_px.double().numpy(), importance.pareto_k.numpy()
        if method == "is":
            return {"log_px": is_log_px, "pareto_k": pareto_k}, importance.summary()
        saved = {**identity, "is_log_px": is_log_px, "pareto_k": pareto_k, "seconds": clock.seconds()}
        directory.write_evaluation(name, saved, partial=True)  # kept if the AIS that follows is interrupted
    importance_pass = {"is_log_px": is_log_px, "pareto_k": pareto_k}
    unreliable = np.flatnonzero(untrusted(pareto_k, num_samples))
    log_px = is_log_px.copy()
    summary = {"num_points": len(x), "num_escalated": len(unreliable), "is_log_px": float(log_px.mean())}
    if len(unreliable):
        estimate = _resumable_ais(
            directory, name, model, x, unreliable, batch_size, ais, seed, progress, identity, clock, importance_pass
        )
        log_px[unreliable] = estimate["log_px"]
        annealed = ais_summary(*(estimate[key] for key in AIS_COLUMNS), ais)
        summary.update({f"escalated_{key}": value for key, value in annealed.items()})
    summary.update(log_px=float(log_px.mean()), log_px_se=standard_error(log_px))
    summary["nll"] = -summary["log_px"]
    escalated = np.zeros(len(x), dtype=bool)
    escalated[unreliable] = True
    arrays = {"log_px": log_px, "pareto_k": pareto_k, "escalated": escalated, "is_log_px": is_log_px}
    if len(unreliable):  # the escalated points' AIS diagnostics, in the order of their indices
        arrays.update({f"escalated_{key}": estimate[key] for key in AIS_COLUMNS if key != "log_px"})
    return arrays, summary


class _WallClock:
    """Wall seconds of an evaluation, those of the processes that began it counted when it is continued."""

    def __init__(self):
        self.started, self.earlier = time.perf_counter(), 0.0

    def seconds(self) -> float:
        return self.earlier + time.perf_counter() - self.started


def _same_identity(saved: dict, identity: dict) -> bool:
    """Whether a partial evaluation was begun as ``identity`` says (its points taken as the same where it
    predates their digest: the points were then always the run's own)."""
    return all(
        str(saved[key]) == str(value) if key in saved else key == "test_digest" for key, value in identity.items()
    )


def _check_partial_evaluation(directory, name: str, identity: dict) -> None:
    """Refuse to overwrite a partial evaluation of the same weights begun with another seed or batch size.

    One of other weights (the run trained on since) is of no use and is started again.
    """
    done = directory.read_evaluation(name, partial=True)
    if done is None or str(done.get("model_digest")) != identity["model_digest"] or _same_identity(done, identity):
        return
    if "pilot_chains" in identity and str(done.get("pilot_chains")) != str(identity["pilot_chains"]):
        raise ValueError(
            f"{directory.path} holds a partial evaluation {name!r} begun by an earlier pyro-vae, whose AIS "
            f"{'chains adapted their own step size' if 'pilot_chains' not in done else 'had other pilot chains'}; "
            f"its batches cannot be continued by this AIS (with {PILOT_CHAINS} pilot chains): delete "
            f"{directory.evaluation_path(name, partial=True)} to start again."
        )
    if "test_digest" in done and "test_digest" in identity and str(done["test_digest"]) != identity["test_digest"]:
        raise ValueError(
            f"{directory.path} holds a partial evaluation {name!r} of these weights begun on other test points; "
            f"evaluate the points it began on, or delete {directory.evaluation_path(name, partial=True)} to start "
            "again."
        )
    began = {key: done.get(key) for key in ("seed", "batch_size")}
    raise ValueError(
        f"{directory.path} holds a partial evaluation {name!r} of these weights begun with seed {began['seed']} and "
        f"batch size {began['batch_size']}; continue it with --seed {began['seed']} --batch-size "
        f"{began['batch_size']}, or delete {directory.evaluation_path(name, partial=True)} to start again."
    )


def _saved_batches(directory, name, identity: dict, keys, clock: _WallClock, indices=None) -> dict[str, list]:
    """The per-point columns of the batches a partial evaluation saved, or empty ones.

    They are continued only if the evaluation was begun with the same ``identity`` (weights, seed,
    batch size) and, where given, on the same point ``indices``; ``clock`` then counts the seconds
    spent on them.
    """
    done = directory.read_evaluation(name, partial=True) or {}
    same = _same_identity(done, identity)
    if indices is not None:
        same &= np.array_equal(done.get("indices", []), indices)
    if same and "seconds" in done:
        clock.earlier = float(done["seconds"])
    return {key: list(done.get(key, [])) if same else [] for key in keys}


def _evaluate_in_batches(directory, name, columns: dict[str, list], starts, compute, saved_with: dict, clock, what):
    """Extend ``columns`` by ``compute(index, begin)`` (a dict of per-point tensors) for every batch they lack,
    saving the partial evaluation as each finishes; a Ctrl-C keeps the batches done, for the same command to
    continue. ``what`` counts the points in the message, e.g. "of 10000 points"."""
    first = next(iter(columns))
    try:
        for index, begin in enumerate(starts):
            if begin < len(columns[first]):  # saved before
                continue
            for key, values in compute(index, begin).items():
                columns[key].extend(values.double().tolist())
            directory.write_evaluation(name, {**saved_with, **columns, "seconds": clock.seconds()}, partial=True)
    except KeyboardInterrupt:
        raise EvaluationInterrupted(
            f"Interrupted after {len(columns[first])} {what}; they are saved. Run the same pyro-vae evaluate command "
            "to continue."
        ) from None


def _resumable_ais(
    directory, name, model, x, indices, batch_size, ais, seed, progress, identity, clock, kept=None
) -> dict:
    """AIS of the points ``x[indices]`` in batches, each saved as it finishes; a saved batch is not rerun.

    A saved partial evaluation is continued only if it was begun on the same points, with the same
    weights, seed and batch size; otherwise it starts again. ``kept`` (arrays of the evaluation's
    earlier work, "auto"'s importance-sampling pass) is saved beside the batches.
    """

    def compute(index: int, begin: int) -> dict[str, torch.Tensor]:
        chosen = torch.as_tensor(indices[begin : begin + batch_size]).to(x.device)
        estimate = annealed_log_px(model, x[chosen], **ais, batch_size=batch_size, seed=seed + index)
        return {key: getattr(estimate, key) for key in AIS_COLUMNS}

    columns = _saved_batches(directory, name, identity, AIS_COLUMNS, clock, indices)
    starts = tqdm(range(0, len(indices), batch_size), desc=f"AIS {name}", disable=not progress, leave=False)
    saved_with = {"indices": indices, **(kept or {}), **identity}
    _evaluate_in_batches(directory, name, columns, starts, compute, saved_with, clock, f"of {len(indices)} points")
    return {key: np.asarray(value) for key, value in columns.items()}


def annealed_log_px(model: Model, x: torch.Tensor, **ais) -> AISEstimate:
    """AIS of a model's log p(x); for a semi-supervised model, the sum over its labels (M2's y is discrete)."""
    if isinstance(model, SemiSupervisedModel):
        return ais_log_marginal_likelihood_by_label(model.model, model.guide, x, model.num_classes, **ais)
    return ais_log_marginal_likelihood(model.model, model.guide, x, **ais)


def _resumable_bdmc(
    directory, name, model, num_points, batch_size, ais, seed, progress, identity, clock
) -> BDMCEstimate:
    """BDMC of ``num_points`` simulated points in batches, each saved as it finishes; a saved batch is not rerun.

    A saved partial evaluation is continued only if it was begun with the same weights, seed and batch size.
    """
    plan = BDMC(model.model, model.guide, num_points, **ais, batch_size=batch_size, seed=seed)
    columns = _saved_batches(directory, name, identity, ("lower", "upper"), clock)
    steps = 2 * ais["num_steps"]  # of the progress bar, per batch: forward and reverse chains
    done = sum(begin < len(columns["lower"]) for begin in plan.batches)
    bar = tqdm(total=steps * len(plan.batches), initial=steps * done, desc=f"BDMC {name}", disable=not progress,
               leave=False)  # fmt: skip

    def compute(index: int, begin: int) -> dict[str, torch.Tensor]:
        return dict(zip(("lower", "upper"), plan.bounds(index, bar), strict=True))

    with bar:
        what = f"of {num_points} simulated points"
        _evaluate_in_batches(directory, name, columns, plan.batches, compute, identity, clock, what)
    lower, upper = (torch.tensor(columns[key], dtype=torch.float64) for key in ("lower", "upper"))
    return BDMCEstimate(lower.float(), upper.float(), plan.x.cpu(), plan.settings)


def _test_set_identity(config: dict) -> tuple:
    """What fixes a run's test points in its config: the data set, whether it is binarised, the test subset
    (for evaluations made before their points' digest was saved with them)."""
    data = config["data"] or {}
    subset = (data.get("subset") or {}).get("test")
    return data.get("name"), data.get("binarize") != "none", subset


def _describe_test_points(config: dict) -> str:
    """A run's test points in words, from its config: the data set, how it is binarised, the subset."""
    data = config["data"]
    if data is None:
        return "test points of your own tensors"
    subset = (data.get("subset") or {}).get("test")
    return f"{data.get('name')} test points, binarize {data.get('binarize')}" + (f", first {subset}" if subset else "")


class _Compared(NamedTuple):
    """A run as :func:`compare_runs` reads it: its per-point values, the points' digest and how they were made."""

    path: Path
    config: dict
    metrics: dict
    log_px: np.ndarray
    points: str | None
    made: dict


def compare_runs(run_dirs: list[str | Path], evaluation: str | None = None) -> list[dict]:
    """One row per run: test log p(x) +- se, and the paired difference to the best run +- its se.

    :param evaluation: the name of the evaluation to compare (method and settings, e.g.
        ``ais-T400-C16-L2-sigmoid``); by default the importance-sampled ``test_log_px.npy``.
        Runs are paired only on the same evaluation of the same test points.

    The test ELBO and active units are of every test point: beside an evaluation of fewer points
    (``test_points``) they are left out (NaN and None). A run whose metrics describe other weights than
    its best checkpoint (stopped part-way after improving on them) is refused.
    """
    if len(run_dirs) < 1:
        raise ValueError("Give at least one run directory to compare.")
    if evaluation is not None and evaluation.startswith("bdmc-"):
        raise ValueError("BDMC bounds are of points simulated from each model, not of shared test points; "
                         "compare an is, ais or auto evaluation.")  # fmt: skip
    runs = []
    for run_dir in map(Path, run_dirs):
        directory = RunDirectory(run_dir)
        check_metrics_of_best(directory)
        metrics = directory.read_metrics()
        if evaluation is None:
            log_px, made_of = directory.read_log_px(), metrics.get(directory.LOG_PX_DIGEST)
            of_points = metrics.get(directory.LOG_PX_TEST_DIGEST)
            draws = {"seed": metrics.get("log_px_seed"), "batch_size": metrics.get("log_px_batch_size")}
        else:
            arrays = directory.read_evaluation(evaluation)
            log_px, made_of, of_points = arrays["log_px"], arrays.get("model_digest"), arrays.get("test_digest")
            summary = metrics.get("evaluations", {}).get(evaluation, {})
            draws = {"seed": summary.get("seed"), "batch_size": summary.get("batch_size")}
        if not _of_current_weights(directory, made_of):
            raise ValueError(
                f"The evaluation {evaluation or 'test_log_px.npy'!r} of {run_dir} was made of other weights "
                f"than its best checkpoint now (the run trained further); make it again: "
                f"{evaluate_command(run_dir, evaluation)}"
            )
        made = {**draws, "model_digest": None if made_of is None else str(made_of)}  # for the CSV: how it was made
        runs.append(_Compared(run_dir, directory.read_config(), metrics, log_px, of_points, made))
    if evaluation is None and len({run.metrics.get("test_num_samples") for run in runs}) > 1:
        raise ValueError(
            "The runs' test log p(x) were estimated with different numbers of importance samples, and the "
            "estimate rises with K, favouring the larger: "
            + ", ".join(f"{run.path}: K = {run.metrics.get('test_num_samples')}" for run in runs)
            + ". Evaluate them at one K (pyro-vae evaluate RUN --samples K), or compare a named evaluation."
        )
    by_digest = all(run.points is not None for run in runs)
    if by_digest:
        identities = [str(run.points) for run in runs]  # the digests of the points themselves
    else:
        identities = [_test_set_identity(run.config) for run in runs]
        if len(runs) > 1 and any(run.config["data"] is None for run in runs):
            raise ValueError(
                "A run trained on tensors of your own has an evaluation made before its test points were recorded "
                "with it, so it cannot be paired with other runs; run pyro-vae evaluate on each run again."
            )
    if len(set(identities)) > 1 or len({len(run.log_px) for run in runs}) > 1:
        raise ValueError(
            "The runs were evaluated on different test points, so their log p(x) cannot be compared point by point: "
            + "; ".join(
                f"{run.path}: {_describe_test_points(run.config)}, {len(run.log_px)} of them ({identity})"
                for run, identity in zip(runs, identities, strict=True)
            )
            + (
                ""
                if by_digest
                else " (evaluations made before their test points were recorded are matched by the "
                "data set of their run's config; evaluate those runs again to pair them by their points)"
            )
            + ". Evaluate them on the same points (pyro-vae evaluate RUN with one --test-points), or compare runs "
            "of one data set."
        )
    best = max(runs, key=lambda run: run.log_px.mean())
    rows = []
    for run_dir, config, metrics, log_px, _, made in runs:
        diff = log_px - best.log_px
        n = len(diff)
        whole = n == metrics.get("num_test", metrics.get("test_num_points"))  # the ELBO's and active units' points
        rows.append(
            {
                "run": str(run_dir),
                "prior": (config["model"] or {}).get("prior", {}).get("name", "custom"),
                "likelihood": (config["model"] or {}).get("likelihood", {}).get("name", "custom"),
                "log_px": float(log_px.mean()),
                "log_px_se": standard_error(log_px),
                "diff_to_best": float(diff.mean()),
                "diff_se": standard_error(diff),
                "elbo": metrics.get("test_elbo", float("nan")) if whole else float("nan"),
                "active_units": metrics.get("active_units") if whole else None,
                "evaluation": evaluation or f"is-K{metrics.get('test_num_samples')}",
                "num_points": n,
                **made,
            }
        )
    return sorted(rows, key=lambda row: -row["log_px"])


def comparison_markdown(rows: list[dict]) -> str:
    lines = [
        "| run | prior | likelihood | test log p(x) | paired difference to best | test ELBO | active units "
        "| estimate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = (
            "best" if r["diff_to_best"] == 0 and r["diff_se"] == 0 else f"{r['diff_to_best']:.2f} +- {r['diff_se']:.2f}"
        )
        elbo = "-" if math.isnan(r["elbo"]) else f"{r['elbo']:.2f}"  # "-": of other points than the log p(x)
        active = "-" if r["active_units"] is None else r["active_units"]
        lines.append(
            f"| {r['run']} | {r['prior']} | {r['likelihood']} | {r['log_px']:.2f} +- {r['log_px_se']:.2f} | {diff} | "
            f"{elbo} | {active} | {r['evaluation']} |"
        )
    return "\n".join(lines) + "\n"


def comparison_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
