"""Diagnostics of M2 from pixels (issue: M2 that learns), recorded in benchmarks/RESULTS.md.

    python benchmarks/m2_diagnostics.py floor                      # M2's classifier on the labels alone
    python benchmarks/m2_diagnostics.py variant --epochs 8 --lr 3e-4 --init 1e-3 --weight-prior 1
    python benchmarks/m2_diagnostics.py lower-rate RUN --lr 3e-4 --epochs 15 --out OUT
    python benchmarks/m2_diagnostics.py inputs RUN                  # what q(y | x) classifies best
    python benchmarks/m2_diagnostics.py prior-cost                  # M2's step by prior

``floor`` trains M2's classifier (784-500-10, softplus) on the 100 labelled
points alone with Adam, cross-entropy on dynamically binarised batches (the
objective's warm start, ``SemiSupervisedELBO.start``, and nothing else): the
supervised baseline ("NN" in Kingma et al.'s Table 1) that the
semi-supervised model has to beat, for label draws 0, 1 and 2.

``variant`` trains ``pv.SSVAE(z_dim=50, hidden=(500,))`` with the
semi-supervised objective from 100 labels (label seed 0, batch 200, the
compiled step) with the settings of Kingma et al.'s released code
(dpkingma/nips14-ssl): Adam's learning rate, the weights drawn at a small
scale (``--init``, theirs 1e-3), and a Gaussian prior N(0, sd^2) on every
weight added to the loss (``--weight-prior sd``, theirs 1). ``--classifier-steps``
first trains q(y | x) on the labels alone (the objective's warm start, 0 here
by default, the paper's procedure), and ``--fixed-classifier-epochs`` then
trains the rest of M2 on J with q(y | x) held fixed for that many passes over
the unlabelled points. ``--rampup-epochs`` weights the unlabelled term by
exp(-5 (1 - t)^2) at the fraction t of that many passes, and by 1 after them
(the ramp-up of Laine & Aila, *Temporal Ensembling for Semi-Supervised
Learning*, ICLR 2017). ``--z-dim`` and
``--aux-weight`` change M2's code size and alpha. It prints the validation
accuracy after every epoch and the generative classifier argmax_y log p(x, y)
(``pv.classify_generatively``) of the last epoch's weights.

``lower-rate`` trains a finished M2 run on at another rate: the run's last
checkpoint (``pv.load_run(RUN, checkpoint="last")``), its objective (labels,
label draw, alpha) without a second warm start, a fresh Adam at ``--lr``,
seed 1, ``--epochs`` epochs, into the new run directory ``--out`` (its
``metrics.json`` holds the best epoch's test accuracy and ELBO). It asks what
a lower rate at the end adds to a run trained at a constant one.

``inputs`` measures, on one M2 run's weights (``--checkpoint``, the best by
default), the validation and test accuracy of q(y | x) read from each of:
the one fixed binarisation of the split (the ELBO's and log p(x)'s, and the
library's accuracy before ``accuracy_on``), the images' intensities (the
library's accuracy since), and the mean of q(y | x) over 1, 10 and 100 fresh
binarisations of each image (seed 0), the label's probability given the
image when each image stands for its binarisations. One run's weights for
every reading: a paired comparison.

``prior-cost`` times M2's eager step (the enumerated unlabelled loss of a
batch of 200 and its gradient; z 50, hidden 500) with the standard normal
prior and with VampPriors of K pseudo-inputs whose labels are summed out
(``pseudo_input_labels="summed"``, K C components) or set at the soft
prediction (``"predicted"``, K components), the models interleaved, and
prints each one's median and its ratio to the standard normal's.
"""

import argparse
import contextlib
import math
import statistics
import tempfile
import time

import pyro
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate

import pyro_vae as pv
from pyro_vae.cli import count_or_zero, non_negative_float, positive_float, positive_int
from pyro_vae.infer.densities import parameters_held_fixed
from pyro_vae.infer.objective import build_objective, completed_objective_config
from pyro_vae.infer.semisupervised import SemiSupervisedELBO, paper_aux_weight


