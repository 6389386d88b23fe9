"""Table 1 of Burda, Grosse & Salakhutdinov, *Importance Weighted Autoencoders* (2016), at this machine's scale.

    python examples/iwae_study.py --ais-points 1000 --keep benchmarks/iwae-study --results benchmarks/RESULTS.md
    python examples/iwae_study.py --epochs 1 --subset 500 --samples 10 --out /tmp/iwae   # a smoke test

Seven runs on the embedded, dynamically binarised MNIST: Burda et al.'s
one-stochastic-layer model (784-200-200-50, tanh) and their two-layer model
(x - 200 - 200 - z1 (100) - 100 - 100 - z2 (50), tanh), trained as a VAE (k
= 1), with the IWAE bound at k = 5 and 50, and at k = 50 with the doubly
reparameterised gradient of Tucker et al. (2019). Every run has the same
optimiser (Adam, lr 1e-3), batch size, seed and number of epochs. The paper
trained for 3,280 passes with a decaying learning rate, which this machine
cannot afford, so the numbers are lower than the paper's and the question
is whether its ordering holds; ``--lr-schedule iwae`` follows the paper's
decay over the epochs given (364 epochs end its stage 5), and
``--batch-size 20`` takes the paper's batch size (five times the steps of
the default 100 per epoch). Every decoder starts its output bias at the
logits of the training pixels' means, as Burda et al.'s code does (the
library's default); ``--output-bias random`` keeps PyTorch's random start,
which the study's first tables used. Each schedule, batch size and start
has its own table in RESULTS.md. Each run's test log p(x) is estimated with K
importance samples on the whole test set and, with ``--ais-points N``, by
AIS from the encoder (500 steps x 32 chains x 2 leapfrog steps, the library's
defaults when the study was run) on the first N test points, with the
importance-sampled estimate on those same points beside it (the first
points need not be as hard as the whole set); the paired differences
between runs (the same test points) carry standard errors.

The study is resumable: run it again after an interruption and finished runs
are kept, a half-trained one continues from its last epoch; with more
``--epochs`` every run trains on and is evaluated again. ``--runs`` picks a
subset (by name), so the seven runs can be spread over several sessions.
The table goes to OUT/table.md and, with ``--results``, between the markers
of benchmarks/RESULTS.md. With ``--keep DIR`` each finished run's record
(``pv.RunDirectory.keep_record``: config, history, metrics, per-point log
p(x) and evaluations, about 200 kB; no checkpoint) is copied to DIR/NAME,
and the table takes a run from there when OUT no longer holds it: commit
DIR, and runs trained in earlier sessions on other machines still enter the
table and its paired comparisons. A run whose record there is complete
(these settings, --epochs trained, evaluated at --samples and, with
--ais-points, by the study's AIS) is not trained again, so the same command
rebuilds the table from the records alone.
"""

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import pyro

import pyro_vae as pv
from pyro_vae.cli import count_or_zero, positive_int, seed_value
from pyro_vae.evaluate import EvaluationInterrupted, current_evaluation, evaluation_name
from pyro_vae.infer.densities import standard_error
from pyro_vae.training.engine import OUTPUT_BIAS_STARTS
from pyro_vae.training.precision import precision_conflict
from pyro_vae.training.schedules import LENGTH_DEPENDENT_SCHEDULES, LR_SCHEDULES, length_conflict
from pyro_vae.workflow import training_settings

