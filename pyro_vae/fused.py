"""The Bernoulli log-density of a whole image in one compiled pass, for the log p(x) evaluator.

With a 784-400-20 decoder, the log-density of 784 pixels per importance
sample costs about as much as the decoder's matrix products: a softplus is an
exp and a log1p per pixel, and eager PyTorch makes several passes over a
``(K, N, 784)`` tensor. :func:`bernoulli_log_prob_sum` computes the same sum
in one pass over the logits compiled by TorchInductor (``torch.compile``),
with one exp per pixel and one log per group of up to 112 pixels. For x in
{0, 1} and t_d = (2 x_d - 1) l_d::

    sum_d log Bernoulli(x_d; sigmoid(l_d)) = sum_d log sigmoid(t_d)
        = sum_d min(t_d, 0) - sum_groups log prod_{d in group} (1 + exp(-|t_d|)).

Each factor lies in (1, 2], so a product of 112 stays below 2^112, short of
float32's overflow at 2^128. A product of 112 factors carries a relative
rounding error of at most about 112 float32 epsilons (7e-6), so the sum
differs from the softplus form by at most about 5e-5 nats per 784-pixel
image (7 groups), against a Monte Carlo standard error of log p(x) near 0.2
nats.

The compiled sum is the custom operator ``torch.ops.pyro_vae.bernoulli_log_prob_sum``.
Eagerly it is one opaque call to the compiled kernel; a graph recorded by
:mod:`pyro_vae.replay` takes in its definition instead (:data:`pyro_vae.replay.DECOMPOSITIONS`),
so that Inductor compiles it together with the decoder's last layer and adds
that layer's bias inside the same pass over the logits.

The compiled path serves the evaluator only: inside :func:`compiled_evaluation`
(which :func:`~pyro_vae.marginal.log_marginal_likelihood` enters) and when no
gradient is needed. Training and its validation keep the eager softplus and its
autograd, and never wait for a compiler. Where ``torch.compile`` cannot run
(no C++ compiler, say) the eager form is used after one warning.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

from .compiling import CompiledOnce
from .replay import DECOMPOSITIONS

MAX_GROUP = 112  # pixels per product: each factor is at most 2 and 2^112 < 2^128, float32's overflow
LANES = 16  # float32 lanes of an AVX-512 register: groups are whole vectors


def group_size(size: int) -> int:
    """Pixels per product for ``size`` pixels: about equal groups of at most MAX_GROUP, a multiple of LANES."""
    groups = -(-size // MAX_GROUP)
    return min(MAX_GROUP, LANES * -(-size // (groups * LANES)))


def _grouped_log_sigmoid_sum(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """sum_d log sigmoid(t_d), t = (2 value - 1) logits, over the last dim, with one log per group of pixels.

    The pixels are padded to whole groups with t = +inf, whose terms min(t, 0) and log(1 + exp(-t)) are
    exactly 0. Both sums reduce over the same (group, pixel) loops, so TorchInductor reads the logits once.
    """
    t = (2 * value - 1) * logits
    size = group_size(t.shape[-1])
    t = F.pad(t, (0, -t.shape[-1] % size), value=torch.inf).unflatten(-1, (-1, size))
    log_normaliser = (torch.exp(-t.abs()) + 1).prod(-1).log()
    return (t.clamp(max=0).sum(-1) - log_normaliser).sum(-1)


def _softplus_sum(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """sum_d log Bernoulli(value_d; sigmoid(logits_d)) = -sum_d softplus((1 - 2 value_d) logits_d), eagerly."""
    # softplus's gradient needs only its input, so negating the sum in place is safe under autograd
    return F.softplus((1 - 2 * value) * logits).sum(-1).neg_()


_compiled_log_sigmoid_sum = CompiledOnce(_grouped_log_sigmoid_sum, _softplus_sum, "the Bernoulli log-density")


@torch.library.custom_op("pyro_vae::bernoulli_log_prob_sum", mutates_args=())
def _bernoulli_log_prob_sum_op(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return _compiled_log_sigmoid_sum(logits, value)


@_bernoulli_log_prob_sum_op.register_fake
def _(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return logits.new_empty(torch.broadcast_shapes(logits.shape, value.shape)[:-1])


DECOMPOSITIONS[torch.ops.pyro_vae.bernoulli_log_prob_sum.default] = _grouped_log_sigmoid_sum

_in_evaluation: ContextVar[bool] = ContextVar("pyro_vae_compiled_evaluation", default=False)


@contextmanager
def compiled_evaluation() -> Iterator[None]:
    """Within this block, log-densities that need no gradient use the compiled kernels."""
    token = _in_evaluation.set(True)
    try:
        yield
    finally:
        _in_evaluation.reset(token)


def bernoulli_log_prob_sum(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """sum_d log Bernoulli(value_d; sigmoid(logits_d)) over the last dim, for binary ``value``.

    Shapes broadcast as in ``logits * value``. Compiled inside
    :func:`compiled_evaluation` when no gradient is needed, the eager
    softplus otherwise.
    """
    if _in_evaluation.get() and not (torch.is_grad_enabled() and logits.requires_grad):
        return _bernoulli_log_prob_sum_op(logits, value)
    return _softplus_sum(logits, value)
