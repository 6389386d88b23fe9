"""M2's classifier from its iterates against averages of them, epoch by epoch, in one training run.

    python benchmarks/m2_weight_average.py --labels 1000 --label-seed 0 --out runs/m2-average

Runs ``pyro-vae train --semi-supervised --labels N --label-seed S --out
OUT --name run --eval-samples 0`` (M2 from pixels, the library's defaults,
``--ema-decay 0``) in this process, and beside it keeps one :class:`~pyro_vae.training.averaging.WeightAverage` of
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
import io
import json
import statistics
from pathlib import Path

import torch

import pyro_vae as pv
from pyro_vae import cli
from pyro_vae.cli import M2_DEFAULTS, decay_value, positive_int, seed_value
from pyro_vae.runs.files import atomic_write_bytes
from pyro_vae.training import engine
from pyro_vae.training.averaging import WeightAverage


class Watched:
    """The averages of one run's weights, updated after every step of ``fit`` and evaluated after every epoch.

    OUT/averages.pt holds the averages at the run's last two checkpoints, each beside the checkpoint's place (its
    epoch, and its step within an interrupted epoch): a stop between the averages' write and the checkpoint's
    leaves the one that matches."""

    def __init__(self, decays: list[float], fixed_decays: list[float], out: Path):
        self.decays = {f"ema {d:g}": (d, True) for d in decays} | {f"fixed {d:g}": (d, False) for d in fixed_decays}
        self.state_file, self.log = out / "averages.pt", out / "averages.jsonl"
        self.averages: dict[str, WeightAverage] = {}
        self.saved = torch.load(self.state_file) if self.state_file.exists() else None
        self.restored = None
        if self.saved is not None and (kept := sorted(self.saved["latest"]["averages"])) != sorted(self.decays):
            raise SystemExit(
                f"{out} keeps the averages {', '.join(kept)}, not {', '.join(sorted(self.decays))}: give the "
                "--decays and --fixed-decays of those, or another --out."
            )

    def resume_at(self, checkpoint: dict) -> None:
        """Take the saved averages of the checkpoint the run resumes from."""
        place = checkpoint_place(checkpoint["epoch"], checkpoint["position"])
        if place == checkpoint_place(0, None):  # no step taken yet: the averages start afresh
            return
        for saved in (self.saved["latest"], self.saved["previous"]) if self.saved else ():
            if saved is not None and saved["place"] == place:
                self.restored = saved["averages"]
                return
        raise SystemExit(f"{self.state_file} holds no averages of the run's checkpoint (epoch {place['epoch']}): "
                         f"start again with another --out.")  # fmt: skip

    def after_step(self, model) -> None:
        if not self.averages:  # the first step of this process: start the averages, or restore them
            self.averages = {name: WeightAverage(model, d, warm_up) for name, (d, warm_up) in self.decays.items()}
            if self.restored is not None:
                for name, average in self.averages.items():
                    average.load(self.restored[name]["state"], self.restored[name]["steps"])
        for average in self.averages.values():
            average.update(model)

    def after_epoch(self, epoch: int, model, data) -> None:
        row = {"epoch": epoch, "iterates": accuracies(model, data)}
        for name, average in self.averages.items():
            with average.applied(model):
                row[name] = accuracies(model, data)
        with self.log.open("a") as log:
            log.write(json.dumps(row) + "\n")

    def save(self, model, epoch: int, position: dict | None) -> None:
        """Before every checkpoint of the run (after an epoch, or at a Ctrl-C within one)."""
        if not self.averages:
            return
        latest = {
            "place": checkpoint_place(epoch, position),
            "averages": {name: {"state": a.state_of(model), "steps": a.steps} for name, a in self.averages.items()},
        }
        self.saved = {"latest": latest, "previous": self.saved["latest"] if self.saved else None}
        buffer = io.BytesIO()
        torch.save(self.saved, buffer)
        atomic_write_bytes(self.state_file, buffer.getvalue())


def checkpoint_place(epoch: int, position: dict | None) -> dict:
    return {"epoch": epoch, "step": None if position is None else position["step"]}


@torch.no_grad()
def accuracies(model, data) -> list[float]:
    """Of the images' intensities, as the runs since commit 2ffeb8b measure theirs (the records made before
    classified the one binarisation)."""
    return [model.accuracy(split.unbinarised, split.y) for split in (data.val, data.test)]


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

    def save_both(self, epoch, *, best=False, position=None):
        watched.save(self.model, epoch, position)
        save(self, epoch, best=best, position=position)

    engine.take_step, engine._Engine._validate, engine._Engine._save = (
        step_and_average,
        validate_and_evaluate,
        save_both,
    )


def report(log: Path) -> None:
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    if not rows:
        raise SystemExit(f"{log} holds no epochs yet: run the benchmark without --report first.")
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
    run = args.out / "run"
    if pv.RunDirectory(run).holds_run():
        objective = pv.RunDirectory(run).read_config()["train"]["objective"]
        if (objective["num_labels"], objective["label_seed"]) != (args.labels, args.label_seed):
            raise SystemExit(f"{run} trains on --labels {objective['num_labels']} --label-seed "
                             f"{objective['label_seed']}: give those, or another --out.")  # fmt: skip
        watched.resume_at(pv.RunDirectory(run).load_checkpoint("last"))
        command = ["train", "--resume", str(run)]
    else:
        command = ["train", "--semi-supervised", "--labels", str(args.labels), "--label-seed", str(args.label_seed)]
        command += ["--out", str(args.out), "--name", "run"]
    watch(watched)
    if code := cli.main([*command, "--epochs", str(args.epochs), "--eval-samples", "0", "--no-progress"]):
        raise SystemExit(code)
    report(watched.log)


if __name__ == "__main__":
    main()
