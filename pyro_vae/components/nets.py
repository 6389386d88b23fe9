"""Encoder and decoder networks.

The documented signatures, which any user module may follow instead:

* **encoder** ``encoder(x) -> (loc, scale)``: x has shape ``(*batch, *x_shape)``;
  loc and scale have shape ``(*batch, z_dim)`` and scale > 0. They parameterise
  q(z | x) = N(loc, diag(scale^2)) -- scale is a standard deviation, not a variance.
* **decoder** ``decoder(z) -> params``: z has shape ``(*batch, z_dim)``; params has
  shape ``(*batch, params_per_dim, *x_shape)``, which the likelihood turns into
  p(x | z).

A decoder may also have ``start_output_at(output)``, which sets its output
bias (:meth:`MLPDecoder.start_output_at`): a fresh run then starts it at the
likelihood's constant fit to the data (``output_bias="data"`` of
:func:`~pyro_vae.fit`).

Both accept any number of leading batch dimensions, so that Pyro can add
particle plates (``vectorize_particles=True``, importance sampling).
Encoder scales are ``softplus(raw) + min_scale``: positive and finite
whatever the raw output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = ("mlp", "conv")
#: Hidden-layer activations by name, for models that record theirs in their config.
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "softplus": nn.Softplus, "tanh": nn.Tanh}


def activation_class(name: str) -> type[nn.Module]:
    """The hidden-layer activation called ``name``, or a ``ValueError`` that lists the known ones."""
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """softplus^{-1}(y) = log(exp(y) - 1) = y + log(-expm1(-y)) for y > 0: the raw value that starts a
    softplus-constrained parameter at y."""
    return y + torch.log(-torch.expm1(-y))


def _mlp(sizes: Sequence[int], activation: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(fan_in, fan_out), activation()]
    return nn.Sequential(*layers[:-1])  # no activation after the last layer


class _GaussianHead(nn.Module):
    """Splits 2 * z_dim outputs into (loc, scale) with a numerically safe scale."""

    def __init__(self, min_scale: float):
        super().__init__()
        self.min_scale = min_scale

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw_scale = h.chunk(2, dim=-1)
        return loc, F.softplus(raw_scale) + self.min_scale


class MLPEncoder(nn.Module):
    """q(z | x): a fully connected net from the flattened x to (loc, scale)."""

    def __init__(
        self, x_shape, z_dim: int, hidden: Sequence[int] = (400,), activation=nn.ReLU, min_scale: float = 1e-4
    ):
        super().__init__()
        self.x_shape = tuple(x_shape)
        self.net = _mlp([math.prod(self.x_shape), *hidden, 2 * z_dim], activation)
        self.head = _GaussianHead(min_scale)

    def forward(self, x):
        return self.head(self.net(x.flatten(start_dim=x.ndim - len(self.x_shape))))

    def forward_concatenated(self, *parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward(cat(parts, -1))`` for flat parts that broadcast against each other, without the concatenation.

        The first layer's product splits over the parts, W [a, b] = W_a a + W_b b, so a part that
        broadcasts (x against the ten enumerated values of y in M2) is multiplied once, not once per value.
        """
        first = self.net[0]
        widths = [part.shape[-1] for part in parts]
        if sum(widths) != first.in_features:
            raise ValueError(f"The parts have {sum(widths)} features in all; the encoder takes {first.in_features}.")
        columns = first.weight.split(widths, dim=1)
        h = sum(F.linear(part, weight) for part, weight in zip(parts, columns, strict=True)) + first.bias
        return self.head(self.net[1:](h))


class MLPClassifier(nn.Module):
    """A fully connected net from the flattened x to the logits of ``num_classes`` classes."""

    def __init__(self, x_shape, num_classes: int, hidden: Sequence[int] = (400,), activation=nn.ReLU):
        super().__init__()
        self.x_shape = tuple(x_shape)
        self.net = _mlp([math.prod(self.x_shape), *hidden, num_classes], activation)

    def forward(self, x):
        return self.net(x.flatten(start_dim=x.ndim - len(self.x_shape)))


