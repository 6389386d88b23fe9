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

import numpy as np
import torch

from .checkpoint import METRICS, atomic_write_bytes, read_json, write_json
from .marginal import log_marginal_likelihood
from .runs import load_run
from .stacked import posterior_means
from .vae import VAE

LOG_PX = "test_log_px.npy"


@torch.no_grad()
def active_units(vae: VAE, x: torch.Tensor, threshold: float = 0.01, batch_size: int = 1000) -> int:
    """Latent dimensions u with Cov_x(E_{q(u|x)}[u]) > threshold (Burda et al. 2015, section 5.2)."""
    return int((posterior_means(vae, x, batch_size).var(0) > threshold).sum())


def evaluate_run(
    run_dir: str | Path,
    *,
    num_samples: int = 5000,
    batch_size: int = 100,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Test log p(x) with its standard error, the ELBO and its terms, and the active units of a run."""
    run_dir = Path(run_dir)
    run = load_run(run_dir, map_location=device)
    x = run.load_data().test.x.to(device)
    run.vae.check_data(x, "test data")
    estimate = log_marginal_likelihood(
        run.vae.model, run.vae.guide, x, num_samples=num_samples, batch_size=batch_size, seed=seed, progress=progress
    )
    summary = estimate.summary()
    metrics = read_json(run_dir / METRICS) if (run_dir / METRICS).exists() else {}
    metrics.update({f"test_{key}": value for key, value in summary.items()})
    metrics.update({"active_units": active_units(run.vae, x), "z_dim": run.vae.z_dim, "log_px_seed": seed})
    buffer = io.BytesIO()
    np.save(buffer, estimate.log_px.double().numpy())
    atomic_write_bytes(run_dir / LOG_PX, buffer.getvalue())
    write_json(run_dir / METRICS, metrics)
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
        if not (run_dir / LOG_PX).exists():
            raise ValueError(f"{run_dir} has no per-point log p(x); run `pyro-vae evaluate {run_dir}` first.")
        metrics = read_json(run_dir / METRICS)
        runs.append((run_dir, read_json(run_dir / "config.json"), metrics, np.load(run_dir / LOG_PX)))
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
