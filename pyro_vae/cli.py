"""The ``pyro-vae`` command.

``pyro-vae train`` trains a model and leaves a run directory (config,
checkpoints, history, metrics, figures); ``pyro-vae train --resume RUN``
continues it. ``pyro-vae evaluate RUN`` estimates its test log p(x);
``pyro-vae compare RUN RUN ...`` tabulates evaluated runs with paired
differences. Every piece is picked by a short name, recorded in the run's
config.json, so the run can be rebuilt exactly. Every value is checked
before any work starts: a bad one gets a one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import logging
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path

import pyro
import torch

from .checks import first_line
from .components.likelihoods import LIKELIHOODS, Gaussian, build_likelihood
from .components.nets import ACTIVATIONS, ARCHITECTURES
from .components.priors import PRIORS
from .data import BINARIZE_MODES, DATASET_NAMES, TORCHVISION_DATASETS, DataError, Dataset, is_data_file, load_dataset
from .evaluate import (
    DEFAULT_EVALUATION_BATCH,
    METHODS,
    EvaluationInterrupted,
    compare_runs,
    comparison_csv,
    comparison_markdown,
    evaluate_run,
)
from .infer.ais import (
    DEFAULT_BDMC_POINTS,
    DEFAULT_CHAINS,
    DEFAULT_LEAPFROG_STEPS,
    DEFAULT_SCHEDULE,
    DEFAULT_STEPS,
    SCHEDULES,
)
from .infer.importance import DEFAULT_NUM_SAMPLES, pareto_k_assessable, pareto_threshold
from .infer.path_derivatives import GRADIENTS
from .infer.semisupervised import check_label_count
from .models import SSVAE, VAE, HierarchicalVAE, LatentFeatures, StackedSSVAE
from .models.ssvae import CLASS_PRIORS, class_count
from .registry import load_plugins
from .runs import CheckpointError, RunDirectory, load_run
from .training import LightningProcesses, TrainingDiverged, TrainingInterrupted
from .training.engine import AUTO_COMPILE_STEPS, MAX_SEED, OUTPUT_BIAS_STARTS, resolve_device
from .training.parallel import STRATEGIES, ProcessFailed
from .training.precision import MATMUL_PRECISIONS
from .training.schedules import LR_SCHEDULES
from .workflow import resume_run, train_run

DEFAULT_EVAL_SAMPLES = 1000
#: --compile values and the ``compile`` argument of ``fit`` each stands for.
COMPILE_CHOICES = {"auto": "auto", "on": True, "off": False}
VAE_OBJECTIVES = ("trace", "meanfield", "iwae")


# ------------------------------------------------------------ value checks
def _number(kind, low=None, high=None, *, low_open=False, high_open=False, what=None):
    """An argparse type: ``kind`` (int or float) within [low, high] (low excluded with ``low_open``, high with
    ``high_open``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(
                f"{text} is out of range; {what or _range(low, high, low_open, high_open)}"
            )
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _range(low, high, low_open, high_open) -> str:
    if high is None:
        return f"give a value {'>' if low_open else '>='} {low}"
    return f"give a value in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


positive_int = _number(int, 1)
count_or_zero = _number(int, 0)
seed_value = _number(int, 0, MAX_SEED)
positive_float = _number(float, 0, low_open=True)
non_negative_float = _number(float, 0)
decay_value = _number(float, 0, 1, high_open=True)


def _dataset_name(value: str) -> str:
    if value in DATASET_NAMES or is_data_file(value):
        return value
    raise argparse.ArgumentTypeError(
        f"unknown data set {value!r} (choose from {', '.join(DATASET_NAMES)}, or a .npy/.npz file)"
    )


def _val_size(value: str) -> int | float:
    """A count of validation points (1 or more), or a fraction of the training points (between 0 and 1)."""
    try:
        size = float(value)
    except ValueError:
        size = math.nan
    if size >= 1 and size.is_integer():
        return int(size)
    if 0 < size < 1:
        return size
    raise argparse.ArgumentTypeError(
        f"{value!r} is neither a count of points (1, 2, ...) nor a fraction between 0 and 1 (0.1: a tenth)"
    )


def _run_name(value: str) -> str:
    if not value or value in (".", "..") or "/" in value or "\\" in value:
        raise argparse.ArgumentTypeError(f"{value!r} is not a folder name; give a name without slashes")
    return value


def _devices(value: str) -> int | str:
    if value == "auto":
        return value
    return positive_int(value)


def _device(value: str) -> str:
    try:
        resolve_device(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line: the command, the problem, and where to read more.

    A negative number in any spelling float() reads (``-1e-3``, ``-inf``) is a value, which the flag's type
    refuses with its range, not an option (argparse's own pattern knows only ``-1`` and ``-.5``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+|\d*\.?\d+(e[-+]?\d+)?|\d+\.|inf|infinity|nan)$", re.I)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.HelpFormatter):
    """Each default stated once: appended where the help text does not state it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        unstated = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or unstated or not action.option_strings:
            return text
        return f"{text} (default: {action.default})" if text else f"(default: {action.default})"


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pyro-vae",
        description="Variational Autoencoders as Pyro models and guides (Kingma & Welling, 2014).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    train = commands.add_parser(
        "train",
        help="train a model and write a run directory",
        description="Train with SVI and write OUT/NAME/: config.json, checkpoint.pt, best.pt, history.csv, "
        "metrics.json and figures/. Without flags: a 784-400-20 Bernoulli VAE on the embedded, dynamically "
        "binarised MNIST.",
        formatter_class=_HelpFormatter,
    )
    data = train.add_argument_group("data")
    data.add_argument(
        "--dataset", type=_dataset_name, default="mnist", help=f"one of {', '.join(DATASET_NAMES)}, or a .npy/.npz file"
    )
    data.add_argument(
        "--data-dir",
        help="folder of torchvision data sets [with --resume: where the run's own is now, if its files moved]",
    )
    data.add_argument(
        "--download", action="store_true", help="let torchvision download a missing data set (needs a network)"
    )
    data.add_argument(
        "--binarize",
        choices=BINARIZE_MODES,
        help="binarisation of the pixels [default: dynamic for the bernoulli likelihood, none for the others]",
    )
    data.add_argument(
        "--split-seed",
        type=seed_value,
        default=0,
        help="seed of the validation split (and of --binarize fixed's one binarisation), apart from --seed: runs "
        "of any --seed, and their --starts, share one split, and with --labels one label draw",
    )
    data.add_argument(
        "--val-size",
        type=_val_size,
        metavar="N",
        help="training points held out for validation: a count, or a fraction below 1 [default: 10000]",
    )
    data.add_argument(
        "--subset",
        type=positive_int,
        metavar="N",
        help="train on the first N training points, and validate and test on N//5 (quick tries)",
    )

    model = train.add_argument_group("model")
    model.add_argument(
        "--z-dim",
        type=positive_int,
        nargs="+",
        metavar="DIM",
        help="latent dimension; two or more sizes, from the data side, train a VAE with that many stochastic "
        "layers (Burda et al.'s two-layer MNIST model: --z-dim 100 50) "
        "[default: 20; 50 for --semi-supervised without --m1]",
    )
    model.add_argument(
        "--hidden",
        type=positive_int,
        nargs="+",
        metavar="SIZE",
        help="hidden layer sizes (between x and the first stochastic layer) [default: 400; 200 200 with "
        "several stochastic layers; 500 for --semi-supervised without --m1]",
    )
    model.add_argument(
        "--upper-hidden",
        type=positive_int,
        nargs="+",
        metavar="SIZE",
        help="several stochastic layers: hidden sizes between each layer and the next [default: 100 100]",
    )
    model.add_argument(
        "--activation",
        choices=sorted(ACTIVATIONS),
        help="of the MLP's hidden layers [default: relu; tanh with several stochastic layers, as Burda et al.; "
        "softplus for --semi-supervised]",
    )
    model.add_argument("--arch", choices=ARCHITECTURES, default="mlp", help="encoder/decoder architecture")
    model.add_argument("--prior", choices=sorted(PRIORS), default="standard-normal", help="prior p(z)")
    model.add_argument("--likelihood", choices=sorted(LIKELIHOODS), default="bernoulli", help="likelihood p(x|z)")
    model.add_argument(
        "--components",
        type=positive_int,
        metavar="K",
        help="mixture and vamp priors: number of components / pseudo-inputs [default: 10 and 500]",
    )
    model.add_argument(
        "--flow-layers", type=positive_int, default=4, help="flow prior: number of autoregressive layers"
    )
    model.add_argument(
        "--scale",
        "--sigma",
        dest="scale",
        choices=Gaussian.SCALE_MODES,
        default="fixed",
        help="gaussian and laplace likelihoods: fixed, learned (shared or per-dim) or decoder-predicted scale",
    )
    model.add_argument(
        "--init-scale",
        "--init-sigma",
        dest="init_scale",
        type=_number(float, 1e-3, low_open=True, what="give a scale > 0.001 (the lower bound of learned scales)"),
        default=0.1,
        help="the (initial) scale",
    )

    training = train.add_argument_group("training")
    training.add_argument(
        "--epochs",
        type=positive_int,
        help=f"epochs in all [default: {VAE_DEFAULTS['epochs']}; {M2_DEFAULTS['epochs']} for --semi-supervised "
        "without --m1; with --resume: the run's own]",
    )
    training.add_argument(
        "--batch-size",
        type=positive_int,
        help="training points per step [default: 128; 200 for --semi-supervised without --m1]",
    )
    training.add_argument(
        "--lr", type=positive_float, help="Adam learning rate [default: 1e-3; 3e-3 for --semi-supervised without --m1]"
    )
    training.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        help="the learning rate by epoch: constant; iwae (Burda et al. 2016's 3^i epochs at lr * 10^(-i/7), "
        "i = 0, ..., 7; 364 epochs end stage 5); cosine (from lr towards 0 over --epochs, Loshchilov & "
        "Hutter 2017); or step (lr / 10 for the last tenth of --epochs). A cosine or step run resumes only to "
        "its own --epochs [default: constant; step for --semi-supervised without --m1]",
    )
    training.add_argument(
        "--elbo",
        choices=VAE_OBJECTIVES,
        default="trace",
        help="VAE objective: Trace_ELBO, TraceMeanField_ELBO or the IWAE bound",
    )
    training.add_argument(
        "--particles",
        type=positive_int,
        help="particles per ELBO estimate, K of the IWAE bound [default: 1 for trace and meanfield, 5 for iwae]",
    )
    training.add_argument(
        "--gradient",
        choices=sorted(set().union(*GRADIENTS.values())),
        default="standard",
        help="gradient estimator: standard, stl (Roeder et al. 2017, --elbo trace) or dreg (Tucker et al. 2019, "
        "--elbo iwae); the objective's value is the same",
    )
    training.add_argument(
        "--warmup-epochs", type=non_negative_float, default=0.0, help="linear KL warm-up over this many epochs"
    )
    training.add_argument(
        "--beta", type=positive_float, default=1.0, help="final weight of the KL term (1 is the ELBO)"
    )
    training.add_argument(
        "--seed",
        type=seed_value,
        default=0,
        help=f"seed of the weights and of training's random numbers (not of the data's split: --split-seed), "
        f"0 to {MAX_SEED}",
    )
    training.add_argument(
        "--starts",
        type=positive_int,
        help="train this many starts of the run, with the seeds --seed, --seed + 1, ... (each but the first "
        "drawing its own weights), for --start-epochs epochs each, and continue the one whose validation metric "
        "(M2: accuracy) is best "
        f"[default: 1; {M2_STARTS} for --semi-supervised without --m1 of {M2_STARTS_FROM_EPOCHS} epochs or more]",
    )
    training.add_argument(
        "--start-epochs",
        type=positive_int,
        default=START_EPOCHS,
        help="epochs of each start before the choice (--starts)",
    )
    training.add_argument(
        "--output-bias",
        choices=OUTPUT_BIAS_STARTS,
        default="data",
        help="start the decoder's output bias at the likelihood's fit to the training data (for a Bernoulli, "
        "the logit of each pixel's mean, as Burda et al.'s code), or where the random initialisation put it",
    )
    training.add_argument(
        "--ema-decay",
        type=decay_value,
        default=0.0,
        help="validate, keep and evaluate the exponential moving average of the weights over the steps at this "
        "decay (Kingma & Ba 2015's temporal averaging), warmed up as min(d, t / (t + 9)) at step t: about the last "
        "ninth of the steps, up to 1 / (1 - d) of them; 0: the weights themselves [default: 0; with --resume: the "
        "run's own]",
    )
    training.add_argument(
        "--matmul-precision",
        choices=MATMUL_PRECISIONS,
        default="highest",
        help="precision of the optimisation's float32 matrix products (validation and evaluation stay float32): "
        "highest (float32), high (TensorFloat-32 where the hardware has it) or medium (bfloat16 inputs with float32 "
        "sums where the hardware has them: AMX and AVX-512 BF16 CPUs; TensorFloat-32 on NVIDIA GPUs) "
        "[default: highest; with --resume: the run's own]",
    )
    training.add_argument(
        "--device", type=_device, help="cpu, cuda, cuda:N or auto [default: cpu; with --resume: the run's own]"
    )
    training.add_argument(
        "--compile",
        choices=COMPILE_CHOICES,
        help="replay the training step compiled by TorchInductor (the same numbers, faster): on, off, or auto for "
        f"runs of at least {AUTO_COMPILE_STEPS} steps [default: auto; with --resume: the run's own]",
    )
    training.add_argument(
        "--eval-samples",
        type=count_or_zero,
        help=f"K of the best checkpoint's test log p(x) in metrics.json, 0 skips it "
        f"[default: {DEFAULT_EVAL_SAMPLES}; with --resume: the run's own]",
    )

    ssl = train.add_argument_group(
        "semi-supervised (M2 of Kingma et al. 2014)",
        "Train pv.SSVAE from a few labels: y is summed out exactly for unlabelled points (TraceEnum_ELBO).",
    )
    ssl.add_argument("--semi-supervised", action="store_true", help="train the semi-supervised SSVAE")
    ssl.add_argument("--labels", type=positive_int, default=100, help="labelled training points, drawn class-balanced")
    ssl.add_argument("--label-seed", type=seed_value, default=0, help="seed of the label draw")
    ssl.add_argument(
        "--aux-weight",
        type=non_negative_float,
        help="alpha per labelled point on log q(y|x) [default: 0.46 per label: 46 at 100 labels, Pyro's example's, "
        "460 at 1000]; Kingma et al.'s is 0.1 N / labels (50 at 100 of 50,000 labels, 5 at 1000)",
    )
    ssl.add_argument(
        "--classifier-steps",
        type=count_or_zero,
        default=1000,
        help="first train q(y|x) on the labels alone for this many Adam steps, 0 for none (the paper's procedure); "
        "see docs/semi-supervised.md",
    )
    ssl.add_argument("--class-prior", choices=CLASS_PRIORS, default="uniform", help="p(y)")
    ssl.add_argument(
        "--m1",
        metavar="RUN",
        help="stack M2 on the code of this trained VAE run (Kingma et al.'s M1+M2); its data set is used",
    )

    parallel = train.add_argument_group(
        'distributed (Lightning DDP; needs pip install "pyro-vae[distributed]")',
        "Any of these options trains with PyTorch Lightning on several processes; --batch-size is then per process.",
    )
    parallel.add_argument("--devices", type=_devices, help="processes (CPU) or GPUs per node, e.g. 2, or auto")
    parallel.add_argument("--num-nodes", type=positive_int, help="machines [default: 1]")
    parallel.add_argument(
        "--strategy", choices=STRATEGIES, help="Lightning strategy: whole replicas, started by re-running the command"
    )
    parallel.add_argument("--accelerator", choices=["cpu", "gpu", "auto"], help="[default: cpu]")

    output = train.add_argument_group("output")
    output.add_argument("--out", default="runs", help="folder of run directories")
    output.add_argument(
        "--name",
        type=_run_name,
        help="run name [default: <dataset>-<likelihood>-<prior>-<time>; for M2 <dataset>-ssvae-<N>-labels-<time>, "
        "for M1+M2 <dataset>-m1m2-<N>-labels-<time>]",
    )
    output.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue this run where it stopped (its last complete epoch, or where Ctrl-C saved it)",
    )
    output.add_argument("--no-progress", action="store_true", help="no progress bars")

    evaluate = commands.add_parser(
        "evaluate",
        help="estimate a run's test log p(x): importance sampling, AIS, or BDMC bounds",
        description="Estimate the test log p(x) of a run's best checkpoint. --method is: K importance samples per "
        "point (logsumexp_k [log p(x, z_k) - log q(z_k|x)] - log K) with the ELBO, the active units and the "
        "diagnostics (ESS, Pareto k), into metrics.json and test_log_px.npy (with --test-points N into evaluations/ "
        "only). --method ais: annealed importance "
        "sampling from the encoder (HMC along the geometric path from q(z|x) to p(x, z), spaced by --schedule; for "
        "M2 and M1+M2 with each label given, y summed out). "
        "--method auto: importance sampling, then AIS on "
        "the points whose Pareto k exceeds min(1 - 1/log10 K, 0.7) (0.7 from K = 2154) or cannot be assessed "
        "(K < 46). "
        "--method bdmc: lower and upper bounds on points simulated from "
        "the model, whose gap bounds the error of AIS at its settings (not for M2 and M1+M2). Every method's "
        "per-point values go to evaluations/<method and settings>.npz; an interrupted AIS or BDMC evaluation "
        "continues where it stopped.",
        formatter_class=_HelpFormatter,
    )
    evaluate.add_argument("run", help="the run directory")
    evaluate.add_argument("--method", choices=METHODS, default="is", help="how to estimate log p(x)")
    evaluate.add_argument(
        "--samples", type=positive_int, default=DEFAULT_NUM_SAMPLES, help="K, importance samples per test point"
    )
    evaluate.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS, help="AIS: intermediate distributions")
    evaluate.add_argument("--chains", type=positive_int, default=DEFAULT_CHAINS, help="AIS: chains per point")
    evaluate.add_argument(
        "--leapfrog", type=positive_int, default=DEFAULT_LEAPFROG_STEPS, help="AIS: leapfrog steps per HMC transition"
    )
    evaluate.add_argument("--schedule", choices=SCHEDULES, default=DEFAULT_SCHEDULE, help="AIS: spacing of the path")
    evaluate.add_argument(
        "--points", type=positive_int, default=DEFAULT_BDMC_POINTS, help="BDMC: points simulated from the model"
    )
    evaluate.add_argument(
        "--test-points", type=positive_int, metavar="N", help="evaluate the first N test points only [default: all]"
    )
    evaluate.add_argument(
        "--batch-size",
        type=positive_int,
        default=DEFAULT_EVALUATION_BATCH,
        help="test points per batch, each saved as it finishes (AIS of M2 and M1+M2 anneals this many rows at once, "
        "a row a point with one of its labels)",
    )
    evaluate.add_argument("--seed", type=seed_value, default=0, help=f"random seed, 0 to {MAX_SEED}")
    evaluate.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:N or auto")
    evaluate.add_argument(
        "--data-dir", help="where the run's torchvision data set is now, if its files moved [default: the run's own]"
    )
    evaluate.add_argument(
        "--download", action="store_true", help="let torchvision download the run's data set (needs a network)"
    )
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")

    compare = commands.add_parser(
        "compare",
        help="compare evaluated runs by their test log p(x)",
        description="Tabulate evaluated runs by test log p(x) +- standard error, with each run's paired "
        "difference to the best (the same test points, so the difference is paired). Writes the table as "
        "markdown and CSV.",
        formatter_class=_HelpFormatter,
    )
    compare.add_argument("runs", nargs="+", help="evaluated run directories")
    compare.add_argument(
        "--evaluation",
        metavar="NAME",
        help="the evaluation to compare, e.g. ais-T400-C16-L2-sigmoid (a file name in RUN/evaluations/) "
        "[default: the importance-sampled test_log_px.npy]",
    )
    compare.add_argument("--out", default="comparison", help="write OUT.md and OUT.csv")
    parser.commands = commands.choices  # the sub-parsers by name, for the checks across flags
    return parser


#: Flags that the run's config fixes on --resume, and those that only one kind of training takes.
MODEL_AND_DATA_FLAGS = (
    "dataset", "data_dir", "download", "binarize", "split_seed", "val_size", "subset", "z_dim", "hidden",
    "upper_hidden", "activation", "arch", "prior", "likelihood", "components", "flow_layers", "scale", "init_scale",
    "elbo", "particles", "gradient", "warmup_epochs", "beta", "batch_size", "lr", "lr_schedule", "seed", "output_bias",
    "matmul_precision", "ema_decay", "starts", "start_epochs",
    "semi_supervised", "labels", "label_seed", "aux_weight", "classifier_steps", "class_prior", "m1", "name", "out",
)  # fmt: skip
#: Where a run's torchvision data set is, and whether to fetch it: given again where it moved (--resume, evaluate).
DATA_LOCATION_FLAGS = ("data_dir", "download")
SEMI_SUPERVISED_FLAGS = ("labels", "label_seed", "aux_weight", "classifier_steps", "class_prior")
VAE_ONLY_FLAGS = ("elbo", "particles", "gradient")


#: The defaults of ``train --semi-supervised`` (M2 from pixels) that differ from the VAE's: Kingma et al.'s
#: (2014) M2 architecture (50 latent units, 500 hidden), and the batch, Adam rate, step schedule and length
#: of the study whose runs reach the paper's accuracy (docs/semi-supervised.md, benchmarks/RESULTS.md).
M2_DEFAULTS = {"z_dim": [50], "hidden": [500], "batch_size": 200, "lr": 3e-3, "lr_schedule": "step", "epochs": 200}
VAE_DEFAULTS = {"z_dim": [20], "batch_size": 128, "lr": 1e-3, "lr_schedule": "constant", "epochs": 30}
#: M2 from pixels trains this many starts (``--starts``) in runs of at least ``M2_STARTS_FROM_EPOCHS`` epochs: from
#: 100 labels its accuracy is settled by its first epochs' draws (docs/semi-supervised.md, "Several starts").
M2_STARTS, M2_STARTS_FROM_EPOCHS, START_EPOCHS = 8, 100, 5


def mode_defaults(args: argparse.Namespace) -> dict:
    """The defaults of the kind of training asked for: M2 from pixels, or the VAE's (M1+M2 takes those)."""
    return M2_DEFAULTS if args.semi_supervised and not args.m1 else VAE_DEFAULTS


def run_epochs(args: argparse.Namespace) -> int:
    """``--epochs``, or the default of the kind of training asked for."""
    return args.epochs or mode_defaults(args)["epochs"]


def m2_starts(epochs: int) -> int:
    """M2 from pixels' starts by default: M2_STARTS in runs of M2_STARTS_FROM_EPOCHS epochs or more, else 1."""
    return M2_STARTS if epochs >= M2_STARTS_FROM_EPOCHS else 1


def distributed(args: argparse.Namespace) -> bool:
    """Whether any distributed flag is given (Lightning's processes then train the run)."""
    return bool(args.devices or args.num_nodes or args.strategy or args.accelerator)


def default_starts(args: argparse.Namespace) -> int:
    """``--starts`` where it is not given: :func:`m2_starts` for M2 from pixels on one process, else 1 (the
    starts train on one process)."""
    return m2_starts(run_epochs(args)) if mode_defaults(args) is M2_DEFAULTS and not distributed(args) else 1


def fill_mode_defaults(args: argparse.Namespace) -> None:
    """Give the flags left unset the defaults of the kind of training asked for."""
    if args.command != "train" or args.resume:
        return
    for dest, value in mode_defaults(args).items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    if args.starts is None:
        args.starts = default_starts(args)


def flags_given(argv: list[str] | None) -> set[str]:
    """The destinations of the flags typed in ``argv``, whatever their values: a flag given its default is given."""
    parser = build_parser()
    for command in (parser, *parser.commands.values()):
        for action in command._actions:
            if action.option_strings:
                action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def flags_apply(flags: list[str]) -> str:
    """``"--a applies"`` or ``"--a, --b apply"``: the flags, and the verb that agrees with them."""
    return f"{', '.join(flags)} {'applies' if len(flags) == 1 else 'apply'}"


def check_flag_combinations(parser: argparse.ArgumentParser, args: argparse.Namespace, typed: set[str]) -> None:
    """Refuse flags that would be silently ignored, before any work starts; ``typed``: the flags given."""
    if args.command == "evaluate":
        check_evaluate_flags(parser.commands["evaluate"], args, typed)
    if args.command != "train":
        return
    train = parser.commands["train"]
    # on --resume, where the data set is may change (the run's data digests check it is the same data)
    given = [d for d in MODEL_AND_DATA_FLAGS if d in typed and not (args.resume and d in DATA_LOCATION_FLAGS)]
    flag = lambda dest: "--" + dest.replace("_", "-")  # noqa: E731
    if args.resume and given:
        train.error(
            f"{', '.join(map(flag, given))} cannot change a run on --resume (its config.json fixes them); "
            "only --epochs, --eval-samples, --device, --compile, --no-progress, the distributed flags and, for a "
            "torchvision data set that moved, --data-dir and --download apply"
        )
    semi_supervised = args.semi_supervised or args.m1
    if not semi_supervised and (wrong := [flag(d) for d in SEMI_SUPERVISED_FLAGS if d in given]):
        train.error(f"{flags_apply(wrong)} only with --semi-supervised or --m1")
    if semi_supervised and (wrong := [flag(d) for d in VAE_ONLY_FLAGS if d in given]):
        train.error(f"{flags_apply(wrong)} only to VAE training, not to the semi-supervised objective")
    m1_fixes = ("dataset", "binarize", "split_seed", "val_size", "subset", "likelihood", "arch")
    if args.m1 and (wrong := [flag(d) for d in m1_fixes if d in given]):
        train.error(f"{', '.join(wrong)} cannot be used with --m1 (M1's run fixes the data and the likelihood)")
    if args.m1 and "output_bias" in given:
        train.error(
            "--output-bias cannot be used with --m1: M1+M2 decodes M1's latent features, whose Gaussian has no "
            "start from the data (M1's own run fixed its decoder's start)"
        )
    if semi_supervised and "arch" in given:
        train.error(
            "--arch applies only to the VAE; the semi-supervised models are MLPs (set their sizes with --hidden)"
        )
    layers = len(args.z_dim) if args.z_dim else 1
    if layers > 1 and (semi_supervised or args.arch != "mlp"):
        train.error("several --z-dim sizes (stochastic layers) apply only to the MLP VAE, one size otherwise")
    if layers > 1 and args.elbo == "meanfield":
        train.error("--elbo meanfield needs a mean-field guide; with several stochastic layers use trace or iwae")
    if layers == 1 and "upper_hidden" in given:
        train.error("--upper-hidden applies only with several stochastic layers (two or more --z-dim sizes)")
    starts = args.starts or default_starts(args)
    if "start_epochs" in given and starts == 1:
        train.error("--start-epochs applies only with --starts 2 or more")
    if not args.resume and starts > 1 and distributed(args):
        train.error(f"--starts {starts} trains its starts on one process: drop the distributed flags, or --starts")
    if not args.resume and args.seed + starts - 1 > MAX_SEED:
        train.error(f"--starts {starts} from --seed {args.seed} needs seeds above {MAX_SEED}; give a lower --seed")
    if not args.resume and starts > 1 and args.start_epochs > run_epochs(args):
        train.error(
            f"--start-epochs {args.start_epochs} exceeds --epochs {run_epochs(args)}: the starts are the run's first "
            "epochs (give fewer --start-epochs, or --starts 1)"
        )
    if "val_size" in given and "subset" in given:
        train.error("--subset sets its own validation split (a fifth of N); give --val-size or --subset, not both")
    if args.arch == "conv" and len(args.hidden or ()) > 1:
        train.error("--arch conv has one dense layer: give one --hidden size")
    if "activation" in given and (args.m1 or args.arch != "mlp"):
        train.error("--activation applies to MLPs only, not to --arch conv or to --m1")
    if args.gradient not in GRADIENTS.get(args.elbo, ("standard",)):
        needs = " or ".join(f"--elbo {name}" for name, takes in GRADIENTS.items() if args.gradient in takes)
        train.error(f"--gradient {args.gradient} needs {needs}, not --elbo {args.elbo}")
    if "components" in given and args.prior not in ("mixture", "vamp"):
        train.error(f"--components applies only to the mixture and vamp priors, not to --prior {args.prior}")
    if "flow_layers" in given and args.prior != "flow":
        train.error(f"--flow-layers applies only to the flow prior, not to --prior {args.prior}")
    if ("scale" in given or "init_scale" in given) and (args.m1 or args.likelihood not in ("gaussian", "laplace")):
        train.error("--scale and --init-scale apply only to the gaussian and laplace likelihoods")
    data_flags = [flag(d) for d in ("data_dir", "download") if d in given]
    if args.m1 and (wrong := data_flags):
        train.error(f"{', '.join(wrong)} cannot be used with --m1 (M1's run fixes the data)")
    if not args.m1 and args.dataset not in TORCHVISION_DATASETS and (wrong := data_flags):
        needless = "does not need it: drop it" if len(wrong) == 1 else "needs neither: drop them"
        train.error(
            f"{flags_apply(wrong)} only to the torchvision data sets ({', '.join(TORCHVISION_DATASETS)}); "
            f"--dataset {args.dataset} {needless}"
        )
    if args.elbo == "iwae" and ("warmup_epochs" in given or "beta" in given):
        train.error("--warmup-epochs and --beta do not apply to the IWAE bound; use --elbo trace for them")
    parallel_flags = [flag(d) for d in ("devices", "num_nodes", "strategy", "accelerator") if d in typed]
    if "device" in typed and parallel_flags:
        train.error(
            f"--device does not apply with {', '.join(parallel_flags)} (Lightning places the processes); "
            "choose the hardware with --accelerator cpu|gpu instead"
        )


#: The evaluate flags each method takes (the others would be ignored, so they are refused).
METHOD_FLAGS = {
    "is": {"samples", "test_points"},
    "ais": {"steps", "chains", "leapfrog", "schedule", "test_points"},
    "auto": {"samples", "steps", "chains", "leapfrog", "schedule", "test_points"},
    "bdmc": {"steps", "chains", "leapfrog", "schedule", "points"},
}


def check_evaluate_flags(evaluate: argparse.ArgumentParser, args: argparse.Namespace, typed: set[str]) -> None:
    given = typed & set().union(*METHOD_FLAGS.values())
    if wrong := sorted(given - METHOD_FLAGS[args.method]):
        flags = ", ".join("--" + dest.replace("_", "-") for dest in wrong)
        evaluate.error(f"{flags} {'does' if len(wrong) == 1 else 'do'} not apply to --method {args.method}")


# --------------------------------------------------------------- commands
def _evaluate(args) -> None:
    RunDirectory(args.run).check_resumable("pyro-vae evaluate")
    metrics = evaluate_run(
        args.run,
        method=args.method,
        num_samples=args.samples,
        num_steps=args.steps,
        num_chains=args.chains,
        leapfrog_steps=args.leapfrog,
        schedule=args.schedule,
        num_points=args.points,
        test_points=args.test_points,
        batch_size=args.batch_size,
        seed=args.seed,
        device=resolve_device(args.device),
        progress=not args.no_progress,
        data_dir=args.data_dir,
        download=args.download,
    )
    where = Path(args.run) / RunDirectory.EVALUATIONS / f"{metrics['evaluation']}.npz"
    if metrics.get("kept"):
        print(
            f"{where} holds this evaluation already, of these weights and points with seed {args.seed} and batch "
            f"size {args.batch_size}, which give the same numbers: kept, not made again (delete it to make it anew)."
        )
    elif "replaced" in metrics:
        print(f"{where} now replaces the evaluation of that name made {metrics['replaced']}.")
    if args.method == "bdmc":
        print(
            f"{args.run}: BDMC on {metrics['bdmc_num_points']} simulated points: lower {metrics['bdmc_lower']:.3f} "
            f"+- {metrics['bdmc_lower_se']:.3f}, upper {metrics['bdmc_upper']:.3f} +- {metrics['bdmc_upper_se']:.3f}, "
            f"gap {metrics['bdmc_gap_mean']:.3f} +- {metrics['bdmc_gap_se']:.3f} on average "
            f"({metrics['bdmc_gap_max']:.3f} at most; negative at {metrics['bdmc_num_negative_gaps']} points, by "
            f"noise) nats\n  per point: {where}"
        )
        return
    if args.method in ("ais", "auto") or args.test_points:
        escalated = ""
        if args.method == "auto":
            why = (
                f"Pareto k > {pareto_threshold(args.samples):.2f}"
                if pareto_k_assessable(args.samples)
                else f"Pareto k not assessable at K = {args.samples}"
            )
            escalated = f", AIS on {metrics['num_escalated']} points whose {why}"
        print(
            f"{args.run}: test log p(x) = {metrics['log_px']:.2f} +- {metrics['log_px_se']:.2f} nats "
            f"({args.method}{escalated}, {metrics['num_points']} points)\n  per point: {where}"
        )
        return
    per_layer = ""
    if "active_units_per_layer" in metrics:
        layers = enumerate(zip(metrics["active_units_per_layer"], metrics["latent_sizes"], strict=True), 1)
        per_layer = " (" + ", ".join(f"z{i}: {active} of {size}" for i, (active, size) in layers) + ")"
    print(
        f"{args.run}: test log p(x) = {metrics['test_log_px']:.2f} +- {metrics['test_log_px_se']:.2f} nats "
        f"(K = {metrics['test_num_samples']}, {metrics['test_num_points']} points)\n"
        f"  ELBO {metrics['test_elbo']:.2f} (reconstruction {metrics['test_reconstruction']:.2f}, "
        f"KL {metrics['test_kl']:.2f}); active units {metrics['active_units']} of {metrics['z_dim']}{per_layer}\n"
        f"  importance weights: mean ESS {metrics['test_ess_mean']:.1f}, "
        f"{pareto_words(metrics)}"
    )


def pareto_words(metrics: dict) -> str:
    """How many points' importance weights Pareto-k flags (at the bar they were counted at: 0.7 in runs written
    before the bar fell with K), or that K is too small to tell."""
    num_samples = metrics["test_num_samples"]
    if not pareto_k_assessable(num_samples):
        return f"Pareto k not assessable at K = {num_samples}: too few weights (K >= 46), so none is trusted"
    threshold = metrics.get("test_pareto_threshold", 0.7)
    return f"Pareto k > {threshold:.2f} on {metrics['test_num_unreliable']} points"


def check_folder(path: str | Path, flag: str, what: str) -> None:
    """Refuse ``path`` for ``flag``, naming why, before any work starts (and without making it), unless it is a
    folder that can be written, or the nearest folder above it that exists is one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; give {what}.")
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        raise ValueError(f"{flag} {path} cannot be made a folder ({existing} is a file); give {what}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path} cannot be written ({existing} is not writable); give {what}.")


def _compare(args) -> None:
    for run in args.runs:
        RunDirectory(run).check_resumable("pyro-vae compare")
    if len({Path(run).resolve() for run in args.runs}) < len(args.runs):
        raise ValueError(f"{' '.join(map(str, args.runs))}: a run is given twice; give each run once.")
    out = Path(args.out)
    if args.out and (args.out.endswith(("/", os.sep)) or out.is_dir()):  # a folder: the tables go in it
        out = out / "comparison"
    if not out.name:
        raise ValueError(f"--out {args.out!r} names no file; give a path and a name, e.g. --out runs/comparison.")
    check_folder(out.parent, "--out", "a path whose folder can be written, e.g. --out runs/comparison")
    folder = RunDirectory(out.parent)
    if folder.holds_run() or folder.file(folder.CONFIG).exists():  # its history.csv would be overwritten
        raise ValueError(
            f"--out {args.out}: {out.parent} is a run directory, whose own files (history.csv among them) the "
            "tables would overwrite or sit among; write them elsewhere, e.g. --out runs/comparison."
        )
    rows = compare_runs(args.runs, evaluation=args.evaluation)
    table = comparison_markdown(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    markdown, csv = out.with_name(f"{out.name}.md"), out.with_name(f"{out.name}.csv")  # OUT.md: with its dots
    markdown.write_text(table)
    csv.write_text(comparison_csv(rows))
    print(table + f"\nwritten to {markdown} and {csv}")


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
        seed=args.split_seed,
        data_dir=args.data_dir,
        download=args.download,
        **({} if args.val_size is None else {"val_size": args.val_size}),
    )
    if args.subset:
        data = data.quick_subset(args.subset)
    return data


def _processes(args) -> LightningProcesses | None:
    """Lightning's processes when any distributed flag is given (this launches them), else None."""
    if not distributed(args):
        return None
    return LightningProcesses(
        devices=args.devices or "auto",
        num_nodes=args.num_nodes or 1,
        strategy=args.strategy or "ddp",
        accelerator=args.accelerator or "cpu",
    )


def _free_name(folder: Path, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``, ... where a run of the same default name (one started in the same
    second, a sweep's) is already in ``folder``. Two started at once may still choose one name: the later is
    refused by the run's lock, naming the process that holds it."""
    candidates = itertools.chain([name], (f"{name}-{i}" for i in itertools.count(2)))
    return next(candidate for candidate in candidates if not (folder / candidate).exists())


def _new_model(args):
    """The model, the data and the objective that the flags describe, and the run's default name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    prior = _prior_config(args)  # each model builds its own
    if args.m1:
        m1 = load_run(args.m1)
        if not isinstance(m1.model, VAE):
            raise ValueError(f"--m1 needs the run of a plain VAE; {args.m1} holds a {m1.config['model']['type']}.")
        data = m1.load_data()
        num_classes = class_count(data)
        check_label_count(args.labels, len(data.train), num_classes)  # before M1's features are fitted
        features = LatentFeatures.fit(m1.model, data.train.x)
        model = StackedSSVAE(
            m1.model,
            features,
            args.z_dim[0],
            num_classes,
            prior=prior,
            hidden=args.hidden or [400],
            class_prior=args.class_prior,
        )
        print(f"M1: {args.m1}, {features.num_active} of its {m1.model.z_dim} latent units active")
        name = f"{data.name}-m1m2-{args.labels}-labels-{stamp}"
    elif args.semi_supervised:
        data = _load_data(args)
        num_classes = class_count(data)
        check_label_count(args.labels, len(data.train), num_classes)
        model = SSVAE(
            data.x_shape,
            args.z_dim[0],
            num_classes,
            prior=prior,
            likelihood=build_likelihood(_likelihood_config(args)),
            hidden=args.hidden,
            class_prior=args.class_prior,
            **({"activation": args.activation} if args.activation else {}),
        )
        name = f"{data.name}-ssvae-{args.labels}-labels-{stamp}"
    else:
        data = _load_data(args)
        likelihood = build_likelihood(_likelihood_config(args))
        if len(args.z_dim) > 1:
            hidden = [args.hidden or [200, 200]] + [args.upper_hidden or [100, 100]] * (len(args.z_dim) - 1)
            model = HierarchicalVAE(
                data.x_shape,
                args.z_dim,
                hidden,
                prior=prior,
                likelihood=likelihood,
                activation=args.activation or "tanh",
            )
        else:
            model = VAE(
                data.x_shape,
                args.z_dim[0],
                prior=prior,
                likelihood=likelihood,
                hidden=args.hidden or [400],
                arch=args.arch,
                activation=args.activation or "relu",
            )
        objective = {"name": args.elbo, "gradient": args.gradient}
        if args.particles is not None:  # otherwise the objective's own: 1 for the ELBOs, 5 for the IWAE bound
            objective["num_particles"] = args.particles
        return model, data, objective, f"{data.name}-{args.likelihood}-{args.prior}-{stamp}"
    objective = {"name": "semi-supervised", "num_labels": args.labels, "label_seed": args.label_seed}
    objective["aux_weight"], objective["classifier_steps"] = args.aux_weight, args.classifier_steps
    return model, data, objective, name


def _train(args) -> None:
    processes = _processes(args)
    common = {"progress": not args.no_progress}
    if args.compile is not None:
        common["compile"] = COMPILE_CHOICES[args.compile]
    if args.eval_samples is not None:
        common["eval_samples"] = args.eval_samples
    if processes is None:
        if args.device is not None or not args.resume:
            common["device"] = args.device or "cpu"
    else:
        common["processes"] = processes
    if args.resume:
        run_dir = RunDirectory(args.resume)
        run_dir.check_resumable()  # before the run directory is announced
        _announce(run_dir.path, processes)
        run = resume_run(run_dir.path, epochs=args.epochs, data_dir=args.data_dir, download=args.download, **common)
    else:
        check_folder(args.out, "--out", "the folder that is to hold the runs")
        if args.name:  # refused before the data, M1 or the model are loaded
            RunDirectory(Path(args.out) / args.name).check_fresh()
        pyro.set_rng_seed(args.seed)
        model, data, objective, name = _new_model(args)
        model.check_dataset(data)  # before the run directory is announced (fit checks it too, for the library's users)
        if "output_bias" in args.typed and args.output_bias == "data" and not _starts_from_data(model, data):
            raise ValueError(
                f"--output-bias data: this {model.name} has no output bias to start at the data (its decoder has "
                "no start_output_at, as the conv decoder, or its likelihood no constant fit); drop --output-bias."
            )
        run_dir = RunDirectory(Path(args.out) / (args.name or _free_name(Path(args.out), name)))
        run_dir.check_fresh()
        _announce(run_dir.path, processes)
        settings = dict(
            objective=objective,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            lr_schedule=args.lr_schedule,
            warmup_epochs=args.warmup_epochs,
            beta=args.beta,
            seed=args.seed,
            output_bias=args.output_bias,
            matmul_precision=args.matmul_precision,
            ema_decay=args.ema_decay,
            starts=args.starts,
            start_epochs=args.start_epochs,
        )
        common.setdefault("eval_samples", DEFAULT_EVAL_SAMPLES)
        run = train_run(model, data, run_dir.path, **settings, **common)
    if run is not None:
        _report(run)


def _starts_from_data(model, data: Dataset) -> bool:
    """Whether ``fit``'s ``output_bias="data"`` can start this model's decoder at the data (tried on a copy)."""
    return copy.deepcopy(model).start_output_bias(data.train.x[:1000])


def _announce(path: Path, processes) -> None:
    if processes is None or processes.is_writer:
        print(f"run directory: {path}", flush=True)


def _report(run) -> None:
    metrics = RunDirectory(run.path).read_metrics()
    best = metrics["best_epoch"]
    if "test_accuracy" in metrics:
        print(
            f"best epoch {best}: validation accuracy {100 * metrics['val_accuracy']:.2f}%, "
            f"test accuracy {100 * metrics['test_accuracy']:.2f}%"
        )
    else:
        print(
            f"best epoch {best}: test ELBO {metrics['test_elbo']:.2f} +- {metrics['test_elbo_se']:.2f} nats per data "
            f"point (reconstruction {metrics['test_reconstruction']:.2f}, KL {metrics['test_kl']:.2f})"
        )
    if "test_log_px" in metrics:
        weights = pareto_words(metrics)
        print(
            f"test log p(x) {metrics['test_log_px']:.2f} +- {metrics['test_log_px_se']:.2f} nats "
            f"(K = {metrics['test_num_samples']}; {weights})"
        )
    figures = RunDirectory(run.path).figures
    print(f"figures: {', '.join(sorted(p.name for p in figures.glob('*.png')))} in {figures}")


@contextlib.contextmanager
def _warnings_for_the_command_line():
    """Warnings as one line each, ``pyro-vae: warning: ...`` (not the source line that raised them), and none
    of torch's note that a CPU-only install has no CUDA runtime, printed once a compiler is first looked up."""
    format_warning, cuda_note = warnings.formatwarning, logging.getLogger("torch.utils.cpp_extension")
    level = cuda_note.level
    warnings.formatwarning = lambda message, category, *_: f"pyro-vae: warning: {message}\n"
    if not torch.cuda.is_available():
        cuda_note.setLevel(logging.ERROR)
    try:
        yield
    finally:
        warnings.formatwarning = format_warning
        cuda_note.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    with _warnings_for_the_command_line():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    try:
        load_plugins()  # before the parser, whose choices list the registered priors, likelihoods and objectives
    except ImportError as err:
        print(f"pyro-vae: error: {err}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)  # a bad value: its one-line message, then SystemExit(2)
    args.typed = flags_given(argv)
    check_flag_combinations(parser, args, args.typed)
    fill_mode_defaults(args)
    try:
        {"train": _train, "evaluate": _evaluate, "compare": _compare}[args.command](args)
    except (DataError, CheckpointError, TrainingDiverged, ValueError, ProcessFailed) as err:
        print(f"pyro-vae: error: {err}", file=sys.stderr)
        return 2
    except (TrainingInterrupted, EvaluationInterrupted) as err:
        print(f"pyro-vae: {err}", file=sys.stderr)
        return 130  # the shell's code for a SIGINT
    except KeyboardInterrupt:  # before training or evaluation began, or while the results were written
        saved = {"train": "every completed epoch is saved in the run directory", "evaluate": "finished evaluations "
                 "are saved in the run directory", "compare": "nothing was written"}[args.command]  # fmt: skip
        print(f"pyro-vae: interrupted; {saved}.", file=sys.stderr)
        return 130
    except OSError as err:  # a path the checks up front could not foresee (a read-only or special file system)
        print(f"pyro-vae: error: {err.strerror or err}: {err.filename}; check that path and its permissions.",
              file=sys.stderr)  # fmt: skip
        return 2
    except (MemoryError, RuntimeError) as err:
        if not isinstance(err, MemoryError | torch.OutOfMemoryError) and "can't allocate memory" not in str(err):
            raise
        print(f"pyro-vae: error: out of memory ({first_line(err)}); give smaller sizes (--hidden, --z-dim, "
              "--batch-size, --particles), or free memory.", file=sys.stderr)  # fmt: skip
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
