"""The ``pyro-vae`` command.

``pyro-vae train`` trains a VAE and leaves a run directory (config,
checkpoint, history, metrics, figures); ``pyro-vae train --resume RUN``
continues it. ``pyro-vae evaluate RUN`` estimates its test log p(x);
``pyro-vae compare RUN RUN ...`` tabulates evaluated runs with paired
differences. Every piece is picked by a short name, recorded in the run's
config.json, so the run can be rebuilt exactly.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pyro

from .checkpoint import CONFIG, METRICS, CheckpointError, read_json
from .data import BINARIZE_MODES, DATASET_NAMES, DataError, Dataset, dataset_from_spec, load_dataset
from .evaluate import compare_runs, comparison_csv, comparison_markdown, evaluate_run
from .likelihoods import LIKELIHOODS, Gaussian, build_likelihood
from .nets import ARCHITECTURES
from .plots import save_figures, save_ssl_figures
from .priors import PRIORS, build_prior
from .runs import MODEL_TYPES, load_run
from .semisupervised import fit_ssvae
from .ssvae import CLASS_PRIORS, SSVAE
from .stacked import LatentFeatures, StackedSSVAE
from .train import ELBOS, TrainingDiverged, TrainingInterrupted, fit, resolve_device
from .vae import VAE

DEFAULT_EPOCHS = 30


def _dataset_name(value: str) -> str:
    if value in DATASET_NAMES or Path(value).suffix in (".npy", ".npz"):
        return value
    raise argparse.ArgumentTypeError(
        f"unknown data set {value!r} (choose from {', '.join(DATASET_NAMES)}, or a .npy/.npz file)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-vae",
        description="Variational Autoencoders as Pyro models and guides (Kingma & Welling, 2014).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser(
        "train",
        help="train a VAE and write a run directory",
        description="Train a VAE with SVI and write runs/<name>/: config.json, checkpoint.pt, history.csv, "
        "metrics.json and figures/. Without flags: a 784-400-20 Bernoulli VAE on the embedded, dynamically "
        "binarised MNIST, in about two minutes on two CPU cores.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = train.add_argument_group("data")
    data.add_argument(
        "--dataset", type=_dataset_name, default="mnist", help=f"one of {', '.join(DATASET_NAMES)}, or a .npy/.npz file"
    )
    data.add_argument("--data-dir", help="folder of torchvision data sets")
    data.add_argument(
        "--download", action="store_true", help="let torchvision download a missing data set (needs a network)"
    )
    data.add_argument(
        "--binarize",
        choices=BINARIZE_MODES,
        help="binarisation of the pixels [default: dynamic for the bernoulli likelihood, none for the others]",
    )
    data.add_argument("--subset", type=int, metavar="N", help="train on the first N training points only (quick tries)")

    model = train.add_argument_group("model")
    model.add_argument("--z-dim", type=int, default=20, help="latent dimension")
    model.add_argument("--hidden", type=int, nargs="+", default=[400], metavar="SIZE", help="hidden layer sizes")
    model.add_argument("--arch", choices=ARCHITECTURES, default="mlp", help="encoder/decoder architecture")
    model.add_argument("--prior", choices=sorted(PRIORS), default="standard-normal", help="prior p(z)")
    model.add_argument("--likelihood", choices=sorted(LIKELIHOODS), default="bernoulli", help="likelihood p(x|z)")
    model.add_argument(
        "--components",
        type=int,
        metavar="K",
        help="mixture and vamp priors: number of components / pseudo-inputs [default: 10 and 500]",
    )
    model.add_argument("--flow-layers", type=int, default=4, help="flow prior: number of autoregressive layers")
    model.add_argument(
        "--scale",
        "--sigma",
        dest="scale",
        choices=Gaussian.SCALE_MODES,
        default="fixed",
        help="gaussian and laplace likelihoods: fixed, learned (shared or per-dim) or decoder-predicted scale",
    )
    model.add_argument(
        "--init-scale", "--init-sigma", dest="init_scale", type=float, default=0.1, help="the (initial) scale"
    )

    training = train.add_argument_group("training")
    training.add_argument("--epochs", type=int, help="epochs in all [default: 30; with --resume: the run's own]")
    training.add_argument("--batch-size", type=int, default=128)
    training.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    training.add_argument(
        "--elbo", choices=sorted(ELBOS), default="trace", help="Trace_ELBO, TraceMeanField_ELBO or the IWAE bound"
    )
    training.add_argument("--particles", type=int, default=1, help="particles per ELBO estimate (K of the IWAE bound)")
    training.add_argument("--warmup-epochs", type=float, default=0.0, help="linear KL warm-up over this many epochs")
    training.add_argument("--beta", type=float, default=1.0, help="final weight of the KL term (1 is the ELBO)")
    training.add_argument("--seed", type=int, default=0)
    training.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")

    ssl = train.add_argument_group(
        "semi-supervised (M2 of Kingma et al. 2014)",
        "Train pv.SSVAE from a few labels: y is summed out exactly for unlabelled points (TraceEnum_ELBO).",
    )
    ssl.add_argument("--semi-supervised", action="store_true", help="train the semi-supervised SSVAE")
    ssl.add_argument("--labels", type=int, default=100, help="labelled training points, drawn class-balanced")
    ssl.add_argument("--label-seed", type=int, default=0, help="seed of the label draw")
    ssl.add_argument(
        "--aux-weight", type=float, help="alpha per labelled point on log q(y|x) [default: 0.1 N / labels]"
    )
    ssl.add_argument("--class-prior", choices=CLASS_PRIORS, default="uniform", help="p(y)")
    ssl.add_argument(
        "--m1",
        metavar="RUN",
        help="stack M2 on the code of this trained VAE run (Kingma et al.'s M1+M2); its data set is used",
    )
    ssl.add_argument("--eval-samples", type=int, default=1000, help="K of the final test log p(x); 0 skips it")

    parallel = train.add_argument_group(
        'distributed (Lightning DDP; needs pip install "pyro-vae[distributed]")',
        "Any of these options trains with PyTorch Lightning on several processes; --batch-size is then per process.",
    )
    parallel.add_argument("--devices", help="processes (CPU) or GPUs per node, e.g. 2, or auto")
    parallel.add_argument("--num-nodes", type=int, help="machines [default: 1]")
    parallel.add_argument("--strategy", help="Lightning strategy [default: ddp]")
    parallel.add_argument("--accelerator", choices=["cpu", "gpu", "auto"], help="[default: cpu]")

    output = train.add_argument_group("output")
    output.add_argument("--out", default="runs", help="folder of run directories")
    output.add_argument("--name", help="run name (default: <dataset>-<likelihood>-<prior>-<time>)")
    output.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue this run where it stopped (its last complete epoch, or where Ctrl-C saved it)",
    )
    output.add_argument("--no-progress", action="store_true", help="no progress bars")

    evaluate = commands.add_parser(
        "evaluate",
        help="estimate a run's test log p(x) by importance sampling",
        description="Estimate the test log p(x) of a run with K importance samples per point "
        "(logsumexp_k [log p(x, z_k) - log q(z_k|x)] - log K), with its standard error, the ELBO and its terms, "
        "the active units, and the importance-sampling diagnostics (ESS, Pareto k). Writes metrics.json and "
        "the per-point values test_log_px.npy into the run directory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    evaluate.add_argument("run", help="the run directory")
    evaluate.add_argument("--samples", type=int, default=5000, help="K, importance samples per test point")
    evaluate.add_argument("--batch-size", type=int, default=100, help="test points per batch")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")

    compare = commands.add_parser(
        "compare",
        help="compare evaluated runs by their test log p(x)",
        description="Tabulate evaluated runs by test log p(x) +- standard error, with each run's paired "
        "difference to the best (the same test points, so the difference is paired). Writes the table as "
        "markdown and CSV.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    compare.add_argument("runs", nargs="+", help="evaluated run directories")
    compare.add_argument("--out", default="comparison", help="write OUT.md and OUT.csv")
    return parser


def _evaluate(args) -> None:
    metrics = evaluate_run(
        args.run,
        num_samples=args.samples,
        batch_size=args.batch_size,
        seed=args.seed,
        device=resolve_device(args.device),
        progress=not args.no_progress,
    )
    print(
        f"{args.run}: test log p(x) = {metrics['test_log_px']:.2f} +- {metrics['test_log_px_se']:.2f} nats "
        f"(K = {metrics['test_num_samples']}, {metrics['test_num_points']} points)\n"
        f"  ELBO {metrics['test_elbo']:.2f} (reconstruction {metrics['test_reconstruction']:.2f}, "
        f"KL {metrics['test_kl']:.2f}); active units {metrics['active_units']} of {metrics['z_dim']}\n"
        f"  importance weights: mean ESS {metrics['test_ess_mean']:.1f}, "
        f"Pareto k > 0.7 on {metrics['test_num_unreliable']} points"
    )


def _compare(args) -> None:
    rows = compare_runs(args.runs)
    table = comparison_markdown(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table)
    out.with_suffix(".csv").write_text(comparison_csv(rows))
    print(table + f"\nwritten to {out.with_suffix('.md')} and {out.with_suffix('.csv')}")


def _prior_config(args) -> dict:
    config = {"name": args.prior}
    if args.prior in ("mixture", "vamp") and args.components is not None:
        config["num_components"] = args.components
    if args.prior == "flow":
        config["num_layers"] = args.flow_layers
    return config


def _likelihood_config(args) -> dict:
    if args.likelihood == "gaussian":
        return {"name": "gaussian", "sigma": args.scale, "init_sigma": args.init_scale}
    if args.likelihood == "laplace":
        return {"name": "laplace", "scale": args.scale, "init_scale": args.init_scale}
    return {"name": args.likelihood}


def _load_data(args) -> Dataset:
    data = load_dataset(
        args.dataset,
        binarize=args.binarize or ("dynamic" if args.likelihood == "bernoulli" else "none"),
        seed=args.seed,
        data_dir=args.data_dir,
        download=args.download,
    )
    if args.subset:
        data = data.subset(train=args.subset, val=max(args.subset // 5, 1), test=max(args.subset // 5, 1))
    return data


def _train(args) -> Path:
    if (
        args.semi_supervised
        or args.m1
        or (args.resume and read_json(Path(args.resume) / CONFIG)["train"].get("semi_supervised"))
    ):
        return _train_semi_supervised(args)
    if args.resume:
        run_dir = Path(args.resume)
        config = read_json(run_dir / "config.json")
        data = dataset_from_spec(config["data"])
        vae = VAE.from_config(config["model"])
        train = {**config["train"], "epochs": args.epochs or config["train"]["epochs"]}
        resume = True
    else:
        pyro.set_rng_seed(args.seed)
        data = _load_data(args)
        vae = VAE(
            data.x_shape,
            args.z_dim,
            prior=build_prior(_prior_config(args)),
            likelihood=build_likelihood(_likelihood_config(args)),
            hidden=args.hidden,
            arch=args.arch,
        )
        name = args.name or f"{data.name}-{args.likelihood}-{args.prior}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(args.out) / name
        train = {
            "epochs": args.epochs or DEFAULT_EPOCHS,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "elbo": args.elbo,
            "num_particles": args.particles,
            "warmup_epochs": args.warmup_epochs,
            "beta": args.beta,
            "seed": args.seed,
            "device": args.device,
        }
        resume = False
    if args.devices or args.num_nodes or args.strategy or args.accelerator:
        history = _fit_distributed(args, vae, data, train, run_dir, resume)
        if history is None:  # not process 0: it writes the run
            return run_dir
    else:
        print(f"run directory: {run_dir}")
        history = fit(vae, data, **train, run_dir=run_dir, resume=resume, progress=not args.no_progress)
    vae.cpu()
    figures = save_figures(vae, data.to("cpu"), history, run_dir / "figures")
    metrics = read_json(run_dir / "metrics.json")
    print(
        f"test ELBO {metrics['test_elbo']:.2f} +- {metrics['test_elbo_se']:.2f} nats per data point "
        f"(reconstruction {metrics['test_reconstruction']:.2f}, KL {metrics['test_kl']:.2f})"
    )
    print(f"figures: {', '.join(p.name for p in figures)} in {run_dir / 'figures'}")
    return run_dir


def _train_semi_supervised(args) -> Path:
    if args.resume:
        run_dir = Path(args.resume)
        config = read_json(run_dir / CONFIG)
        data = dataset_from_spec(config["data"])
        ssvae = MODEL_TYPES[config["model"]["type"]].from_config(config["model"])
        train = {key: value for key, value in config["train"].items() if key != "semi_supervised"}
        train["epochs"] = args.epochs or train["epochs"]
    else:
        pyro.set_rng_seed(args.seed)
        prior = build_prior(_prior_config(args))
        if args.m1:
            m1 = load_run(args.m1)
            if m1.config["model"].get("type", "vae") != "vae":
                raise ValueError(f"--m1 needs the run of a plain VAE; {args.m1} holds a {m1.config['model']['type']}.")
            data = m1.load_data()
            features = LatentFeatures.fit(m1.vae, data.train.x)
            ssvae = StackedSSVAE(
                m1.vae, features, args.z_dim, prior=prior, hidden=args.hidden, class_prior=args.class_prior
            )
            print(f"M1: {args.m1}, {features.num_active} of its {m1.vae.z_dim} latent units active")
        else:
            data = _load_data(args)
            ssvae = SSVAE(
                data.x_shape,
                args.z_dim,
                prior=prior,
                likelihood=build_likelihood(_likelihood_config(args)),
                hidden=args.hidden,
                class_prior=args.class_prior,
            )
        kind = "m1m2" if args.m1 else "ssvae"
        run_dir = Path(args.out) / (
            args.name or f"{data.name}-{kind}-{args.labels}-labels-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        train = {
            "num_labels": args.labels,
            "label_seed": args.label_seed,
            "epochs": args.epochs or DEFAULT_EPOCHS,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "aux_weight": args.aux_weight,
            "seed": args.seed,
            "device": args.device,
        }
    print(f"run directory: {run_dir}")
    history = fit_ssvae(
        ssvae,
        data,
        **train,
        run_dir=run_dir,
        resume=bool(args.resume),
        eval_samples=args.eval_samples,
        progress=not args.no_progress,
    )
    ssvae.cpu()
    figures = save_ssl_figures(ssvae, data.to("cpu"), history, run_dir / "figures")
    metrics = read_json(run_dir / METRICS)
    print(
        f"best epoch {metrics['best_epoch']}: validation accuracy {100 * metrics['val_accuracy']:.2f}%, "
        f"test accuracy {100 * metrics['test_accuracy']:.2f}%"
    )
    if "test_log_px" in metrics:
        print(
            f"test log p(x) {metrics['test_log_px']:.2f} +- {metrics['test_log_px_se']:.2f} "
            f"(K = {metrics['test_num_samples']}, y drawn from q(y|x))"
        )
    print(f"figures: {', '.join(p.name for p in figures)} in {run_dir / 'figures'}")
    return run_dir


def _fit_distributed(args, vae, data, train, run_dir, resume):
    try:
        from .distributed import fit_distributed
    except ImportError as err:
        raise ValueError(
            f"Training on several processes needs PyTorch Lightning ({err}); "
            'install it with: pip install "pyro-vae[distributed]"'
        ) from err
    distributed = {
        "devices": int(args.devices) if str(args.devices).isdigit() else (args.devices or "auto"),
        "num_nodes": args.num_nodes or 1,
        "strategy": args.strategy or "ddp",
        "accelerator": args.accelerator or "cpu",
    }
    train = {key: value for key, value in train.items() if key != "device"}
    return fit_distributed(
        vae, data, **train, **distributed, run_dir=run_dir, resume=resume, progress=not args.no_progress
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        {"train": _train, "evaluate": _evaluate, "compare": _compare}[args.command](args)
    except (DataError, CheckpointError, TrainingDiverged, ValueError) as err:
        print(f"pyro-vae: error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as err:
        print(f"pyro-vae: {err}", file=sys.stderr)
        return 130  # the shell's code for a SIGINT
    except KeyboardInterrupt:
        print("pyro-vae: interrupted; every completed epoch is saved in the run directory.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
