"""The Bernoulli log-density of a whole image in one compiled pass, for the log p(x) evaluators.

:func:`binary_bernoulli_log_prob` computes the log-density of
:class:`~pyro_vae.components.likelihoods.BinaryBernoulli` as one pass over
the logits compiled by TorchInductor, with one exp per pixel and one log per
group of up to 112 pixels. For x in {0, 1} and t_d = (2 x_d - 1) l_d::

    sum_d log Bernoulli(x_d; sigmoid(l_d)) = sum_d log sigmoid(t_d)
        = sum_d min(t_d, 0) - sum_groups log prod_{d in group} (1 + exp(-|t_d|)).

Each factor lies in (1, 2], so a product of 112 stays below 2^112, short of
float32's overflow at 2^128. A product of 112 factors carries a relative
rounding error of at most about 112 float32 epsilons (7e-6), so the sum
differs from the softplus form by at most about 5e-5 nats per 784-pixel
image (7 groups), against a Monte Carlo standard error of log p(x) near 0.2
nats.

Its derivative in the logits, x_d - sigmoid(l_d) times the incoming
gradient, is a second compiled pass (AIS's leapfrog steps need it in z);
higher derivatives are not defined.

The compiled sum is the custom operator ``torch.ops.pyro_vae.bernoulli_log_prob_sum``.
Eagerly it is one opaque call to the compiled kernel; a graph recorded by
:mod:`pyro_vae.accel.replay` takes in its definition instead
(:data:`~pyro_vae.accel.replay.DECOMPOSITIONS`), so that Inductor compiles it
together with the decoder's last layer.

The likelihood itself stays plain PyTorch: the evaluators (importance
sampling and AIS) install this kernel by passing :func:`log_density_kernels`
to :func:`~pyro_vae.infer.densities.site_log_densities`, for evaluations of at
least :data:`MIN_COMPILED_ELEMENTS` pixel log-densities: compiling takes
seconds, so a smaller evaluation (a smoke test's, a short run's validation)
keeps the eager form. The choice depends on the evaluation's size alone, so a
resumed run evaluates as the uninterrupted one did. Where ``torch.compile``
cannot run (no C++ compiler, say) the eager form is used after one warning.
Measurements: docs/evaluation.md and benchmarks/RESULTS.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..components.likelihoods import BinaryBernoulli, bernoulli_log_prob_sum
from .compiling import CompiledOnce
from .replay import DECOMPOSITIONS

MAX_GROUP = 112  # pixels per product: each factor is at most 2 and 2^112 < 2^128, float32's overflow
LANES = 16  # float32 lanes of an AVX-512 register: groups are whole vectors


def group_size(size: int) -> int:
    """Pixels per product for ``size`` pixels: about equal groups of at most MAX_GROUP, a multiple of LANES."""
    groups = -(-size // MAX_GROUP)
    return min(MAX_GROUP, LANES * -(-size // (groups * LANES)))


def grouped_log_sigmoid_sum(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """sum_d log sigmoid(t_d), t = (2 value - 1) logits, over the last dim, with one log per group of pixels.

    The pixels are padded to whole groups with t = +inf, whose terms min(t, 0) and log(1 + exp(-t)) are
    exactly 0. Both sums reduce over the same (group, pixel) loops, so TorchInductor reads the logits once.
    """
    t = (2 * value - 1) * logits
    size = group_size(t.shape[-1])
    t = F.pad(t, (0, -t.shape[-1] % size), value=torch.inf).unflatten(-1, (-1, size))
    log_normaliser = (torch.exp(-t.abs()) + 1).prod(-1).log()
    return (t.clamp(max=0).sum(-1) - log_normaliser).sum(-1)


_compiled_log_sigmoid_sum = CompiledOnce(grouped_log_sigmoid_sum, bernoulli_log_prob_sum, "the Bernoulli log-density")


@torch.library.custom_op("pyro_vae::bernoulli_log_prob_sum", mutates_args=())
def compiled_bernoulli_log_prob_sum(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """sum_d log Bernoulli(value_d; sigmoid(logits_d)) over the last dim for binary ``value``, compiled."""
    return _compiled_log_sigmoid_sum(logits, value)


@compiled_bernoulli_log_prob_sum.register_fake
def _(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return logits.new_empty(torch.broadcast_shapes(logits.shape, value.shape)[:-1])


def log_prob_sum_gradient(grad: torch.Tensor, logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """d/dl_d of sum_d log Bernoulli(x_d; sigmoid(l_d)) = x_d - sigmoid(l_d), times the incoming gradient."""
    return (grad.unsqueeze(-1) * (value - torch.sigmoid(logits))).sum_to_size(logits.shape)


_compiled_gradient = CompiledOnce(log_prob_sum_gradient, log_prob_sum_gradient, "the Bernoulli log-density's gradient")


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    logits, value = ctx.saved_tensors
    return _compiled_gradient(grad, logits, value) if ctx.needs_input_grad[0] else None, None


compiled_bernoulli_log_prob_sum.register_autograd(_backward, setup_context=_save_inputs)
DECOMPOSITIONS[torch.ops.pyro_vae.bernoulli_log_prob_sum.default] = grouped_log_sigmoid_sum


def binary_bernoulli_log_prob(fn: BinaryBernoulli, value: torch.Tensor) -> torch.Tensor:
    """``fn.log_prob(value)`` through the compiled kernels (first derivatives in the logits only)."""
    return compiled_bernoulli_log_prob_sum(*fn.flat_logits_and_value(value))


#: Distribution type -> faster ``log_prob(fn, value)`` for the evaluators: importance sampling (no gradient)
#: and AIS (the gradient in the latent values).
LOG_DENSITY_KERNELS = {BinaryBernoulli: binary_bernoulli_log_prob}

#: Data elements x evaluations of the densities below which an evaluator keeps the eager log-densities.
#: Compiling the kernel takes seconds, and an evaluation this small spends well under a second in the eager
#: form (benchmarks/RESULTS.md, "The Bernoulli kernel's threshold"); so a repeated small evaluation (a
#: validation each epoch) loses little by staying eager, and a one-off one starts at once.
MIN_COMPILED_ELEMENTS = 2**24


def log_density_kernels(elements: int) -> dict:
    """:data:`LOG_DENSITY_KERNELS` for an evaluation of at least :data:`MIN_COMPILED_ELEMENTS` data elements
    times density evaluations (``x.numel() * K`` for importance sampling), else none: eager PyTorch."""
    return LOG_DENSITY_KERNELS if elements >= MIN_COMPILED_ELEMENTS else {}