#: name -> (layers, objective, the paper's NLL where it reports one)
RUNS = {
    "1-layer-vae": (1, {"name": "trace"}, 86.76),
    "1-layer-iwae-k5": (1, {"name": "iwae", "num_particles": 5}, 85.54),
    "1-layer-iwae-k50": (1, {"name": "iwae", "num_particles": 50}, 84.78),
    "1-layer-iwae-k50-dreg": (1, {"name": "iwae", "num_particles": 50, "gradient": "dreg"}, None),
    "2-layer-vae": (2, {"name": "trace"}, 85.33),
    "2-layer-iwae-k50": (2, {"name": "iwae", "num_particles": 50}, 82.90),
    "2-layer-iwae-k50-dreg": (2, {"name": "iwae", "num_particles": 50, "gradient": "dreg"}, None),
}
#: The study's AIS settings: the library's defaults until 2026-12-05, which its kept records were evaluated at.
STUDY_AIS = {"num_steps": 500, "num_chains": 32, "leapfrog_steps": 2, "schedule": "sigmoid"}
#: The study's batch size unless ``--batch-size`` says otherwise (Burda et al.'s was 20).
DEFAULT_BATCH_SIZE = 100
#: Where the study trains its runs unless ``--out`` says otherwise.
DEFAULT_OUT = "runs/iwae-study"
#: The orderings of the paper (and Tucker et al.'s for DReG): (better, worse, what it shows).
ORDERINGS = [
    ("2-layer-vae", "1-layer-vae", "two layers beat one (VAE)"),
    ("2-layer-iwae-k50", "1-layer-iwae-k50", "two layers beat one (IWAE k = 50)"),
    ("2-layer-iwae-k50-dreg", "1-layer-iwae-k50-dreg", "two layers beat one (IWAE k = 50, DReG)"),
    ("1-layer-iwae-k50", "1-layer-vae", "IWAE k = 50 beats the VAE (one layer)"),
    ("2-layer-iwae-k50", "2-layer-vae", "IWAE k = 50 beats the VAE (two layers)"),
    ("1-layer-iwae-k50", "1-layer-iwae-k5", "k = 50 beats k = 5"),
    ("1-layer-iwae-k50-dreg", "1-layer-iwae-k50", "DReG beats the standard gradient (one layer)"),
    ("2-layer-iwae-k50-dreg", "2-layer-iwae-k50", "DReG beats the standard gradient (two layers)"),
]


def markers(lr_schedule: str, batch_size: int, output_bias: str, epochs: int, seed: int) -> tuple[str, str]:
    """The lines that hold the study's table in RESULTS.md: one per learning-rate schedule (and length, where the
    schedule's rates depend on it), batch size, start and seed."""
    study = "iwae-study" if lr_schedule == "constant" else f"iwae-study-{lr_schedule}-schedule"
    study += f"-{epochs}-epochs" if lr_schedule in LENGTH_DEPENDENT_SCHEDULES else ""
    study += "" if batch_size == DEFAULT_BATCH_SIZE else f"-batch-{batch_size}"
    study += "" if output_bias == "data" else f"-{output_bias}-output-bias"
    study += f"-seed-{seed}" if seed else ""
    return f"<!-- {study}:begin -->", f"<!-- {study}:end -->"


def build_model(layers: int, x_shape) -> pv.Model:
    """Burda et al.'s MNIST architectures (section 5 of the paper)."""
    if layers == 1:
        return pv.VAE(x_shape, z_dim=50, hidden=(200, 200), activation="tanh")
    return pv.HierarchicalVAE(x_shape, z_dims=(100, 50), hidden=((200, 200), (100, 100)))


def study_settings(run: Path) -> dict[str, object]:
    """The flags that make a study, as a run (or its record) was trained: runs of other values belong to
    another study, with its own --out, --keep and table. Older runs lack the newer keys."""
    config = pv.RunDirectory(run).read_config()
    train = training_settings(config)
    return {
        "--output-bias": train["output_bias"],
        "--lr-schedule": train["lr_schedule"],
        "--batch-size": train["batch_size"],
        "--seed": train["seed"],
        "--subset": (config["data"].get("subset") or {}).get("train"),
    }


def other_settings(run: Path, args) -> str | None:
    """The flags, as ``run`` was trained, where they differ from this study's (None where none differs)."""
    ours = {"--output-bias": args.output_bias, "--lr-schedule": args.lr_schedule, "--batch-size": args.batch_size,
            "--seed": args.seed, "--subset": args.subset}  # fmt: skip
    theirs = study_settings(run)
    differing = [flag for flag in ours if theirs[flag] != ours[flag]]
    shown = [f"{flag} {theirs[flag]}" if theirs[flag] is not None else f"no {flag}" for flag in differing]
    return " ".join(shown) or None


