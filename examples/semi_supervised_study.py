"""The semi-supervised study: M1+M2 test accuracy from 100, 600, 1000 and 3000 MNIST labels.

    python examples/semi_supervised_study.py --jobs 2       # the study in benchmarks/RESULTS.md
    python examples/semi_supervised_study.py --m1 runs/compare-priors/standard-normal   # reuse a trained M1
    python examples/semi_supervised_study.py --m1-epochs 1 --epochs 1 --subset 2000 --labels 100 --samples 5   # smoke

Kingma et al.'s (2014) M1+M2: M1 is a VAE trained without labels (the
standard-normal VAE of ``examples/compare_priors.py``: 784-300-300-40,
Bernoulli, dynamically binarised MNIST, 250 epochs); M2 is then trained on
its code, once per label count and label draw: a ``pv.StackedSSVAE`` on
M1's active units, trained by ``pv.train_run`` with the objective
``pv.SemiSupervisedELBO``, which is what ``pyro-vae train --m1 RUN --labels
N`` does. The script prints and writes (``ssl_table.md``) the test accuracy
of each run, the mean and standard deviation over the label draws, and the
stacked model's test log p(x).

Every run is an ordinary run directory; finished runs are kept,
interrupted ones resume (``pv.resume_run``), and a larger ``--epochs``
trains the finished runs further, so the study can be run again after a
stop. ``--jobs 2`` trains two M2s at a time, each in its own process on one
thread.
"""

import argparse
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyro
import torch

import pyro_vae as pv

TARGETS = {100: 93.5, 600: 94.5, 1000: 95.0, 3000: 96.0}


def last_epoch(run: Path) -> int:
    """The epoch of a run's last checkpoint (``pv.load_run`` loads the best one)."""
    return pv.RunDirectory(run).load_checkpoint("last")["epoch"]


def train_m1(args, out: Path) -> Path:
    """``pyro-vae train --z-dim 40 --hidden 300 300 --batch-size 100 --warmup-epochs 10 ...``, from Python."""
    run = out / "m1"
    if not pv.RunDirectory(run).holds_run():
        pyro.set_rng_seed(0)
        data = pv.load_dataset("mnist", binarize="dynamic", seed=0)  # the embedded copy, no network
        if args.subset:
            data = data.subset(train=args.subset, val=max(args.subset // 5, 1), test=max(args.subset // 5, 1))
        vae = pv.VAE(data.x_shape, z_dim=40, hidden=(300, 300), likelihood=pv.likelihoods.Bernoulli())
        pv.train_run(
            vae, data, run, epochs=args.m1_epochs, batch_size=100, lr=1e-3, warmup_epochs=10, seed=0,
            eval_samples=0, progress=False,
        )  # fmt: skip
    elif last_epoch(run) < args.m1_epochs:
        pv.resume_run(run, epochs=args.m1_epochs, progress=False)
    return run


def train_m2(m1: Path, labels: int, label_seed: int, args, out: Path) -> Path:
    """``pyro-vae train --m1 M1 --labels N --label-seed S --z-dim 10 --hidden 500 ...``, from Python."""
    run = out / f"m1m2-{labels}-labels-draw-{label_seed}"
    directory = pv.RunDirectory(run)
    if directory.file(directory.METRICS).exists() and last_epoch(run) >= args.epochs:
        return run
    if directory.holds_run():
        pv.resume_run(run, epochs=args.epochs, eval_samples=args.samples, progress=False)
        return run
    pyro.set_rng_seed(0)
    m1_run = pv.load_run(m1)  # M1's best checkpoint, frozen inside the stacked model
    vae, data = m1_run.model, m1_run.load_data()
    if not isinstance(vae, pv.VAE):
        raise SystemExit(f"--m1 needs the run of a plain VAE; {m1} holds a {type(vae).__name__}.")
    features = pv.LatentFeatures.fit(vae, data.train.x)
    print(f"M2 on {labels} labels (draw {label_seed}): {features.num_active} of M1's {vae.z_dim} units active")
    stacked = pv.StackedSSVAE(vae, features, z_dim=10, prior=pv.priors.StandardNormal(), hidden=(500,))
    objective = pv.SemiSupervisedELBO(num_labels=labels, label_seed=label_seed)
    pv.train_run(
        stacked, data, run, objective=objective, epochs=args.epochs, batch_size=200, lr=1e-3, seed=0,
        eval_samples=args.samples, progress=False,
    )  # fmt: skip
    return run


def one_thread() -> None:
    """Each job's process computes on one thread, so that ``--jobs`` processes share the cores."""
    torch.set_num_threads(1)


def table(runs: dict[int, list[Path]]) -> str:
    lines = [
        "| labels | test accuracy (mean +- sd over draws) | each draw | target | test log p(x) (first draw) |",
        "|---|---|---|---|---|",
    ]
    for labels, dirs in runs.items():
        metrics = [pv.RunDirectory(run).read_metrics() for run in dirs]
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
    if args.jobs > 1:  # separate processes, started afresh ("spawn"), one thread each
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context, initializer=one_thread) as pool:
            futures = [pool.submit(train_m2, m1, labels, seed, args, out) for labels, seed in jobs]
            done = [future.result() for future in futures]
    else:
        done = [train_m2(m1, labels, seed, args, out) for labels, seed in jobs]
    runs = {
        labels: [run for (count, _), run in zip(jobs, done, strict=True) if count == labels] for labels in args.labels
    }
    result = table(runs)
    (out / "ssl_table.md").write_text(result)
    print(f"M1: {m1}\n{result}")


if __name__ == "__main__":
    main()
