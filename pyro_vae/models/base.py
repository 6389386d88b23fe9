"""The interface every model implements, and the registry of model types.

A model is an :class:`torch.nn.Module` whose :meth:`~Model.model` and
:meth:`~Model.guide` are ordinary Pyro programs under the conventions of
``docs/conventions.md``: one plate named ``"data"`` at dim -1 over the batch,
the observation site ``"x"``, latent sites inside that plate. Around the two
programs, the training engine, the run directory, the evaluator and the
figures rely on a few more members, declared here:

* ``name`` (class attribute): the model's type name, ``"type"`` in its
  ``config()`` and its key in :data:`MODELS`; :meth:`from_config` rebuilds it;
* ``x_shape`` and ``z_dim``;
* :meth:`check_dataset`: refuse data the model cannot take, before any work;
* ``default_objective``: the training objective that fits the model
  (a name or config of :data:`pyro_vae.infer.objective.OBJECTIVES`);
* ``validation_metric``: the history column whose maximum picks the best
  checkpoint;
* ``figures``: the names of the figures of :mod:`pyro_vae.plots` that apply,
  each of which uses only the methods it documents (``sample``,
  ``reconstruct``, ``latent_means``, ``transfer_style``, ...).

Adding a model is one module: subclass :class:`Model` and decorate it with
``@register_model``; the command line (``--resume``), :func:`pyro_vae.load_run`,
the evaluator and the figures then take it.
"""

from __future__ import annotations

import itertools
import math
from abc import abstractmethod
from typing import TYPE_CHECKING, ClassVar

import pyro
import torch
from torch import nn

from ..checks import whole_number
from ..components.likelihoods import build_likelihood
from ..components.priors import build_prior
from ..data import DataError, check_finite_and_nonempty
from ..registry import Registry

if TYPE_CHECKING:
    from ..data import Dataset

#: A latent unit u is active when Cov_x(E_{q(u|x)}[u]) exceeds this (Burda et al. 2016, section 5.2).
ACTIVE_UNIT_THRESHOLD = 0.01