def floor(args) -> None:
    data = pv.load_dataset("mnist", binarize="dynamic")
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        model = pv.SSVAE(data.x_shape, z_dim=50, hidden=(500,))
        objective = SemiSupervisedELBO(num_labels=args.labels, label_seed=seed, classifier_steps=args.steps)
        objective.setup(model, data, batch_size=args.labels)  # every labelled point in every step
        objective.start(model, data)  # the warm start alone: the classifier on the labels
        val, test = (model.accuracy(split.unbinarised, split.y) for split in (data.val, data.test))
        print(f"label seed {seed}: {args.steps} steps, validation {100 * val:.1f}%, test {100 * test:.1f}%")


def rampup_weight(step: int, rampup_steps: int) -> float:
    """Laine & Aila's ramp-up exp(-5 (1 - t)^2) at t = step / rampup_steps, and 1 from t = 1 on."""
    return 1.0 if step >= rampup_steps else math.exp(-5.0 * (1.0 - step / rampup_steps) ** 2)


class WithWeightPrior(SemiSupervisedELBO):
    """-J plus -log N(w; 0, sd^2) of every weight, as Kingma et al.'s code adds at every minibatch.

    After the warm start, ``fixed_classifier_epochs`` passes over the unlabelled points train the rest of
    M2 on J by Adam (lr 1e-3) with q(y | x) held fixed. Over the first ``rampup_epochs`` passes of
    training the unlabelled term is weighted by :func:`rampup_weight`, an input of the compiled step.
    """

    def __init__(self, sd: float | None, fixed_classifier_epochs: int = 0, rampup_epochs: float = 0, **kwargs):
        super().__init__(**kwargs)
        self.sd, self.fixed_classifier_epochs, self.rampup_epochs = sd, fixed_classifier_epochs, rampup_epochs
        self.steps = 0

    def setup(self, model, data, *, batch_size):
        super().setup(model, data, batch_size=batch_size)
        self.batch_size = batch_size
        self.rampup_steps = round(self.rampup_epochs * math.ceil(len(self.unlabelled) / batch_size))

    def batch(self, data, indices):
        x = data.train.x
        weight = torch.tensor(rampup_weight(self.steps, self.rampup_steps), dtype=x.dtype, device=x.device)
        self.steps += 1
        return *super().batch(data, indices), weight

    def start(self, model, data, *, progress=False):
        super().start(model, data, progress=progress)
        classifier = list(model.modules_for("classifier").values())
        held = {id(p) for module in classifier for p in module.parameters()}
        optimizer = torch.optim.Adam([p for p in model.parameters() if id(p) not in held], lr=1e-3)
        with contextlib.ExitStack() as fixed:
            for module in classifier:
                fixed.enter_context(parameters_held_fixed(module))
            for _ in range(self.fixed_classifier_epochs):
                order = self.unlabelled[torch.randperm(len(self.unlabelled))]
                for start in range(0, len(order), self.batch_size):
                    batch = super().batch(data, order[start : start + self.batch_size])
                    loss = super().loss(model, *batch, kl_weight=1.0) + self.weight_prior(model)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        self.labelled_order, self.cursor = None, 0

    def loss(self, model, x, x_labelled, y_labelled, unlabelled_weight, *, kl_weight):
        unlabelled = self.unlabelled_loss(model, x, kl_weight=kl_weight)
        labelled = self.labelled_loss(model, x_labelled, y_labelled, kl_weight=kl_weight)
        return unlabelled_weight * unlabelled + labelled + self.weight_prior(model)

    def weight_prior(self, model):
        if self.sd is None:
            return 0.0
        return sum(parameter.square().sum() for parameter in model.parameters()) / (2 * self.sd**2)


