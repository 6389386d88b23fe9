"""The semi-supervised objective of M2 (Kingma, Rezende, Mohamed & Welling,
*Semi-Supervised Learning with Deep Generative Models*, NeurIPS 2014, eq. 9):

    J = sum_labelled [L(x, y) + alpha * log q(y | x)] + sum_unlabelled U(x),

where alpha weighs each labelled point (the paper's alpha multiplies the
*mean* over the labelled set, so its 0.1 N is 0.1 N / N_labelled here:
:func:`paper_aux_weight`) and U is summed over y exactly by
``TraceEnum_ELBO`` on the enumerated guide.
Every step takes one unlabelled batch and one labelled batch and adds their
losses. Each loss is scaled to its whole set by sizing the plate
(``num_data``), so the step's loss is an unbiased estimate of -J however
few labels there are. An epoch is one pass over the unlabelled points; the
labelled ones are cycled through in a fresh order as often as needed, and
that order and its cursor are part of the objective's state, saved in every
checkpoint.

The validation and test accuracy are those of q(y | x) on the images as
they are, their intensities, as Pyro's SS-VAE example and Kingma et al.'s
released M1+M2 code classify them, where the ELBO and log p(x) read the splits' one fixed
binarisation (a Bernoulli likelihood is a density of binary images only).
One binarisation is a noisy copy of the image: on the same weights the
intensities are classified about half a point better
(docs/semi-supervised.md, "What the accuracy measures").

Departure from the paper's procedure (not its objective): a fresh run first
trains the classifier q(y | x) alone on the labelled points, by
``classifier_steps`` Adam steps on the cross-entropy (the alpha term without
the rest of J), and then optimises J as the paper does. From pixels, with
100 labels, M2 started from a random classifier learns a q(y | x) that gets
worse with every epoch, since the unlabelled term rewards any labelling that
helps the decoder; started from the labels, it improves on them
(docs/semi-supervised.md, benchmarks/RESULTS.md). ``classifier_steps=0``
gives the paper's procedure. The warm start runs once, before epoch 0, from
the run's seed, so a resumed run never repeats it.

The labels are drawn class-balanced (the same number per class) with their
own seed, so that a label draw can be repeated or varied independently of
the training seed. After every epoch the validation accuracy and the
validation ELBO with y summed out are measured; the models choose the
accuracy to pick their best checkpoint.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.poutine.messenger import Messenger
from tqdm.auto import tqdm

from ..checks import whole_number
from ..data import DataError
from .densities import evaluating, negligible_shares
from .objective import Objective, register_objective


def check_label_count(num_labels: int, num_points: int, num_classes: int) -> None:
    """Refuse a count of labels that cannot cover every class, or leaves no unlabelled training point.

    Raises :class:`~pyro_vae.data.DataError` naming the counts that would do.
    """
    if num_labels < num_classes:
        raise DataError(
            f"{num_labels} labels cannot cover {num_classes} classes; give --labels {num_classes} or more (one per "
            "class)."
        )
    if num_labels >= num_points:
        raise DataError(
            f"--labels {num_labels} is not below the {num_points} training points, and the semi-supervised objective "
            f"learns from unlabelled points too; give --labels {num_points - 1} or fewer, or train a VAE."
        )


def draw_labelled(y: torch.Tensor, num_labels: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``num_labels`` points, as many of each class as possible (the first classes get any remainder).

    Raises :class:`~pyro_vae.data.DataError` when the count is impossible.
    """
    check_label_count(num_labels, len(y), num_classes)
    generator = torch.Generator().manual_seed(seed)
    per_class = [num_labels // num_classes + (c < num_labels % num_classes) for c in range(num_classes)]
    chosen = []
    for c, count in enumerate(per_class):
        members = (y.cpu() == c).nonzero().squeeze(1)
        if len(members) < count:
            raise DataError(f"Class {c} has {len(members)} training points; {count} labelled ones were asked for.")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(chosen).sort().values


def paper_aux_weight(num_data: int, num_labels: int) -> float:
    """Kingma et al.'s alpha = 0.1 N on the mean over the labelled set, i.e. 0.1 N / N_labelled per labelled point."""
    if not num_labels > 0:
        raise ValueError(f"num_labels must be > 0; got {num_labels!r}.")
    return 0.1 * num_data / num_labels


def default_aux_weight(num_labels: int) -> float:
    """The library's alpha per labelled point: 0.46 per label, 46 at 100 labels (Pyro's example's ``-alm 46``),
    276 at 600, 460 at 1000, 1380 at 3000.

    A departure from Kingma et al., whose 0.1 N / N_labelled (:func:`paper_aux_weight`) is 50 per point at
    100 of 50,000 labels but falls to 5 at 1000: on M2 from MNIST's pixels the auxiliary term is worth more,
    not less, as labels are added (the measurements are in docs/semi-supervised.md and
    benchmarks/RESULTS.md). The rule does not depend on N, and was measured at N = 50,000 only.
    """
    return 46.0 * num_labels / 100


class NegligibleValuesDropped(Messenger):
    """Gives probability zero to the values of an enumerated categorical guide site whose probability is
    below :func:`~pyro_vae.infer.densities.negligible_share` of its dtype (2^-46 in float32).

    Under ``TraceEnum_ELBO`` the unlabelled loss is sum_y q(y | x) c(x, y): such values change it, and its
    gradient, by less than its rounding, and their subnormal weights would slow the backward pass
    (:func:`~pyro_vae.infer.densities.negligible_shares`). Pyro's ``Dice`` leaves out the terms of
    probability zero.
    """

    def _pyro_sample(self, msg):
        fn = msg["fn"]
        if msg["is_observed"] or msg["infer"].get("enumerate") != "parallel":
            return
        if isinstance(fn, dist.Categorical | dist.OneHotCategorical):
            # from probs, not logits: torch clamps a probability of zero to about 1e-7 in logits
            dropped = negligible_shares(fn.probs.log(), dim=-1)
            msg["fn"] = type(fn)(logits=fn.logits.masked_fill(dropped, -math.inf))


#: What the validation and test accuracy classify (``SemiSupervisedELBO(accuracy_on=...)``).
ACCURACY_INPUTS = ("intensities", "binarised")

#: Adam's learning rate of the classifier's warm start (that of the supervised baseline in RESULTS.md).
CLASSIFIER_LR = 1e-3


@register_objective
class SemiSupervisedELBO(Objective):
    """-J of M2 per step: the enumerated unlabelled ELBO plus the labelled ELBO and alpha * log q(y | x).

    :param num_labels: how many training labels are kept, drawn class-balanced.
    :param label_seed: seed of that draw.
    :param aux_weight: alpha per labelled point (default :func:`default_aux_weight` of ``num_labels``;
        Kingma et al.'s is :func:`paper_aux_weight`).
    :param classifier_steps: Adam steps of q(y | x) on the labelled cross-entropy alone before the first
        epoch of a fresh run (0: none, the paper's procedure).
    :param accuracy_on: what q(y | x) classifies when the validation and test accuracy are measured, where
        those splits were binarised: ``"intensities"``, the images themselves, as Pyro's SS-VAE example and
        Kingma et al.'s released M1+M2 code classify them (the default), or ``"binarised"``, the one binarisation
        that the splits' ELBO and log p(x) read (the library's only measure before this option; runs written
        then keep it).
    """

    name = "semi-supervised"
    loss_scaled_to_data = True  # both terms' plates are sized to their whole sets
    # runs written before the warm start had none, and measured the accuracy of the binarised splits
    legacy_config = {"classifier_steps": 0, "accuracy_on": "binarised"}

    def __init__(
        self,
        num_labels: int = 100,
        label_seed: int = 0,
        aux_weight: float | None = None,
        classifier_steps: int = 1000,
        accuracy_on: str = "intensities",
    ):
        num_labels = whole_number(num_labels, "num_labels", note="(labelled training points)")
        label_seed = whole_number(label_seed, "label_seed", minimum=0, note="(the seed of the label draw)")
        if aux_weight is None:
            aux_weight = default_aux_weight(num_labels)
        if isinstance(aux_weight, bool) or not isinstance(aux_weight, int | float) or not 0 <= aux_weight < math.inf:
            raise ValueError(
                f"aux_weight (alpha per labelled point) must be a number >= 0; got {aux_weight!r}. Kingma et al.'s "
                "is pyro_vae.infer.semisupervised.paper_aux_weight(num_data, num_labels)."
            )
        self.num_labels, self.label_seed, self.aux_weight = num_labels, label_seed, float(aux_weight)
        self.classifier_steps = whole_number(classifier_steps, "classifier_steps", minimum=0, note="(0: no warm start)")
        if accuracy_on not in ACCURACY_INPUTS:
            raise ValueError(f"accuracy_on must be one of {ACCURACY_INPUTS}; got {accuracy_on!r}.")
        self.accuracy_on = accuracy_on
        self.unlabelled_elbo = TraceEnum_ELBO(max_plate_nesting=1)
        self.labelled_elbo = Trace_ELBO(max_plate_nesting=1)
        self.labelled_order, self.cursor = None, 0
        self._enumerated_guide = {}

    def setup(self, model, data, *, batch_size):
        if not hasattr(model, "num_classes"):
            raise ValueError(
                f"The semi-supervised objective needs a model with a class label (pv.SSVAE, pv.StackedSSVAE); "
                f"got {type(model).__name__}."
            )
        # the labels of every split were checked by the model's check_dataset
        device = data.train.x.device
        self.labelled = draw_labelled(data.train.y, self.num_labels, model.num_classes, self.label_seed).to(device)
        is_labelled = torch.zeros(len(data.train), dtype=torch.bool, device=device)
        is_labelled[self.labelled] = True
        self.unlabelled = (~is_labelled).nonzero().squeeze(1)
        self.num_data = len(data.train)
        self.labelled_batch = min(batch_size, self.num_labels)

    def start(self, model, data, *, progress=False):
        """Train q(y | x) alone on the labelled points: ``classifier_steps`` Adam steps of cross-entropy."""
        if not self.classifier_steps:
            return
        parameters = [p for module in model.modules_for("classifier").values() for p in module.parameters()]
        optimizer = torch.optim.Adam(parameters, lr=CLASSIFIER_LR)
        for _ in tqdm(
            range(self.classifier_steps), desc="classifier from the labels", leave=False, disable=not progress
        ):
            chosen = self._next_labelled()
            with torch.no_grad():  # M1+M2's features come from the fixed M1
                features = model.feature_means(data.batch(chosen))
            loss = torch.nn.functional.cross_entropy(model.classifier_logits(features), data.train.y[chosen].long())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        self.labelled_order, self.cursor = None, 0  # training proper starts its own order of the labels

    def training_points(self, data):
        return self.unlabelled

    def enumerated_guide(self, model):
        """The model's guide with y enumerated in parallel, its negligible values dropped (built once per model)."""
        if id(model) not in self._enumerated_guide:
            self._enumerated_guide = {id(model): NegligibleValuesDropped()(config_enumerate(model.guide, "parallel"))}
        return self._enumerated_guide[id(model)]

    def _next_labelled(self) -> torch.Tensor:
        """The next labelled batch, from a fresh random order whenever the current one runs out."""
        if self.labelled_order is None or self.cursor + self.labelled_batch > self.num_labels:
            self.labelled_order = self.labelled[torch.randperm(self.num_labels, device=self.labelled.device)]
            self.cursor = 0
        chosen = self.labelled_order[self.cursor : self.cursor + self.labelled_batch]
        self.cursor += self.labelled_batch
        return chosen

    def batch(self, data, indices):
        """The unlabelled points at ``indices`` and the next labelled batch with its labels."""
        chosen = self._next_labelled()
        return data.batch(indices), data.batch(chosen), data.train.y[chosen]

    def points(self, batch):
        return self.num_data

    def loss(self, model, x, x_labelled, y_labelled, *, kl_weight):
        return self.unlabelled_loss(model, x, kl_weight=kl_weight) + self.labelled_loss(
            model, x_labelled, y_labelled, kl_weight=kl_weight
        )

    def unlabelled_loss(self, model, x, *, kl_weight):
        """-sum_unlabelled U(x) estimated from the batch x, y summed out by enumeration."""
        return self.unlabelled_elbo.differentiable_loss(
            model.model, self.enumerated_guide(model), x, kl_weight=kl_weight, num_data=len(self.unlabelled)
        )

    def labelled_loss(self, model, x, y, *, kl_weight):
        """-sum_labelled [L(x, y) + alpha log q(y | x)] estimated from the labelled batch (x, y)."""
        return self.labelled_elbo.differentiable_loss(
            model.model, model.guide, x, y, aux_weight=self.aux_weight, kl_weight=kl_weight, num_data=self.num_labels
        )

    @torch.no_grad()
    def validate(self, model, split, prefix):
        guide = config_enumerate(model.guide, "parallel")  # every value of y: an evaluation, not a gradient
        with evaluating(model):
            loss = sum(
                self.unlabelled_elbo.loss(model.model, guide, split.x[i : i + 1000]) for i in range(0, len(split), 1000)
            )
        images = split.unbinarised if self.accuracy_on == "intensities" else split.x
        return {f"{prefix}accuracy": model.accuracy(images, split.y), f"{prefix}elbo": -loss / len(split)}

    def state_dict(self):
        """The labelled order (on the CPU, as every process's is gathered into process 0's checkpoint) and cursor."""
        order = None if self.labelled_order is None else self.labelled_order.cpu()
        return {"labelled_order": order, "cursor": self.cursor}

    def load_state_dict(self, state):
        self.labelled_order, self.cursor = state.get("labelled_order"), state.get("cursor", 0)  # {} from version 1
        if self.labelled_order is not None:
            self.labelled_order = self.labelled_order.to(self.labelled.device)

    def config(self):
        return {
            "name": self.name,
            "num_labels": self.num_labels,
            "label_seed": self.label_seed,
            "aux_weight": self.aux_weight,
            "classifier_steps": self.classifier_steps,
            "accuracy_on": self.accuracy_on,
        }
