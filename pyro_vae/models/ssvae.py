"""The semi-supervised VAE M2 of Kingma, Rezende, Mohamed & Welling,
*Semi-Supervised Learning with Deep Generative Models* (NeurIPS 2014).

Generative model (``SSVAE.model``), in the plate "data"::

    y_n ~ p(y) = Categorical(pi)          site "y" (one-hot), pi uniform or learned
    z_n ~ p(z)                            site "z", any prior of :mod:`pyro_vae.components.priors`
    x_n ~ p(x | y_n, z_n) = likelihood(decoder(z_n, y_n))   site "x"

Inference network (``SSVAE.guide``)::

    y_n ~ q(y | x_n) = Categorical(softmax(classifier(x_n)))   only where y is unobserved
    z_n ~ q(z | x_n, y_n) = N(loc(x_n, y_n), diag(scale(x_n, y_n)^2))

A labelled point contributes the ELBO of the VAE given y, plus log p(y):

    L(x, y) = E_q(z|x,y)[log p(x | y, z)] - KL(q(z|x,y) || p(z)) + log p(y).

An unlabelled point sums y out of the ELBO exactly,

    U(x) = sum_y q(y|x) L(x, y) + H(q(y|x)),

which Pyro computes when the guide's "y" site is enumerated
(``config_enumerate`` with ``TraceEnum_ELBO``): all ten values at once in a
tensor dimension left of the plate, not one sampled value.

The classifier q(y|x) appears only in U, so it would never learn from the
labels directly. Kingma et al. add ``alpha * log q(y|x)`` for every labelled
point; with ``aux_weight=alpha`` the model includes it as the observed site
"y_aux" (scaled by ``poutine.scale``), so the labelled loss is
-(L(x, y) + alpha * log q(y | x)). :mod:`pyro_vae.infer.semisupervised` sets
alpha per labelled point to 0.46 times the label count unless told otherwise
(``default_aux_weight``; the paper's 0.1 * N / N_labelled is
``paper_aux_weight`` there). With
``aux_weight=0`` (the default) the model is the plain generative model, and
the importance-sampled log p(x) of :mod:`pyro_vae.infer.importance` applies, with y
drawn from q(y | x).

The plate and keyword conventions are those of :class:`pyro_vae.VAE`
(``num_data``, ``kl_weight``, ``batch_size``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import torch.nn.functional as F
from torch import nn

from ..checks import whole_number
from ..components.likelihoods import Likelihood, as_likelihood, build_likelihood
from ..components.nets import MLPClassifier, MLPDecoder, MLPEncoder, activation_class
from ..components.priors import Prior, VampPrior, as_prior, build_prior
from ..data import DataError
from .base import (
    Model,
    check_points,
    data_plate,
    latent_size,
    likelihood_config,
    prior_config,
    register_model,
    start_decoder_output,
)

_instance_ids = itertools.count()
CLASS_PRIORS = ("uniform", "learned")
PSEUDO_INPUT_LABELS = ("summed", "predicted")


def concat_broadcast(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate along the last dimension after broadcasting the leading ones.

    Under enumeration y has shape ``(10, 1, 10)`` while x has ``(batch, D)``;
    the result then has shape ``(10, batch, D + 10)``.
    """
    shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*shape, a.shape[-1]), b.expand(*shape, b.shape[-1])], dim=-1)


class ClassPrior(nn.Module):
    """p(y) = Categorical(softmax(logits)): uniform (fixed zeros) or with learned logits."""

    def __init__(self, num_classes: int, learned: bool):
        super().__init__()
        logits = torch.zeros(num_classes)
        if learned:
            self.logits = nn.Parameter(logits)
        else:
            self.register_buffer("logits", logits)

    def forward(self) -> dist.OneHotCategorical:
        return dist.OneHotCategorical(logits=self.logits)