def check_before_training(args, out: Path) -> None:
    """Refuse, before any training, what would mix studies or fail late: a run in --out or a record in --keep of
    other settings or with reduced-precision products (a finished run would be kept over the record), a run in
    --out or a record already past --epochs, a run in --out of another length under a schedule whose rates
    depend on it, more --ais-points than test points, and a --results file that does not exist."""
    for name in args.runs:
        run, record = out / name, (args.keep / name if args.keep else None)
        for held, place in ((run, "--out"), (record, "--keep")):
            if held is None or not (held / pv.RunDirectory.CONFIG).exists():
                continue
            if conflict := precision_conflict(
                training_settings(pv.RunDirectory(held).read_config())["matmul_precision"]
            ):
                raise SystemExit(f"{held} {conflict}: give another {place}.")
        if pv.RunDirectory(run).holds_run():
            if other := other_settings(run, args):
                raise SystemExit(f"{run} holds a run of {other}: give it {other}, or another --out for this study.")
            if (last := pv.RunDirectory(run).load_checkpoint("last")["epoch"]) > args.epochs:
                raise SystemExit(f"{run} has trained {last} epochs, past --epochs {args.epochs}: give --epochs "
                                 f"{last} or more, or another --out.")  # fmt: skip
            target = pv.RunDirectory(run).read_config()["train"]["epochs"]
            if conflict := length_conflict(args.lr_schedule, target, args.epochs):
                raise SystemExit(f"{run} {conflict}: give --epochs {target}, or another --out.")
        if record is not None and (record / pv.RunDirectory.CONFIG).exists():
            if other := other_settings(record, args):
                raise SystemExit(f"{record} keeps a run of {other}; give another --keep for this study.")
            if (kept := pv.RunDirectory(record).read_metrics().get("epochs", 0)) > args.epochs:
                raise SystemExit(f"{record} keeps a run of {kept} epochs, past --epochs {args.epochs}: give --epochs "
                                 f"{kept}, or another --keep.")  # fmt: skip
    try:
        data = load_data(args) if args.subset or args.ais_points else None
    except pv.DataError as err:
        raise SystemExit(str(err)) from None
    if args.ais_points and args.ais_points > (test_points := len(data.test)):
        raise SystemExit(f"--ais-points {args.ais_points} exceeds the {test_points} test points; give at most that.")
    if args.results and not args.results.is_file():
        raise SystemExit(f"--results {args.results} does not exist; give benchmarks/RESULTS.md.")
    if args.results and args.subset:
        raise SystemExit("--results takes the study on the whole training set: leave out --subset (a smoke "
                         "test's table would replace the study's), or --results.")  # fmt: skip


def load_data(args) -> pv.Dataset:
    """The embedded MNIST (no network), dynamically binarised, or its first ``--subset`` points."""
    data = pv.load_dataset("mnist", binarize="dynamic", seed=args.seed)
    return data.quick_subset(args.subset) if args.subset else data


def train_and_evaluate(name: str, args, out: Path) -> Path:
    layers, objective, _ = RUNS[name]
    run = out / name
    directory = pv.RunDirectory(run)
    if not directory.holds_run():
        pyro.set_rng_seed(args.seed)
        data = load_data(args)
        pv.train_run(
            build_model(layers, data.x_shape), data, run, objective=objective, epochs=args.epochs,
            batch_size=args.batch_size, lr=1e-3, lr_schedule=args.lr_schedule, seed=args.seed, eval_samples=0,
            output_bias=args.output_bias, progress=args.progress,
        )  # fmt: skip
    elif (
        max(args.epochs, directory.read_config()["train"]["epochs"]) > directory.load_checkpoint("last")["epoch"]
        or not directory.training_finished()
    ):
        pv.resume_run(run, epochs=args.epochs, progress=args.progress)
    metrics = directory.read_metrics()
    last_epoch = directory.load_checkpoint("last")["epoch"]
    evaluated = directory.file(directory.LOG_PX).exists() and metrics.get("test_num_samples") == args.samples
    if not evaluated or metrics.get("epochs") != last_epoch:
        metrics = pv.evaluate_run(run, num_samples=args.samples, progress=args.progress)
    if args.ais_points and current_evaluation(run, ais_name(args)) is None:  # none, or of older weights
        pv.evaluate_run(run, method="ais", test_points=args.ais_points, progress=args.progress, **STUDY_AIS)
    print(
        f"{name}: best epoch {metrics['best_epoch']} of {last_epoch}, test log p(x) = "
        f"{metrics['test_log_px']:.2f} +- {metrics['test_log_px_se']:.2f} nats (K = {metrics['test_num_samples']})",
        flush=True,
    )
    return run


