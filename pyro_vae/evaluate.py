"""Evaluating trained runs by their marginal likelihood, and comparing them.

:func:`evaluate_run` estimates the test log p(x) of a run with K importance
samples, stores the per-point values (``test_log_px.npy``) next to the
run's ``metrics.json``, and counts the active units.

:func:`compare_runs` reads those per-point values. All runs are scored on the
same test points, so the difference between two models is a *paired*
difference: its standard error is that of the per-point differences, much
smaller than the two separate standard errors would suggest.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import torch

from .infer import log_marginal_likelihood
from .models import Model
from .runs import RunDirectory, load_run


@torch.no_grad()
def active_units(model: Model, x: torch.Tensor, threshold: float = 0.01, batch_size: int = 1000) -> int:
    """Latent dimensions u with Cov_x(E_{q(u|x)}[u]) > threshold (Burda et al. 2015, section 5.2)."""
    return int((model.latent_means(x, batch_size).var(0) > threshold).sum())


def evaluate_run(
    run_dir: str | Path,
    *,
    num_samples: int = 5000,
    batch_size: int = 100,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Test log p(x) with its standard error, the ELBO and its terms, and the active units of a run.

    The run's best checkpoint is evaluated, the one whose test numbers ``metrics.json`` already holds.
    """
    directory = RunDirectory(run_dir)
    run = load_run(directory.path, map_location=device)
    x = run.load_data().test.x.to(device)
    run.model.check_data(x, "test data")
    estimate = log_marginal_likelihood(
        run.model.model,
        run.model.guide,
        x,
        num_samples=num_samples,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    summary = estimate.summary()
    with directory.lock():
        metrics = directory.read_metrics()
        metrics.update({f"test_{key}": value for key, value in summary.items()})
        metrics.update({"active_units": active_units(run.model, x), "z_dim": run.model.z_dim, "log_px_seed": seed})
        directory.write_log_px(estimate.log_px.double().numpy())
        directory.write_metrics(metrics)
    return metrics


def _test_set_identity(config: dict) -> tuple:
    """What fixes the test points: the data set, whether it is binarised, and the test subset."""
    data = config["data"] or {}
    subset = (data.get("subset") or {}).get("test")
    return data.get("name"), data.get("binarize") != "none", subset


def compare_runs(run_dirs: list[str | Path]) -> list[dict]:
    """One row per run: test log p(x) +- se, and the paired difference to the best run +- its se."""
    if len(run_dirs) < 1:
        raise ValueError("Give at least one run directory to compare.")
    runs = []
    for run_dir in map(Path, run_dirs):
        directory = RunDirectory(run_dir)
        log_px = directory.read_log_px()
        runs.append((run_dir, directory.read_config(), directory.read_metrics(), log_px))
    identities = {_test_set_identity(config) for _, config, _, _ in runs}
    lengths = {len(log_px) for *_, log_px in runs}
    if len(identities) > 1 or len(lengths) > 1:
        raise ValueError(
            "The runs were evaluated on different test points, so their log p(x) cannot be compared point by point: "
            + "; ".join(f"{d}: data {_test_set_identity(c)}, {len(lp)} points" for d, c, _, lp in runs)
        )
    best = max(runs, key=lambda run: run[3].mean())
    rows = []
    for run_dir, config, metrics, log_px in runs:
        diff = log_px - best[3]
        n = len(diff)
        rows.append(
            {
                "run": str(run_dir),
                "prior": (config["model"] or {}).get("prior", {}).get("name", "custom"),
                "likelihood": (config["model"] or {}).get("likelihood", {}).get("name", "custom"),
                "log_px": float(log_px.mean()),
                "log_px_se": float(log_px.std(ddof=1) / math.sqrt(n)),
                "diff_to_best": float(diff.mean()),
                "diff_se": float(diff.std(ddof=1) / math.sqrt(n)),
                "elbo": metrics.get("test_elbo", float("nan")),
                "active_units": metrics.get("active_units"),
                "num_samples": metrics.get("test_num_samples"),
                "num_points": n,
            }
        )
    return sorted(rows, key=lambda row: -row["log_px"])


def comparison_markdown(rows: list[dict]) -> str:
    lines = [
        "| run | prior | likelihood | test log p(x) | paired difference to best | ELBO | active units | K |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = (
            "best" if r["diff_to_best"] == 0 and r["diff_se"] == 0 else f"{r['diff_to_best']:.2f} +- {r['diff_se']:.2f}"
        )
        lines.append(
            f"| {r['run']} | {r['prior']} | {r['likelihood']} | {r['log_px']:.2f} +- {r['log_px_se']:.2f} | {diff} | "
            f"{r['elbo']:.2f} | {r['active_units']} | {r['num_samples']} |"
        )
    return "\n".join(lines) + "\n"


def comparison_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