class SemiSupervisedModel(Model):
    """What M2 and M1+M2 share: a class label y beside the code z, a classifier q(y | x), labels to check.

    This class puts together ``model(x, y, *, aux_weight, kl_weight, num_data, batch_size)`` and the
    guide with the same signature from the parts that differ between M2 and M1+M2, which subclasses
    provide: ``num_classes``, ``encode(x, y_onehot)``, ``decode(z, y_onehot)``, ``one_hot``,
    ``sample_labels`` and the hooks listed below the class attributes.
    """

    default_objective = "semi-supervised"
    validation_metric = "val_accuracy"
    mean_field_guide = False  # q(z | x, y) depends on y
    figures = ("learning_curves", "accuracy", "latent_space", "style_transfer", "class_samples")
    num_classes: int

    # The parts that differ between M2 and M1+M2, which the model and guide below put together:
    #   modules_for(role) -> {name: module} for pyro.module, role "model", "guide" or "classifier";
    #   label_prior() -> p(y); observe(z, y_onehot, n, device, x) -> x, sampling the data sites;
    #   guide_features(x) -> what q(y | .) and q(z | ., y) read (sampling any sites it takes, M1's z1);
    #   classifier_logits(features); encode_features(features, y_onehot) -> (loc, scale).

    def model(
        self,
        x=None,
        y=None,
        *,
        aux_weight: float = 0.0,
        kl_weight: float = 1.0,
        num_data: int | None = None,
        batch_size: int | None = None,
    ):
        """p(y) p(z) p(x | y, z); observes y where given, plus ``aux_weight * log q(y|x)`` for labelled x."""
        self._register("model")
        n = x.shape[0] if x is not None else (y.shape[0] if y is not None else (batch_size or 1))
        device = next(self.parameters()).device
        y_onehot = None if y is None else self.one_hot(y)
        with data_plate(n, num_data, device):
            y_onehot = pyro.sample("y", self.label_prior(), obs=y_onehot)
            with poutine.scale(scale=kl_weight):
                z = pyro.sample("z", self.prior())
            x = self.observe(z, y_onehot, n, device, x)
            if y is not None and aux_weight:
                self._register("classifier")
                with poutine.scale(scale=aux_weight):
                    logits = self.classifier_logits(self.feature_means(x))
                    pyro.sample("y_aux", dist.OneHotCategorical(logits=logits), obs=y_onehot)
            return x

    def guide(
        self,
        x=None,
        y=None,
        *,
        aux_weight: float = 0.0,
        kl_weight: float = 1.0,
        num_data: int | None = None,
        batch_size: int | None = None,
    ):
        """q(y | x) where y is unobserved, and q(z | x, y) (through the features the model reads x by)."""
        if x is None:
            raise ValueError(f"The guide of {type(self).__name__} needs data x.")
        self._register("guide")
        with data_plate(x.shape[0], num_data, x.device):
            features = self.guide_features(x)
            if y is None:
                y_onehot = pyro.sample("y", dist.OneHotCategorical(logits=self.classifier_logits(features)))
            else:
                y_onehot = self.one_hot(y)
            loc, scale = self.encode_features(features, y_onehot)
            with poutine.scale(scale=kl_weight):
                return pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def _register(self, role: str) -> None:
        for name, module in self.modules_for(role).items():
            pyro.module(f"{self.pyro_name}.{name}", module)

    def feature_means(self, x: torch.Tensor) -> torch.Tensor:
        """The features of x at their mean, as the auxiliary classification term reads them (x itself for M2)."""
        return x

    @torch.no_grad()
    def classify(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """The most probable class under q(y | x) (of the features at their mean), for each point."""
        return torch.cat(
            [
                self.classifier_logits(self.feature_means(x[i : i + batch_size])).argmax(-1)
                for i in range(0, len(x), batch_size)
            ]
        )

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """The fraction of points that :meth:`classify` labels correctly."""
        return (self.classify(x) == y.to(x.device)).double().mean().item()

    @torch.no_grad()
    def sample(self, num_samples: int, y: torch.Tensor | None = None) -> torch.Tensor:
        """Means of p(x | y, z) with z from the prior and y given (or drawn from p(y))."""
        if y is None:
            y = self.sample_labels(num_samples)
        return self.decode(self.prior.sample(num_samples), self.one_hot(y)).mean

    @torch.no_grad()
    def transfer_style(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Each x's style z = loc(x, y) decoded with every class: shape ``(len(x), num_classes, *x_shape)``.

        y defaults to the classifier's prediction.
        """
        y = self.classify(x) if y is None else y
        z = self.encode(x, self.one_hot(y))[0]
        return self.decode(z.unsqueeze(1), torch.eye(self.num_classes, device=z.device)).mean

    def check_dataset(self, data) -> None:
        """Every split's points and labels, before any training starts."""
        super().check_dataset(data)
        for split, labels in labels_of(data).items():
            self.check_labels(labels, getattr(data, split).x, f"{split} labels")


def labels_of(data) -> dict[str, torch.Tensor]:
    """Each split's labels by its name, refused with :class:`~pyro_vae.data.DataError` where a split has none."""
    splits = {"train": data.train, "val": data.val, "test": data.test}
    if any(split.y is None for split in splits.values()):
        raise DataError(
            "Semi-supervised training needs labels for the train, validation and test splits: give a labelled data "
            "set (mnist, or an .npz with y beside x and y_test beside x_test)."
        )
    return {name: split.y for name, split in splits.items()}


def class_count(data) -> int:
    """How many values a label of ``data`` takes: one more than its largest label in any split (ten for MNIST).

    Labels that are not class indices 0, 1, 2, ... are refused by the model's :meth:`check_dataset`.
    """
    largest = max(int(labels.max()) for labels in labels_of(data).values() if len(labels))
    if largest < 1:
        raise DataError(
            f"The labels hold one class ({largest}); semi-supervised training needs two or more, numbered 0, 1, 2, ..."
        )
    return largest + 1


@register_model
class SSVAE(SemiSupervisedModel):
    """M2: a VAE with a partly observed class label y next to the continuous code z.

    :param x_shape: shape of one data point, e.g. ``(1, 28, 28)``.
    :param z_dim: dimension of z (the "style").
    :param num_classes: number of values of y.
    :param prior: a :class:`~pyro_vae.components.priors.Prior` for z, its short name or config dict (default
        standard normal).
    :param likelihood: a :class:`~pyro_vae.components.likelihoods.Likelihood`, its short name or config dict
        (default Bernoulli).
    :param hidden: hidden sizes of the classifier, encoder and decoder MLPs.
    :param class_prior: ``"uniform"`` p(y), or ``"learned"`` class probabilities.
    :param activation: of every hidden layer, ``"softplus"`` as in Kingma et al. (2014) and
        Pyro's SS-VAE example, or ``"relu"``. With ReLU, M2 from pixels lost validation
        accuracy epoch after epoch; with softplus it gains (docs/semi-supervised.md).
    :param pseudo_input_labels: how a VampPrior's pseudo-inputs u_k meet the label. ``"summed"`` (the
        default): q(z | u) = sum_y q(y | u) q(z | u, y), M2's own posterior of z, so that p(z) =
        (1/K) sum_k sum_y q(y | u_k) q(z | u_k, y), a mixture of K C Gaussians, is Tomczak & Welling's
        prior for this guide. ``"predicted"``: one Gaussian q(z | u, y) at the classifier's soft prediction
        y = q(. | u), a label the encoder never sees in training (runs written before the choice).
    :param name: prefix in Pyro's param store, unique per instance by default.
    """

    name = "ssvae"
    # runs written before the choices used ReLU, and the soft prediction for the pseudo-inputs' label
    legacy_config = {"activation": "relu", "pseudo_input_labels": "predicted"}

    def __init__(
        self,
        x_shape: Sequence[int],
        z_dim: int = 50,
        num_classes: int = 10,
        prior: Prior | str | dict | None = None,
        likelihood: Likelihood | str | dict | None = None,
        *,
        hidden: Sequence[int] = (500,),
        class_prior: str = "uniform",
        activation: str = "softplus",
        pseudo_input_labels: str = "summed",
        name: str | None = None,
    ):
        super().__init__()
        if class_prior not in CLASS_PRIORS:
            raise ValueError(f"Unknown class prior {class_prior!r}; choose one of {CLASS_PRIORS}.")
        if pseudo_input_labels not in PSEUDO_INPUT_LABELS:
            raise ValueError(f"pseudo_input_labels must be one of {PSEUDO_INPUT_LABELS}; got {pseudo_input_labels!r}.")
        self.pseudo_input_labels = pseudo_input_labels
        num_classes = whole_number(num_classes, "num_classes", minimum=2)
        self.x_shape, self.z_dim, self.num_classes = tuple(x_shape), latent_size(z_dim), num_classes
        self.hidden, self.class_prior, self.activation = tuple(hidden), class_prior, activation
        act = activation_class(activation)
        self.likelihood = as_likelihood(likelihood)
        self.likelihood.setup(self.x_shape)
        x_dim = math.prod(self.x_shape)
        self.classifier = MLPClassifier(self.x_shape, self.num_classes, self.hidden, activation=act)
        self.encoder = MLPEncoder((x_dim + self.num_classes,), self.z_dim, self.hidden, activation=act)
        self.decoder = MLPDecoder(
            self.z_dim + self.num_classes, self.x_shape, self.hidden, self.likelihood.params_per_dim, activation=act
        )
        self.class_prior_net = ClassPrior(self.num_classes, learned=class_prior == "learned")
        self.prior = as_prior(prior)
        self.prior.setup(self.z_dim, x_shape=self.x_shape, encoder=self._pseudo_input_posterior)
        self.prior.owned = self.likelihood.owned = True  # built: another model may not set them up again
        self.pyro_name = name or f"ssvae{next(_instance_ids)}"

    # ----------------------------------------------------------------- Pyro
    def modules_for(self, role: str) -> dict[str, nn.Module]:
        return {
            "model": {
                "decoder": self.decoder,
                "prior": self.prior,
                "likelihood": self.likelihood,
                "class_prior": self.class_prior_net,
            },
            "guide": {"classifier": self.classifier, "encoder": self.encoder},
            "classifier": {"classifier": self.classifier},
        }[role]

    def label_prior(self) -> dist.OneHotCategorical:
        return self.class_prior_net()

    def observe(self, z, y_onehot, n, device, x):
        """x ~ p(x | y, z)."""
        return pyro.sample("x", self.decode(z, y_onehot), obs=x)

    def guide_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def classifier_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)

    def encode_features(self, features, y_onehot):
        return self.encode(features, y_onehot)

    # ------------------------------------------------------------ utilities
    def one_hot(self, y: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y.long(), self.num_classes).to(self.class_prior_net.logits.dtype)

    def encode(self, x: torch.Tensor, y_onehot: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of q(z | x, y), for one-hot (or soft) labels that broadcast against x.

        Without labels, y is the classifier's most probable class.
        """
        if y_onehot is None:
            y_onehot = self.one_hot(self.classifier(x).argmax(-1))
        flat = x.flatten(start_dim=x.ndim - len(self.x_shape))
        return self.encoder.forward_concatenated(flat, y_onehot)  # x multiplied once for every y

    def _pseudo_input_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q(z | x) for a VampPrior's pseudo-inputs x, as ``pseudo_input_labels`` says: (loc, scale, log q(y | x))
        of the mixture over the labels y (in dimension -2), or (loc, scale) at the soft prediction."""
        logits = self.classifier(x)
        if self.pseudo_input_labels == "predicted":
            return self.encode(x, logits.softmax(-1))
        every_label = torch.eye(self.num_classes, device=x.device, dtype=logits.dtype)
        loc, scale = self.encode(x.unsqueeze(1), every_label)  # (N, 1, *x_shape) against (C, C): (N, C, z_dim)
        return loc, scale, logits.log_softmax(-1)

    def decode(self, z: torch.Tensor, y_onehot: torch.Tensor):
        """The distribution p(x | y, z)."""
        return self.likelihood(self.decoder(concat_broadcast(z, y_onehot)))

    def sample_labels(self, num_samples: int) -> torch.Tensor:
        """Class indices drawn from p(y)."""
        return self.class_prior_net().sample((num_samples,)).argmax(-1)

    def start_output_bias(self, x: torch.Tensor) -> bool:
        return start_decoder_output(self.decoder, self.likelihood, x)

    def check_data(self, x: torch.Tensor, what: str = "data") -> None:
        """Refuse data this model cannot take, naming the fix."""
        check_points(x, self.x_shape, self.likelihood, what, "SSVAE")

    def check_labels(self, y: torch.Tensor, x: torch.Tensor, what: str = "labels") -> None:
        """Labels must be integers in [0, num_classes), one per data point."""
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(
                f"The {what} have shape {tuple(y.shape)} for {len(x)} data points; give one integer label per point."
            )
        if y.dtype.is_floating_point and not torch.equal(y, y.round()):
            raise DataError(f"The {what} are not whole numbers; give class indices 0..{self.num_classes - 1}.")
        if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
            raise DataError(
                f"The {what} range over [{int(y.min())}, {int(y.max())}] but the model has classes "
                f"0..{self.num_classes - 1}; relabel the data or build the SSVAE with num_classes={int(y.max()) + 1}."
            )

    # --------------------------------------------------------------- config
    def config(self) -> dict:
        """Everything needed to rebuild this model with :meth:`from_config`."""
        config = {
            "type": self.name,
            "x_shape": list(self.x_shape),
            "z_dim": self.z_dim,
            "num_classes": self.num_classes,
            "hidden": list(self.hidden),
            "class_prior": self.class_prior,
            "activation": self.activation,
            "prior": prior_config(self.prior, self.z_dim, self.x_shape, self._pseudo_input_posterior),
            "likelihood": likelihood_config(self.likelihood, self.x_shape),
        }
        if isinstance(self.prior, VampPrior):  # the one prior it shapes: the others' configs stay as they were
            config["pseudo_input_labels"] = self.pseudo_input_labels
        return config

    @classmethod
    def from_config(cls, config: dict) -> SSVAE:
        """The SSVAE that :meth:`config` describes, with fresh weights."""
        config = cls.completed_config(config)
        return cls(
            x_shape=config["x_shape"],
            z_dim=config["z_dim"],
            num_classes=config["num_classes"],
            prior=build_prior(config["prior"]),
            likelihood=build_likelihood(config["likelihood"]),
            hidden=config["hidden"],
            class_prior=config["class_prior"],
            activation=config["activation"],
            pseudo_input_labels=config["pseudo_input_labels"],
        )