def complete_record(name: str, args) -> Path | None:
    """KEEP/NAME where it holds this run of the study's settings, trained to --epochs and evaluated at
    --samples (and by the study's AIS with --ais-points), so that nothing is left to do; else None."""
    record = args.keep / name if args.keep else None
    if record is None or not as_asked(record, args):
        return None
    evaluations = pv.RunDirectory(record).read_metrics().get("evaluations", {})
    return record if not args.ais_points or ais_name(args) in evaluations else None


def as_asked(run: Path, args) -> bool:
    """Whether ``run`` (or a record) was trained with this study's settings to --epochs and evaluated at
    --samples: the table holds only such runs, so that its rows and its K describe them all."""
    if not (run / pv.RunDirectory.LOG_PX).exists() or other_settings(run, args):
        return False
    metrics = pv.RunDirectory(run).read_metrics()
    return metrics.get("epochs") == args.epochs and metrics.get("test_num_samples") == args.samples


def finished_runs(out: Path, args) -> dict[str, Path]:
    """Each run of this study trained and evaluated as asked (:func:`as_asked`): here (OUT/NAME) or, failing
    that, kept from earlier (KEEP/NAME)."""
    places = [out] + ([args.keep] if args.keep else [])
    runs = {}
    for name in RUNS:
        if found := [place / name for place in places if as_asked(place / name, args)]:
            runs[name] = found[0]
    return runs


def ais_name(args) -> str:
    """The evaluation name of the study's AIS on the first ``--ais-points`` test points."""
    return evaluation_name("ais", num_samples=0, ais=STUDY_AIS, num_points=0, test_points=args.ais_points)


def log_px(run: Path, evaluation: str | None) -> np.ndarray:
    """Per-point test log p(x): importance-sampled (None) or from the named evaluation."""
    directory = pv.RunDirectory(run)
    return directory.read_log_px() if evaluation is None else directory.read_evaluation(evaluation)["log_px"]


def ais_points(run: Path, evaluation: str) -> int:
    """How many test points, the first ones, the named evaluation covers."""
    return len(log_px(run, evaluation))


def mean_and_se(values: np.ndarray) -> str:
    """``mean +- standard error`` of per-point values, to two decimals."""
    return f"{values.mean():.2f} +- {standard_error(values):.2f}"


def paired(better: Path, worse: Path, evaluation: str | None = None) -> tuple[float, float]:
    """The mean of log p(x) of ``better`` minus ``worse`` over the same test points, and its standard error,
    from ``pv.compare_runs`` (which refuses evaluations of other weights or other test points)."""
    rows = {Path(row["run"]): row for row in pv.compare_runs([better, worse], evaluation)}
    # each row's difference is to the run of the higher mean, so one of the two is 0 (and so is its se)
    mean = rows[better]["diff_to_best"] - rows[worse]["diff_to_best"]
    return mean, max(rows[better]["diff_se"], rows[worse]["diff_se"])