def device_of(component: nn.Module) -> torch.device:
    """Where a component's tensors are: its parameters', else its buffers' (a standard-normal prior and fixed
    scales hold buffers alone); the CPU for a component without tensors."""
    tensor = next(itertools.chain(component.parameters(), component.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


def config_that_rebuilds(component: nn.Module, kind: str, build, setup, log_density) -> dict:
    """``component.config()``, refused unless it rebuilds ``component``: a copy built from it (``build``, then
    ``setup``) and given ``component``'s state must give the same ``log_density`` on a fixed probe.

    A prior or likelihood of one's own whose ``config()`` leaves out a constructor argument would otherwise
    reload (``pv.load_run``, ``--resume``, ``pyro-vae evaluate``) as another distribution, without an error.
    """
    config = component.config()
    wrong = (
        f"The {kind} {config.get('name')!r} is not rebuilt by its config() {config}: a copy built from it gives "
        f"another density. Return every constructor argument from config() (see docs/howto/custom-prior-likelihood.md)."
    )
    with torch.random.fork_rng(devices=[]):  # building the copy draws its initial weights: not from the user's stream
        copy = build(config)
        setup(copy)
    try:
        copy.load_state_dict(component.state_dict())
    except RuntimeError as err:
        raise ValueError(f"{wrong} ({err})") from None
    copy.to(device_of(component)).train(component.training)
    with torch.no_grad():
        same = torch.allclose(log_density(component), log_density(copy), equal_nan=True)
    if not same:
        raise ValueError(wrong)
    return config


def prior_config(prior: nn.Module, z_dim: int, x_shape: tuple[int, ...], encoder: nn.Module) -> dict:
    """The prior's config, checked to rebuild it (:func:`config_that_rebuilds`) on three fixed codes z."""
    z = torch.linspace(-2.0, 2.0, 3 * z_dim).reshape(3, z_dim)
    return config_that_rebuilds(
        prior, "prior", build_prior, lambda copy: copy.setup(z_dim, x_shape=x_shape, encoder=encoder),
        lambda p: p.log_prob(z.to(device_of(p))),
    )  # fmt: skip


def likelihood_config(likelihood: nn.Module, x_shape: tuple[int, ...]) -> dict:
    """The likelihood's config, checked to rebuild it (:func:`config_that_rebuilds`) on two fixed decoder
    outputs and one draw of data from them (the global random state left as it was)."""
    size = likelihood.params_per_dim * math.prod(x_shape)
    params = torch.linspace(-1.0, 1.0, 2 * size).reshape(2, likelihood.params_per_dim, *x_shape)
    params = params.to(device := device_of(likelihood))
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        default_generator(device).manual_seed(0)  # that device's alone: torch.manual_seed reseeds every GPU's
        x = likelihood(params).sample()
    return config_that_rebuilds(
        likelihood, "likelihood", build_likelihood, lambda copy: copy.setup(x_shape),
        lambda candidate: candidate(params).log_prob(x),
    )  # fmt: skip


def default_generator(device: torch.device) -> torch.Generator:
    """The global generator that draws random numbers on ``device`` (the CPU's or one GPU's)."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


def data_plate(batch_size: int, num_data: int | None, device) -> pyro.plate:
    """The plate "data" over a batch, scaled by ``num_data / batch_size`` when the batch is a subsample."""
    if num_data is None or num_data == batch_size:
        return pyro.plate("data", batch_size, dim=-1)
    return pyro.plate("data", num_data, subsample=torch.arange(batch_size, device=device), dim=-1)


def latent_size(z_dim) -> int:
    """``z_dim`` as an int, refused unless it is a whole number >= 1 (a model needs a latent code)."""
    return whole_number(z_dim, "z_dim")


def check_points(x: torch.Tensor, x_shape: tuple[int, ...], likelihood, what: str, model: str) -> None:
    """Refuse data a model cannot take, naming the fix: empty, NaN/inf, wrong shape, outside the support."""
    check_finite_and_nonempty(x, what)
    if tuple(x.shape[1:]) != x_shape:
        raise DataError(
            f"The {what} has points of shape {tuple(x.shape[1:])} but the model expects {x_shape} "
            f"(full shape (N, *x_shape); got {tuple(x.shape)}). Reshape the data or build the {model} with "
            f"x_shape={tuple(x.shape[1:])}."
        )
    likelihood.check_data(x)


def start_decoder_output(decoder: nn.Module, likelihood, x: torch.Tensor) -> bool:
    """Set ``decoder``'s output bias to ``likelihood.constant_fit(x)``; False if either has none.

    Burda, Grosse & Salakhutdinov's code (2016) starts its decoders so: the decoder then need not
    spend its first thousands of steps learning each pixel's mean, and the posterior's units stay
    active (benchmarks/RESULTS.md).
    """
    start = getattr(decoder, "start_output_at", None)
    output = None if start is None else likelihood.constant_fit(x)
    if output is None:
        return False
    start(output.to(x.device))
    return True


class Model(nn.Module):
    """Base class of pyro-vae's models: a Pyro model p(x, z) and guide q(z | x) with what the library needs."""

    name: ClassVar[str]
    default_objective: ClassVar[str | dict] = "trace"
    validation_metric: ClassVar[str] = "val_elbo"
    figures: ClassVar[tuple[str, ...]] = ("learning_curves",)
    #: Whether the guide's latent sites are independent given x, as the closed-form KL of "meanfield" needs.
    mean_field_guide: ClassVar[bool] = True
    #: Config keys added after runs were first written, with the value those older runs had.
    legacy_config: ClassVar[dict] = {}
    x_shape: tuple[int, ...]
    z_dim: int

    @classmethod
    def completed_config(cls, config: dict) -> dict:
        """``config`` with the keys that older runs did not record (``legacy_config``) at their old values."""
        return {**cls.legacy_config, **config}

    @abstractmethod
    def model(self, x=None, *args, **kwargs):
        """The generative model p(z) p(x | z) as a Pyro program, data in the plate ``"data"``."""

    @abstractmethod
    def guide(self, x=None, *args, **kwargs):
        """The inference network q(z | x) as a Pyro program with the model's arguments."""

    @abstractmethod
    def check_data(self, x: torch.Tensor, what: str = "data") -> None:
        """Raise :class:`~pyro_vae.data.DataError` naming the fix if the model cannot take ``x``."""

    def check_dataset(self, data: Dataset) -> None:
        """Check every split as the model will see it, before any training starts; a VampPrior's pseudo-inputs
        must be able to reach the training data."""
        for split in ("train", "val", "test"):
            x = getattr(data, split).x
            if split == "train" and data.binarize == "dynamic":
                x = x.round()  # batches are resampled binary; the pixels were checked to lie in [0, 1]
            self.check_data(x, f"{split} data")
        bounds = getattr(getattr(self, "prior", None), "bounds", None)
        if bounds is None:
            return
        low, high = data.train.x.aminmax()  # one pass, only where a VampPrior has bounds
        if low < bounds[0] or high > bounds[1]:
            raise DataError(
                f"The VampPrior keeps its pseudo-inputs in [{bounds[0]:g}, {bounds[1]:g}] (the range of images), "
                f"but the training data spans [{low.item():.4g}, {high.item():.4g}]: build it with bounds=None "
                "(pv.priors.VampPrior(..., bounds=None)), which leaves them free, or with bounds that hold the data."
            )

    @torch.no_grad()
    def latent_means(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """E_q[z | x] of the latent code that the active-unit count and the latent plot use, in batches."""
        return torch.cat([self.encode(x[i : i + batch_size])[0] for i in range(0, x.shape[0], batch_size)])

    @property
    def latent_sizes(self) -> tuple[int, ...]:
        """The sizes of the latent layers that :meth:`latent_means` puts side by side (one layer: ``(z_dim,)``)."""
        return (self.z_dim,)

    def start_output_bias(self, x: torch.Tensor) -> bool:
        """Start p(x | z)'s output bias at the likelihood's constant fit to the training points ``x``.

        The engine calls it once, on a fresh run with ``output_bias="data"``, and records whether it
        did. This base class does nothing; models with a decoder and a likelihood return
        :func:`start_decoder_output`.
        """
        return False

    @property
    def describable(self) -> bool:
        """Whether :meth:`config` describes the model completely (not so with user-supplied networks)."""
        return True

    @abstractmethod
    def config(self) -> dict:
        """Everything needed to rebuild the model with :meth:`from_config`, with ``"type": self.name``."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict) -> Model:
        """The model that :meth:`config` describes (with fresh weights; the checkpoint holds the trained ones)."""


#: Model types by name: :func:`build_model` rebuilds a model from its ``config()``.
MODELS: Registry[type[Model]] = Registry("model type", Model)
#: Make a model type known by its ``name`` to run directories and the command line (usable as a decorator).
register_model = MODELS.register


def completed_model_config(config: dict) -> dict:
    """A model's config with what older runs did not record: its type (configs that predate types are
    VAEs) and the keys its type added since (its ``legacy_config``), at the values those runs had."""
    config = {"type": "vae", **config}
    return MODELS[config["type"]].completed_config(config) if config["type"] in MODELS else config


def build_model(config: dict) -> Model:
    """A model from the dict its ``config()`` wrote."""
    config = completed_model_config(config)
    return MODELS.lookup(config["type"]).from_config(config)
