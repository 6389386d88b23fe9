"""M2's classifier from its iterates against averages of them, epoch by epoch, in one training run.

    python benchmarks/m2_weight_average.py --labels 1000 --label-seed 0 --out runs/m2-average

Trains M2 from pixels as ``pyro-vae train --semi-supervised --labels N
--label-seed S`` does (the library's defaults, ``--ema-decay 0``), and
beside it keeps one :class:`~pyro_vae.training.averaging.WeightAverage` of
the weights for each of ``--decays`` (the library's, whose decay warms up as
``pyro-vae train --ema-decay`` averages) and of ``--fixed-decays`` (the decay
fixed from the first step, Kingma & Ba's form). After every epoch it writes the
validation and test accuracy of q(y | x) at the iterates and at each
average to OUT/averages.jsonl, one line an epoch. The averages draw no
random numbers, so the run trains as it would without them, and every
average is compared with the iterates of the very same run: a paired
comparison, free of the spread between label draws and training runs.

At the end it prints, for the iterates and each average, the test accuracy
at the epoch of its best validation accuracy (how a run picks its best
checkpoint) and the means over the last 20 epochs. The run directory
(OUT/run) and the averages (OUT/averages.pt, saved with every checkpoint)
resume after a stop or a Ctrl-C: run the same command again. ``--report``
prints the table of OUT/averages.jsonl alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import pyro
import torch

import pyro_vae as pv
from pyro_vae.cli import M2_DEFAULTS, decay_value, positive_int, seed_value
from pyro_vae.infer.semisupervised import default_aux_weight
from pyro_vae.training import engine
from pyro_vae.training.averaging import WeightAverage


class Watched:
    """The averages of one run's weights, updated after every step of ``fit`` and evaluated after every epoch."""

    def __init__(self, decays: list[float], fixed_decays: list[float], out: Path):
        self.decays = {f"ema {d:g}": (d, True) for d in decays} | {f"fixed {d:g}": (d, False) for d in fixed_decays}
        self.state_file, self.log = out / "averages.pt", out / "averages.jsonl"
        self.averages: dict[str, WeightAverage] = {}
        self.saved = torch.load(self.state_file) if self.state_file.exists() else None

    def after_step(self, model) -> None:
        if not self.averages:  # the first step of this process: start the averages, or restore them
            self.averages = {name: WeightAverage(model, d, warm_up) for name, (d, warm_up) in self.decays.items()}
            if self.saved is not None:
                for name, average in self.averages.items():
                    average.load(self.saved[name]["state"], self.saved[name]["steps"])
        for average in self.averages.values():
            average.update(model)

    def after_epoch(self, epoch: int, model, data) -> None:
        row = {"epoch": epoch, "iterates": accuracies(model, data)}
        for name, average in self.averages.items():
            with average.applied(model):
                row[name] = accuracies(model, data)
        with self.log.open("a") as log:
            log.write(json.dumps(row) + "\n")

    def save(self, model) -> None:
        """With every checkpoint of the run (after an epoch, or at a Ctrl-C within one)."""
        if self.averages:
            saved = {name: {"state": a.state_of(model), "steps": a.steps} for name, a in self.averages.items()}
            torch.save(saved, self.state_file)


@torch.no_grad()
def accuracies(model, data) -> list[float]:
    return [model.accuracy(data.val.x, data.val.y), model.accuracy(data.test.x, data.test.y)]


def watch(watched: Watched) -> None:
    """Wrap the engine's step, validation and saving, so that the averages follow the run."""
    take_step, validate, save = engine.take_step, engine._Engine._validate, engine._Engine._save

    def step_and_average(model, *args, **kwargs):
        result = take_step(model, *args, **kwargs)
        watched.after_step(model)
        return result

    def validate_and_evaluate(self):
        metrics = validate(self)
        watched.after_epoch(len(self.history), self.model, self.data)
        return metrics

    def save_both(self, *args, **kwargs):
        watched.save(self.model)
        save(self, *args, **kwargs)

    engine.take_step, engine._Engine._validate, engine._Engine._save = (
        step_and_average,
        validate_and_evaluate,
        save_both,
    )


def report(log: Path) -> None:
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    by_epoch = {row["epoch"]: row for row in rows}  # a resumed run writes its epochs again: the last write counts
    rows = [by_epoch[epoch] for epoch in sorted(by_epoch)]
    print("| weights | best validation accuracy (epoch) | test accuracy there | last 20 epochs: val | test |")
    print("|---|---|---|---|---|")
    for key in [key for key in rows[-1] if key != "epoch"]:
        scored = [row for row in rows if key in row]
        best = max(scored, key=lambda row: row[key][0])  # the first epoch of the highest, as fit picks
        last = scored[-20:]
        val, test = (100 * statistics.mean(row[key][i] for row in last) for i in (0, 1))
        print(f"| {key} | {100 * best[key][0]:.2f}% ({best['epoch']}) | {100 * best[key][1]:.2f}% | "
              f"{val:.2f}% | {test:.2f}% |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=positive_int, default=1000)
    parser.add_argument("--label-seed", type=seed_value, default=0)
    parser.add_argument("--epochs", type=positive_int, default=M2_DEFAULTS["epochs"])
    parser.add_argument("--decays", type=decay_value, nargs="+", default=[0.9999], help="warmed up, as fit's")
    parser.add_argument("--fixed-decays", type=decay_value, nargs="*", default=[0.999, 0.9999], help="fixed")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--report", action="store_true", help="only print the table of OUT/averages.jsonl")
    args = parser.parse_args()
    if args.report:
        report(args.out / "averages.jsonl")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    watched = Watched(args.decays, args.fixed_decays, args.out)
    watch(watched)
    run = args.out / "run"
    if pv.RunDirectory(run).holds_run():
        pv.resume_run(run, epochs=args.epochs, eval_samples=0, progress=False)
    else:
        pyro.set_rng_seed(0)  # as the study's runs
        data = pv.load_dataset("mnist", binarize="dynamic", seed=0)
        model = pv.SSVAE(data.x_shape, z_dim=M2_DEFAULTS["z_dim"][0], hidden=tuple(M2_DEFAULTS["hidden"]))
        objective = pv.SemiSupervisedELBO(
            num_labels=args.labels, label_seed=args.label_seed, aux_weight=default_aux_weight(args.labels)
        )
        settings = {key: M2_DEFAULTS[key] for key in ("batch_size", "lr", "lr_schedule")}
        pv.fit(model, data, objective=objective, epochs=args.epochs, run_dir=run, progress=False, **settings)
    report(watched.log)


if __name__ == "__main__":
    main()
