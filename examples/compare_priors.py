"""The prior-swapping study: three VAEs that differ only in p(z), compared by test log p(x).

    python examples/compare_priors.py                  # the study, with the decoder's output bias started at the data
    python examples/compare_priors.py --output-bias random   # the study as measured in benchmarks/RESULTS.md
    python examples/compare_priors.py --epochs 1 --subset 500 --samples 10 --components 5   # a smoke test

Trains a standard-normal, a mixture-of-Gaussians and a VampPrior VAE under
the same budget (network, epochs, optimiser, warm-up, seed) on the embedded,
dynamically binarised MNIST, estimates each one's test log p(x) with K
importance samples, and prints the ``pyro-vae compare`` table: log p(x) +-
standard error, and each model's paired difference to the best.

Every step is one call of the Python API that the ``pyro-vae`` command
runs, so the study is also a recipe: ``pv.train_run`` is ``pyro-vae train
--prior vamp ...``, ``pv.evaluate_run`` is ``pyro-vae evaluate`` and
``pv.compare_runs`` is ``pyro-vae compare``. It is resumable: run it again
after an interruption and finished runs are kept, a half-trained one
continues from its last epoch (``pv.resume_run``); run it again with more
``--epochs`` and every run trains on from where it stopped (bit-identical to
training that long in one go) and is evaluated again.
"""

import argparse
from pathlib import Path

import pyro

import pyro_vae as pv
from pyro_vae.cli import non_negative_float, positive_int, seed_value
from pyro_vae.evaluate import comparison_csv, comparison_markdown
from pyro_vae.plots import plot_samples_side_by_side
from pyro_vae.training.engine import OUTPUT_BIAS_STARTS
from pyro_vae.workflow import training_settings

PRIORS = {"standard-normal": "standard normal", "mixture": "mixture of Gaussians", "vamp": "VampPrior"}


def prior_config(prior: str, args) -> dict:
    """The study's config of ``prior``: ``--components`` components and pseudo-inputs where it has them."""
    config = {"name": prior}
    if args.components and prior != "standard-normal":
        config["num_components"] = args.components
    return pv.priors.build_prior(config).config()


def check_before_training(args, out: Path) -> None:
    """Refuse, before any training, a --subset larger than the data, and a run in --out of other settings than
    these (it would be trained on with its own) or already trained past --epochs."""
    if args.subset:
        try:
            pv.load_dataset("mnist").quick_subset(args.subset)
        except pv.DataError as err:
            raise SystemExit(str(err)) from None
    for prior in PRIORS:
        directory = pv.RunDirectory(run := out / prior)
        if not directory.holds_run():
            continue
        config = directory.read_config()
        train = training_settings(config)
        recorded = {
            "--output-bias": train["output_bias"],
            "--seed": train["seed"],
            "--warmup-epochs": train["warmup_epochs"],
            "--subset": (config["data"].get("subset") or {}).get("train"),
            "--components": config["model"]["prior"].get("num_components"),
        }
        ours = {"--output-bias": args.output_bias, "--seed": args.seed, "--warmup-epochs": args.warmup_epochs,
                "--subset": args.subset, "--components": prior_config(prior, args).get("num_components")}  # fmt: skip
        default = pv.priors.build_prior({"name": prior}).config().get("num_components")
        unset = {"--subset": None, "--components": default}  # what leaving the flag out gives
        other = [f"no {flag}" if recorded[flag] == unset.get(flag, ()) else f"{flag} {recorded[flag]}"
                 for flag in ours if recorded[flag] != ours[flag]]  # fmt: skip
        if other:
            raise SystemExit(f"{run} was trained with {' '.join(other)}; give that, or another --out.")
        if (last := directory.load_checkpoint("last")["epoch"]) > args.epochs:
            raise SystemExit(f"{run} has trained {last} epochs, past --epochs {args.epochs}: give --epochs {last} or "
                             "more, or another --out.")  # fmt: skip


def new_run(prior: str, args, run: Path) -> None:
    """``pyro-vae train --prior PRIOR --z-dim 40 --hidden 300 300 --batch-size 100 ...``, from Python."""
    pyro.set_rng_seed(args.seed)
    prior_module = pv.priors.build_prior(prior_config(prior, args))
    data = pv.load_dataset("mnist", binarize="dynamic", seed=args.seed)  # the embedded copy, no network
    if args.subset:
        data = data.quick_subset(args.subset)
    vae = pv.VAE(
        data.x_shape,
        z_dim=40,
        prior=prior_module,
        likelihood=pv.likelihoods.Bernoulli(),
        hidden=(300, 300),
    )
    pv.train_run(
        vae, data, run, objective="trace", epochs=args.epochs, batch_size=100, lr=1e-3,
        warmup_epochs=args.warmup_epochs, seed=args.seed, eval_samples=0, output_bias=args.output_bias,
        progress=False,
    )  # fmt: skip


def train_and_evaluate(prior: str, args, out: Path) -> Path:
    run = out / prior
    directory = pv.RunDirectory(run)
    if not directory.holds_run():
        new_run(prior, args, run)
    elif (
        max(args.epochs, directory.read_config()["train"]["epochs"]) > directory.load_checkpoint("last")["epoch"]
        or not directory.training_finished()
    ):
        pv.resume_run(run, epochs=args.epochs, progress=False)
    metrics = directory.read_metrics()
    last_epoch = directory.load_checkpoint("last")["epoch"]
    evaluated = directory.file(directory.LOG_PX).exists() and metrics.get("test_num_samples") == args.samples
    if not evaluated or metrics.get("epochs") != last_epoch:
        metrics = pv.evaluate_run(run, num_samples=args.samples, progress=False)
    print(
        f"{prior}: best epoch {metrics['best_epoch']} of {last_epoch}, test log p(x) = "
        f"{metrics['test_log_px']:.2f} +- {metrics['test_log_px_se']:.2f} nats (K = {metrics['test_num_samples']})"
    )
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=positive_int, default=250)
    parser.add_argument("--warmup-epochs", type=non_negative_float, default=10, help="linear KL warm-up")
    parser.add_argument("--samples", type=positive_int, default=5000, help="K, importance samples per test point")
    parser.add_argument("--components", type=positive_int, help="mixture components and pseudo-inputs [10 and 500]")
    parser.add_argument("--subset", type=positive_int, help="train on this many points only (smoke tests)")
    parser.add_argument("--seed", type=seed_value, default=0)
    parser.add_argument(
        "--output-bias", choices=OUTPUT_BIAS_STARTS, default="data", help="the decoder's output-bias start"
    )
    parser.add_argument("--out", default="runs/compare-priors")
    args = parser.parse_args()
    out = Path(args.out)

    check_before_training(args, out)
    runs = [train_and_evaluate(prior, args, out) for prior in PRIORS]
    rows = pv.compare_runs(runs)
    comparison = out / "comparison"
    markdown, csv = comparison.with_suffix(".md"), comparison.with_suffix(".csv")
    markdown.write_text(comparison_markdown(rows))
    csv.write_text(comparison_csv(rows))
    print(f"{comparison_markdown(rows)}\nwritten to {markdown} and {csv}")
    models = {PRIORS[run.name]: pv.load_run(run).model for run in runs}  # each run's best checkpoint
    figure = plot_samples_side_by_side(models, out / "prior_samples.png")
    seconds = {run.name: round(pv.RunDirectory(run).read_metrics()["train_seconds"]) for run in runs}
    print(f"training seconds: {seconds}")
    print(f"samples from each prior: {figure}")


if __name__ == "__main__":
    main()