class MLPDecoder(nn.Module):
    """A fully connected net from z to ``params_per_dim`` outputs per data dimension."""

    def __init__(
        self, z_dim: int, x_shape, hidden: Sequence[int] = (400,), params_per_dim: int = 1, activation=nn.ReLU
    ):
        super().__init__()
        self.out_shape = (params_per_dim, *x_shape)
        self.net = _mlp([z_dim, *reversed(tuple(hidden)), math.prod(self.out_shape)], activation)

    def forward(self, z):
        return self.net(z).unflatten(-1, self.out_shape)

    @torch.no_grad()
    def start_output_at(self, output: torch.Tensor) -> None:
        """Set the last layer's bias to ``output`` (shape ``out_shape``): with small weights the fresh
        decoder's output starts near it, whatever z."""
        self.net[-1].bias.copy_(output.reshape(-1))


def _check_image_shape(x_shape) -> tuple[int, int, int]:
    if len(x_shape) != 3 or x_shape[1] % 4 or x_shape[2] % 4:
        raise ValueError(
            f"The conv architecture needs images shaped (channels, height, width) with height and width "
            f"divisible by 4; got {tuple(x_shape)}. Use arch='mlp' (--arch mlp) for other data."
        )
    return tuple(x_shape)


class ConvEncoder(nn.Module):
    """q(z | x) for images: two stride-2 convolutions, then a dense layer to (loc, scale)."""

    def __init__(
        self, x_shape, z_dim: int, hidden: int = 256, channels: tuple[int, int] = (32, 64), min_scale: float = 1e-4
    ):
        super().__init__()
        c, h, w = self.x_shape = _check_image_shape(x_shape)
        self.net = nn.Sequential(
            nn.Conv2d(c, channels[0], 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels[0], channels[1], 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(channels[1] * (h // 4) * (w // 4), hidden),
            nn.ReLU(),
            nn.Linear(hidden, 2 * z_dim),
        )
        self.head = _GaussianHead(min_scale)

    def forward(self, x):
        batch = x.shape[:-3]
        return self.head(self.net(x.reshape(-1, *self.x_shape)).reshape(*batch, -1))


class ConvDecoder(nn.Module):
    """The mirror of :class:`ConvEncoder`: a dense layer, then two stride-2 transposed convolutions."""

    def __init__(
        self, z_dim: int, x_shape, hidden: int = 256, channels: tuple[int, int] = (32, 64), params_per_dim: int = 1
    ):
        super().__init__()
        c, h, w = _check_image_shape(x_shape)
        self.out_shape = (params_per_dim, c, h, w)
        self.net = nn.Sequential(
            nn.Linear(z_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, channels[1] * (h // 4) * (w // 4)),
            nn.ReLU(),
            nn.Unflatten(-1, (channels[1], h // 4, w // 4)),
            nn.ConvTranspose2d(channels[1], channels[0], 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(channels[0], params_per_dim * c, 4, stride=2, padding=1),
        )

    def forward(self, z):
        batch = z.shape[:-1]
        return self.net(z.reshape(-1, z.shape[-1])).reshape(*batch, *self.out_shape)


def build_nets(
    arch: str, x_shape, z_dim: int, hidden: Sequence[int], params_per_dim: int, activation: str = "relu"
) -> tuple[nn.Module, nn.Module]:
    """The (encoder, decoder) pair of a named architecture.

    ``hidden`` lists the MLP's hidden sizes from the data side; the conv pair
    uses its first entry as the size of its dense layer, and ReLU.
    """
    act = activation_class(activation)
    if arch == "mlp":
        return (
            MLPEncoder(x_shape, z_dim, hidden, activation=act),
            MLPDecoder(z_dim, x_shape, hidden, params_per_dim, activation=act),
        )
    if arch == "conv":
        if activation != "relu":
            raise ValueError(
                f"The conv architecture uses ReLU; activation {activation!r} applies to arch='mlp' (--arch mlp)."
            )
        if len(hidden) > 1:
            raise ValueError(
                f"The conv architecture has one dense layer, whose size is hidden[0]; got hidden={tuple(hidden)}. "
                "Give one size."
            )
        size = hidden[0] if hidden else 256
        return ConvEncoder(x_shape, z_dim, size), ConvDecoder(z_dim, x_shape, size, params_per_dim=params_per_dim)
    raise ValueError(f"Unknown architecture {arch!r}; choose one of {ARCHITECTURES}.")