def variant(args) -> None:
    pyro.set_rng_seed(0)
    data = pv.load_dataset("mnist", binarize="dynamic")
    model = pv.SSVAE(data.x_shape, args.z_dim, hidden=(500,))
    if args.init is not None:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0, args.init) if parameter.dim() > 1 else parameter.zero_()
    objective = WithWeightPrior(
        args.weight_prior, args.fixed_classifier_epochs, args.rampup_epochs, num_labels=args.labels,
        aux_weight=paper_aux_weight(len(data.train), args.labels) if args.aux_weight is None else args.aux_weight,
        classifier_steps=args.classifier_steps,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as run:  # output_bias="random": the start is the variant's (--init)
        history = pv.fit(model, data, objective=objective, epochs=args.epochs, batch_size=args.batch_size,
                         lr=args.lr, compile=True, output_bias="random", progress=False, run_dir=run)  # fmt: skip
        model = pv.load_run(run, checkpoint="last").model  # fit leaves the best epoch's weights in the model
    print("validation accuracy by epoch:", ", ".join(f"{100 * row['val_accuracy']:.1f}" for row in history))
    x, y = data.val.x[:2000], data.val.y[:2000]
    accuracy = (pv.classify_generatively(model, x) == y).double().mean().item()
    print(f"generative classifier argmax_y log p(x, y) (K = 10) on 2,000 validation points: {100 * accuracy:.1f}%")


def lower_rate(args) -> None:
    run = pv.load_run(args.run, checkpoint="last")
    objective = completed_objective_config(run.config["train"]["objective"])
    if objective["name"] != "semi-supervised":
        raise SystemExit(f"{args.run} is not an M2 run (its objective is {objective['name']!r}).")
    objective.update(classifier_steps=0)  # the classifier was trained with the rest of the run
    data = run.load_data()
    accuracy = build_objective(objective).validate(run.model, data.val, "val_")["val_accuracy"]  # the run's measure
    print(f"{args.run}, epoch {run.epoch}: validation accuracy {100 * accuracy:.2f}%")
    # output_bias="random" keeps the trained weights as they are (the data start would reset the output bias)
    history = pv.fit(run.model, data, objective=objective, epochs=args.epochs, lr=args.lr, seed=1, compile=True,
                     batch_size=run.config["train"]["batch_size"], output_bias="random", eval_samples=0,
                     progress=False, run_dir=args.out)  # fmt: skip
    print("validation accuracy by epoch:", ", ".join(f"{100 * row['val_accuracy']:.2f}" for row in history))
    print("validation ELBO by epoch:", ", ".join(f"{row['val_elbo']:.2f}" for row in history))
    metrics = pv.RunDirectory(args.out).read_metrics()
    print(f"best epoch {metrics['best_epoch']}: test accuracy {100 * metrics['test_accuracy']:.2f}%, "
          f"test ELBO {metrics['test_elbo']:.2f}")  # fmt: skip


def inputs(args) -> None:
    run = pv.load_run(args.run, checkpoint=args.checkpoint)
    data, model = run.load_data(), run.model
    if data.val.intensities is None:
        raise SystemExit(f"{args.run} was trained on data that was not binarised: q(y | x) reads it as it is.")
    torch.manual_seed(0)
    print(f"{args.run}, epoch {run.epoch}: accuracy of q(y | x), %")
    for name in ("val", "test"):
        split = getattr(data, name)
        with torch.no_grad():
            right = lambda logits: 100 * (logits.argmax(-1) == split.y).double().mean().item()  # noqa: E731, B023
            logits = lambda x: model.classifier_logits(model.feature_means(x))  # noqa: E731 (M2's and M1+M2's)
            readings = {"fixed binarisation": right(logits(split.x)), "intensities": right(logits(split.intensities))}
            probabilities = torch.zeros(len(split), model.num_classes)
            for draws in range(1, 101):
                probabilities += logits(pv.data.binarize(split.intensities)).softmax(-1)
                if draws in (1, 10, 100):
                    readings[f"mean over {draws} binarisations"] = right(probabilities)
        print(f"  {name:4}  " + ", ".join(f"{reading} {value:.2f}" for reading, value in readings.items()))


def prior_cost(args) -> None:
    data = pv.load_dataset("mnist", binarize="dynamic")
    torch.manual_seed(0)
    x = data.batch(torch.arange(200))
    guide_of = {}
    contenders = {"standard normal": (None, "summed")}
    for k in args.components:
        contenders[f"vamp K={k}, labels summed"] = ({"name": "vamp", "num_components": k}, "summed")
        contenders[f"vamp K={k}, soft prediction"] = ({"name": "vamp", "num_components": k}, "predicted")
    models = {}
    for name, (prior, labels) in contenders.items():
        models[name] = pv.SSVAE(data.x_shape, z_dim=50, hidden=(500,), prior=prior, pseudo_input_labels=labels)
        guide_of[name] = config_enumerate(models[name].guide, "parallel")
    elbo, times = TraceEnum_ELBO(max_plate_nesting=1), {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            start = time.perf_counter()
            elbo.differentiable_loss(model.model, guide_of[name], x).backward()
            times[name].append(time.perf_counter() - start)
            model.zero_grad()
    base = statistics.median(times["standard normal"])
    for name, measured in times.items():
        print(f"{name:32} {1000 * statistics.median(measured):8.1f} ms  {statistics.median(measured) / base:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    floor_parser = commands.add_parser("floor")
    floor_parser.add_argument("--steps", type=positive_int, default=1000)
    variant_parser = commands.add_parser("variant")
    variant_parser.add_argument("--epochs", type=positive_int, default=8)
    variant_parser.add_argument("--lr", type=positive_float, default=1e-3)
    variant_parser.add_argument(
        "--init", type=positive_float, help="the weights' standard deviation at the start (biases zeroed)"
    )
    variant_parser.add_argument("--weight-prior", type=positive_float, help="sd of a Gaussian prior on every weight")
    variant_parser.add_argument(
        "--classifier-steps",
        type=count_or_zero,
        default=0,
        help="train q(y | x) on the labels alone first, for this many steps",
    )
    variant_parser.add_argument(
        "--fixed-classifier-epochs",
        type=count_or_zero,
        default=0,
        help="then train the rest of M2 with q(y | x) held fixed (Adam 1e-3, whatever --lr)",
    )
    variant_parser.add_argument(
        "--rampup-epochs",
        type=non_negative_float,
        default=0,
        help="ramp the unlabelled term's weight up over this many epochs",
    )
    variant_parser.add_argument("--batch-size", type=positive_int, default=200)
    variant_parser.add_argument("--z-dim", type=positive_int, default=50)
    variant_parser.add_argument(
        "--aux-weight", type=non_negative_float, help="alpha per labelled point [default: the paper's]"
    )
    for sub in (floor_parser, variant_parser):
        sub.add_argument("--labels", type=positive_int, default=100)
    lower_parser = commands.add_parser("lower-rate")
    lower_parser.add_argument("run", help="a finished M2 run directory")
    lower_parser.add_argument("--lr", type=positive_float, default=3e-4)
    lower_parser.add_argument("--epochs", type=positive_int, default=15)
    lower_parser.add_argument("--out", required=True, help="the new run directory")
    inputs_parser = commands.add_parser("inputs")
    inputs_parser.add_argument("run", help="an M2 run directory")
    inputs_parser.add_argument("--checkpoint", choices=("best", "last"), default="best")
    cost_parser = commands.add_parser("prior-cost")
    cost_parser.add_argument("--components", type=positive_int, nargs="+", default=[500, 50])
    cost_parser.add_argument("--repeats", type=positive_int, default=7)
    args = parser.parse_args()
    commands = {
        "floor": floor,
        "variant": variant,
        "lower-rate": lower_rate,
        "inputs": inputs,
        "prior-cost": prior_cost,
    }
    commands[args.command](args)


if __name__ == "__main__":
    main()
