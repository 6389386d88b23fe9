"""The prior-swapping study: three VAEs that differ only in p(z), compared by test log p(x).

    python examples/compare_priors.py                  # the study in benchmarks/RESULTS.md
    python examples/compare_priors.py --epochs 1 --subset 500 --samples 10 --components 5   # a smoke test

Trains a standard-normal, a mixture-of-Gaussians and a VampPrior VAE under
the same budget (network, epochs, optimiser, warm-up, seed) on the embedded,
dynamically binarised MNIST, estimates each one's test log p(x) with K
importance samples, and prints the ``pyro-vae compare`` table: log p(x) +-
standard error, and each model's paired difference to the best.

Every step is the ``pyro-vae`` command, so the study is also a recipe:
``pyro-vae train --prior vamp ...``, ``pyro-vae evaluate``, ``pyro-vae
compare``. It is resumable: run it again after an interruption and finished
runs are kept, a half-trained one continues from its last epoch; run it
again with more ``--epochs`` and every run trains on from where it stopped
(bit-identical to training that long in one go) and is evaluated again.
"""

import argparse
from pathlib import Path

from pyro_vae import cli, load_run
from pyro_vae.checkpoint import read_json
from pyro_vae.plots import plot_samples_side_by_side

PRIORS = {"standard-normal": "standard normal", "mixture": "mixture of Gaussians", "vamp": "VampPrior"}


def run_cli(*argv: str) -> None:
    if cli.main(list(argv)) != 0:
        raise SystemExit(f"pyro-vae {argv[0]} failed")


def train_and_evaluate(prior: str, args, out: Path) -> Path:
    run = out / prior
    if not (run / "config.json").exists():
        components = ["--components", str(args.components)] if args.components and prior != "standard-normal" else []
        subset = ["--subset", str(args.subset)] if args.subset else []
        run_cli(
            "train", "--prior", prior, *components, *subset,
            "--z-dim", "40", "--hidden", "300", "300", "--batch-size", "100", "--lr", "1e-3",
            "--epochs", str(args.epochs), "--warmup-epochs", str(args.warmup_epochs), "--seed", str(args.seed),
            "--out", str(out), "--name", prior, "--no-progress",
        )  # fmt: skip
    elif max(args.epochs, read_json(run / "config.json")["train"]["epochs"]) > load_run(run).epoch:
        run_cli("train", "--resume", str(run), "--epochs", str(args.epochs), "--no-progress")
    metrics = read_json(run / "metrics.json")
    if metrics.get("test_num_samples") != args.samples or metrics.get("epochs") != load_run(run).epoch:
        run_cli("evaluate", str(run), "--samples", str(args.samples), "--no-progress")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=250)
    parser.add_argument("--warmup-epochs", type=float, default=10, help="linear KL warm-up")
    parser.add_argument("--samples", type=int, default=5000, help="K, importance samples per test point")
    parser.add_argument("--components", type=int, help="mixture components and pseudo-inputs [10 and 500]")
    parser.add_argument("--subset", type=int, help="train on this many points only (smoke tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/compare-priors")
    args = parser.parse_args()
    out = Path(args.out)

    runs = [train_and_evaluate(prior, args, out) for prior in PRIORS]
    run_cli("compare", *map(str, runs), "--out", str(out / "comparison"))
    figure = plot_samples_side_by_side({PRIORS[run.name]: load_run(run).vae for run in runs}, out / "prior_samples.png")
    print(f"training seconds: { {run.name: round(read_json(run / 'metrics.json')['train_seconds']) for run in runs} }")
    print(f"samples from each prior: {figure}")


if __name__ == "__main__":
    main()
