"""The semi-supervised study: M1+M2 test accuracy from 100, 600, 1000 and 3000 MNIST labels.

    python examples/semi_supervised_study.py --jobs 2       # the study in benchmarks/RESULTS.md
    python examples/semi_supervised_study.py --m1 runs/compare-priors/standard-normal   # reuse a trained M1
    python examples/semi_supervised_study.py --m1-epochs 1 --epochs 1 --subset 2000 --labels 100 --samples 5   # smoke

Kingma et al.'s (2014) M1+M2: M1 is a VAE trained without labels (the
standard-normal VAE of ``examples/compare_priors.py``: 784-300-300-40,
Bernoulli, dynamically binarised MNIST, 250 epochs); M2 is then trained on
its code by ``pyro-vae train --m1 RUN --labels N``, once per label count and
label draw. The script prints and writes (``ssl_table.md``) the test
accuracy of each run, the mean and standard deviation over the label draws,
and the stacked model's test log p(x).

Every step is the ``pyro-vae`` command; finished runs are kept, interrupted
ones resume, and a larger ``--epochs`` trains the finished runs further, so
the study can be run again after a stop.
``--jobs 2`` trains two M2s at a time, each on one thread.
"""

import argparse
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pyro_vae import cli, load_run
from pyro_vae.checkpoint import read_json

TARGETS = {100: 93.5, 600: 94.5, 1000: 95.0, 3000: 96.0}


def run_cli(argv: list[str], threads: int | None = None) -> None:
    """``pyro-vae ARGV`` in this process, or in a child process on ``threads`` threads."""
    if threads is None:
        code = cli.main(argv)
    else:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        code = subprocess.run([sys.executable, "-m", "pyro_vae.cli", *argv], env=env).returncode
    if code != 0:
        raise SystemExit(f"pyro-vae {' '.join(argv)} failed with exit code {code}")


def train_m1(args, out: Path) -> Path:
    run = out / "m1"
    subset = ["--subset", str(args.subset)] if args.subset else []
    if not (run / "config.json").exists():
        run_cli([
            "train", *subset, "--z-dim", "40", "--hidden", "300", "300", "--batch-size", "100", "--lr", "1e-3",
            "--epochs", str(args.m1_epochs), "--warmup-epochs", "10", "--seed", "0",
            "--out", str(out), "--name", "m1", "--no-progress",
        ])  # fmt: skip
    elif load_run(run).epoch < args.m1_epochs:
        run_cli(["train", "--resume", str(run), "--epochs", str(args.m1_epochs), "--no-progress"])
    return run


def train_m2(m1: Path, labels: int, label_seed: int, args, out: Path, threads: int | None) -> Path:
    run = out / f"m1m2-{labels}-labels-draw-{label_seed}"
    if (run / "metrics.json").exists() and load_run(run).epoch >= args.epochs:
        return run
    if (run / "config.json").exists():
        run_cli([
            "train", "--resume", str(run), "--epochs", str(args.epochs), "--eval-samples", str(args.samples),
            "--no-progress",
        ], threads)  # fmt: skip
    else:
        run_cli([
            "train", "--m1", str(m1), "--labels", str(labels), "--label-seed", str(label_seed),
            "--z-dim", "10", "--hidden", "500", "--batch-size", "200", "--lr", "1e-3", "--epochs", str(args.epochs),
            "--eval-samples", str(args.samples), "--out", str(out), "--name", run.name, "--no-progress",
        ], threads)  # fmt: skip
    return run


def table(runs: dict[int, list[Path]]) -> str:
    lines = [
        "| labels | test accuracy (mean +- sd over draws) | each draw | target | test log p(x) (first draw) |",
        "|---|---|---|---|---|",
    ]
    for labels, dirs in runs.items():
        metrics = [read_json(run / "metrics.json") for run in dirs]
        accuracies = [100 * m["test_accuracy"] for m in metrics]
        spread = f" +- {statistics.stdev(accuracies):.2f}" if len(accuracies) > 1 else ""
        log_px = metrics[0].get("test_log_px")
        density = "" if log_px is None else f"{log_px:.2f} +- {metrics[0]['test_log_px_se']:.2f}"
        target = TARGETS.get(labels)
        lines.append(
            f"| {labels} | {statistics.mean(accuracies):.2f}%{spread} | {', '.join(f'{a:.2f}' for a in accuracies)} "
            f"| {'' if target is None else f'at least {target}%'} | {density} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m1", help="a trained VAE run to use as M1 [default: train one into OUT/m1]")
    parser.add_argument("--m1-epochs", type=int, default=250, help="epochs of M1 when the script trains it")
    parser.add_argument("--labels", type=int, nargs="+", default=list(TARGETS), help="label counts")
    parser.add_argument("--label-seeds", type=int, nargs="+", default=[0], help="label draws per count")
    parser.add_argument("--epochs", type=int, default=200, help="epochs of each M2")
    parser.add_argument("--samples", type=int, default=1000, help="K of each test log p(x)")
    parser.add_argument("--subset", type=int, help="train M1 on this many points only (smoke tests)")
    parser.add_argument("--jobs", type=int, default=1, help="M2 runs at a time, one thread each when above 1")
    parser.add_argument("--out", default="runs/semi-supervised-study")
    args = parser.parse_args()
    out = Path(args.out)

    m1 = Path(args.m1) if args.m1 else train_m1(args, out)
    jobs = [(labels, seed) for labels in args.labels for seed in args.label_seeds]
    threads = 1 if args.jobs > 1 else None
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = list(pool.map(lambda job: train_m2(m1, *job, args, out, threads), jobs))
    runs = {
        labels: [run for (count, _), run in zip(jobs, done, strict=True) if count == labels] for labels in args.labels
    }
    result = table(runs)
    (out / "ssl_table.md").write_text(result)
    print(f"M1: {m1}\n{result}")


if __name__ == "__main__":
    main()