def table(runs: dict[str, Path], command: str, ais: str | None) -> str:
    """The study's table and its orderings, from the finished runs (name -> run directory)."""
    with_ais = ais is not None and all(ais in pv.RunDirectory(run).read_metrics().get("evaluations", {})
                                       for run in runs.values())  # fmt: skip
    rows = [
        "| model | objective | paper NLL | our NLL (K = {K}) | ELBO | active units | epochs | batch | train minutes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if with_ais:  # AIS runs on the first test points only, which need not be as hard as the whole set
        rows = [rows[0] + f" NLL by AIS ({ais}) | NLL by IS (K = {{K}}), the same points |", rows[1] + "---|---|"]
    samples = None
    for name, run in runs.items():
        directory = pv.RunDirectory(run)
        metrics, config = directory.read_metrics(), directory.read_config()
        samples = metrics["test_num_samples"]
        layers, objective, paper = RUNS[name]
        what = "VAE (k = 1)" if objective["name"] == "trace" else f"IWAE k = {objective['num_particles']}"
        what += ", DReG" if objective.get("gradient") == "dreg" else ""
        units = metrics.get("active_units_per_layer", [metrics["active_units"]])
        rows.append(
            f"| {layers} stochastic layer{'s' * (layers > 1)} | {what} | {paper or '(none)'} | "
            f"{-metrics['test_log_px']:.2f} +- {metrics['test_log_px_se']:.2f} | {metrics['test_elbo']:.2f} | "
            f"{' + '.join(map(str, units))} | {config['train']['epochs']} | {config['train']['batch_size']} | "
            f"{metrics['train_seconds'] / 60:.0f} |"
            + (f" {-metrics['evaluations'][ais]['log_px']:.2f} +- {metrics['evaluations'][ais]['log_px_se']:.2f} |"
               f" {mean_and_se(-log_px(run, None)[:ais_points(run, ais)])} |" if with_ais else "")
        )  # fmt: skip
    rows[0] = rows[0].replace("{K}", str(samples))
    orderings = []
    for better, worse, what in ORDERINGS:
        if better in runs and worse in runs:
            for label, evaluation in [(f"IS, K = {samples}", None)] + ([("AIS", ais)] if with_ais else []):
                mean, se = paired(runs[better], runs[worse], evaluation)
                holds = "yes" if mean > 3 * se else "no"
                orderings.append(f"| {what} | {label} | {mean:+.3f} +- {se:.3f} | {mean / se:+.1f} | {holds} |")
    if orderings:  # none where the table lacks both runs of every ordering
        rows += ["", "| ordering | estimate | paired difference of log p(x) | in standard errors | holds (> 3 se) |"]
        rows += ["|---|---|---|---|---|", *orderings]
    return f"Command: `{command}`\n\n" + "\n".join(rows) + "\n"


def write_results(markdown: str, results: Path, args) -> None:
    """Put the table between the study's markers in RESULTS.md (appended with them the first time)."""
    text = results.read_text()
    begin, end = markers(args.lr_schedule, args.batch_size, args.output_bias, args.epochs, args.seed)
    block = f"{begin}\n{markdown}{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text += f"\n{block}\n"
    results.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=positive_int, default=100)
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help="Burda et al. used 20")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant", help="Adam's rate by epoch")
    parser.add_argument("--samples", type=positive_int, default=5000, help="K, importance samples per test point")
    parser.add_argument("--ais-points", type=count_or_zero, default=0, help="AIS (STUDY_AIS) on this many test points")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS), help="the runs to train now")
    parser.add_argument("--subset", type=positive_int, help="train on this many points only (smoke tests)")
    parser.add_argument("--seed", type=seed_value, default=0)
    parser.add_argument(
        "--output-bias", choices=OUTPUT_BIAS_STARTS, default="data", help="the decoders' output-bias start"
    )
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--results", type=Path, help="write the table into this RESULTS.md as well")
    parser.add_argument("--keep", type=Path, help="copy each finished run's record here (to commit); see above")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    args = parser.parse_args()
    out = Path(args.out)
    try:
        check_before_training(args, out)
        for name in args.runs:
            if not pv.RunDirectory(out / name).holds_run() and (record := complete_record(name, args)):
                print(f"{name}: kept in {record}, trained and evaluated as asked; not trained again.", flush=True)
                continue
            run = train_and_evaluate(name, args, out)
            if args.keep:
                pv.RunDirectory(run).keep_record(args.keep / run.name)
    except (pv.TrainingInterrupted, EvaluationInterrupted) as interrupted:
        print(f"{interrupted}\nRun the same command again to continue the study.", file=sys.stderr)
        raise SystemExit(130) from None
    command = f"python examples/iwae_study.py --epochs {args.epochs} --samples {args.samples}"
    command += f" --batch-size {args.batch_size}" if args.batch_size != DEFAULT_BATCH_SIZE else ""
    command += f" --lr-schedule {args.lr_schedule}" if args.lr_schedule != "constant" else ""
    command += f" --output-bias {args.output_bias}" if args.output_bias != "data" else ""
    command += f" --ais-points {args.ais_points}" if args.ais_points else ""
    command += f" --seed {args.seed}" if args.seed else ""
    command += f" --subset {args.subset}" if args.subset else ""
    command += f" --out {args.out}" if args.out != DEFAULT_OUT else ""
    command += f" --keep {args.keep}" if args.keep else ""
    runs = finished_runs(out, args)
    command += f" --runs {' '.join(runs)}" if runs.keys() != RUNS.keys() else ""  # the table's runs, to redo it
    markdown = table(runs, command, ais_name(args) if args.ais_points else None)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown)
    print(markdown)
    if args.results:
        write_results(markdown, args.results, args)


if __name__ == "__main__":
    main()
