"""Record one particle pass of a Pyro model and guide, and replay it compiled.

:func:`~pyro_vae.infer.importance.log_marginal_likelihood` runs one program many
times: trace the guide with a plate of particles, replay the model on the
draws, read off every site's log density. At K = 5000 that is many passes
per batch that differ only in their random draws. Eagerly, each pass pays for
Pyro's Python again, and the Gaussian log densities run as dozens of small
ATen calls one after another.

:func:`record` runs the pass once on fake tensors under ``make_fx``
(``torch.fx.experimental.proxy_tensor``), which writes down every ATen
operation the program performs, the random draws included, as an FX graph.
The graph is already ATen, so it goes to TorchInductor directly
(``torch._inductor.compile``, without TorchDynamo) with two options:

* ``fallback_random``: a replay draws with the same ATen random functions, in
  the same order, as the eager pass. For the same seed it gives the eager
  pass's numbers, up to the float rounding of the fused kernels.
* ``freezing``: the parameters the pass reads are constants for the length of
  one evaluation, so Inductor folds them in. On CPU a ``Linear`` layer then
  runs as MKL's GEMM on weights packed once (``mkl._mkl_linear``) with its
  bias and activation fused into the next kernel, instead of copying the bias
  into every output before each product.

Custom operators that run compiled code eagerly (the Bernoulli density of
:mod:`pyro_vae.accel.bernoulli`) enter the recording as their plain PyTorch definitions,
listed in :data:`DECOMPOSITIONS`, so that Inductor fuses them with their
neighbours: the decoder's output bias is added inside the density's reduction.

A recording fixes the shapes (one graph per batch and particle shape) and
every Python decision the program took. A decision on tensor values
(``if z.sum() > 0``, ``.item()``) cannot be taken on fake tensors:
:func:`record` returns None and the caller runs the pass eagerly. A program
that reads Python state that changes from one call to the next (a counter,
Python's ``random``) would replay the recorded value; evaluate such a program
with ``replay=False``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from unittest import mock

import pyro
import pyro.infer.trace_elbo
import pyro.infer.trace_mean_field_elbo
import pyro.infer.traceenum_elbo
import pyro.infer.util
import torch
import torch.utils._pytree as pytree

from ..checks import named_error
from .compiling import warn_compiler_failed

logger = logging.getLogger(__name__)

#: Operator -> plain PyTorch function that computes it, substituted while recording.
DECOMPOSITIONS: dict[torch._ops.OpOverload, Callable] = {}


def softplus(x: torch.Tensor, beta: float = 1.0, threshold: float = 20.0) -> torch.Tensor:
    """softplus(x) = log(1 + exp(b x)) / b = (relu(b x) + log(1 + exp(-abs(b x)))) / b with b = ``beta``.

    x itself where b x exceeds ``threshold``, as in ``torch.nn.functional.softplus``.

    TorchInductor writes softplus with ``log1p``, which its CPU kernels
    evaluate one element at a time (benchmarks/RESULTS.md). ``log(1 + u)``
    for u = exp(-abs(b x)) in (0, 1] vectorises; rounding 1 + u costs at most
    one float32 ulp of the result (about 6e-8 absolute), against 6e-8
    relative for ``log1p``: at most about 5e-5 nats over a 784-pixel image.
    """
    bx = x * beta
    return torch.where(bx > threshold, x, (bx.clamp(min=0) + (torch.exp(-bx.abs()) + 1).log()) / beta)


def softplus_backward(grad: torch.Tensor, x: torch.Tensor, beta: float = 1.0, threshold: float = 20.0) -> torch.Tensor:
    """The derivative of :func:`softplus`, sigmoid(beta x) (1 past threshold), times ``grad``."""
    bx = x * beta
    return torch.where(bx > threshold, grad, grad * torch.sigmoid(bx))


DECOMPOSITIONS[torch.ops.aten.softplus.default] = softplus
DECOMPOSITIONS[torch.ops.aten.softplus_backward.default] = softplus_backward


def _expected_cost(prob: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """Dice's ``_fulldot(prob, cost)``, the sum of prob * cost, over the terms of nonzero probability only.

    Both factors are zeroed outside them, not their product, so that an infinite cost there gives neither
    a NaN value nor a NaN gradient (0 * inf), as with Dice's ``masked_select``.
    """
    kept = prob > 0
    return (torch.where(kept, prob, 0) * torch.where(kept, cost, 0)).sum()


#: Code whose decisions on tensor values a recording may take as true without a guard (see :func:`recordable_pyro`).
DECISIONS_WITHOUT_GUARD = {pyro.infer.util.Dice.compute_expectation.__code__}


def _value_of(x):
    """``torch_item`` for a recording: the value as a tensor cut from the graph of gradients, not a Python float."""
    return x.detach() if isinstance(x, torch.Tensor) else x


@contextlib.contextmanager
def recordable_pyro() -> Iterator[None]:
    """Pyro with its reads of tensor values turned off, so that make_fx can record its ELBOs on fake tensors.

    * Validation is off: its support and argument checks take decisions on tensor values.
    * ``warn_if_nan`` in the ELBO modules is the identity: it tests the loss for NaN in Python (the training
      engine tests the loss itself) and hooks the gradient to test it again.
    * ``torch_item`` in ``Trace_ELBO`` and ``TraceMeanField_ELBO`` returns the value as a detached tensor:
      they add the loss's value, read as a float, to a surrogate whose value they cancel
      (``loss + (surrogate - item(surrogate))``) so that the result has the loss's value and the surrogate's
      gradient. A detached tensor keeps both, without leaving the graph.
    * ``Dice.compute_expectation`` (``TraceEnum_ELBO``) sums ``prob * cost`` over each cost term's enumerated
      values. Where some probability is zero (the values of y that the semi-supervised objective drops as
      negligible, whose costs -log q(y|x) are infinite, or probabilities that underflow float32), it first
      drops those terms with ``masked_select``, so that 0 * inf cannot make the loss NaN;
      the selection's shape depends on values, which a recording cannot have. Recorded, the sum is
      taken over the same terms with ``where`` (:func:`_expected_cost`), which has both branches' value and
      gradient for any probabilities, so the decision ``(prob > 0).all()`` is taken as true without a guard
      (:data:`DECISIONS_WITHOUT_GUARD`).
    """
    identity = lambda value, *args, **kwargs: value  # noqa: E731
    with contextlib.ExitStack() as stack:
        stack.enter_context(pyro.validation_enabled(False))
        for module in (pyro.infer.trace_elbo, pyro.infer.trace_mean_field_elbo, pyro.infer.traceenum_elbo):
            stack.enter_context(mock.patch.object(module, "warn_if_nan", identity))
        for module in (pyro.infer.trace_elbo, pyro.infer.trace_mean_field_elbo):
            stack.enter_context(mock.patch.object(module, "torch_item", _value_of))
        stack.enter_context(mock.patch.object(pyro.infer.util, "_fulldot", _expected_cost))
        yield


def reads_tensor_values(graph: torch.fx.GraphModule) -> bool:
    """Whether a recorded graph turns a tensor into a Python number (``.item()``), which a replay cannot redo."""
    return any(node.target is torch.ops.aten._local_scalar_dense.default for node in graph.graph.nodes)


class CannotRecord(Exception):
    """A program that cannot be recorded as a graph; the message says why."""


def record_graph(fn: Callable, *args) -> torch.fx.GraphModule:
    """Every ATen operation of ``fn(*args)``, the random draws included, as an FX graph.

    Recorded by ``make_fx`` on fake tensors under :func:`recordable_pyro`, with
    :data:`DECOMPOSITIONS`. Raises :class:`CannotRecord` where the program
    cannot be recorded: Python that fake tensors cannot run (decisions on
    tensor values, operations without a fake kernel), or a ``.item()`` whose
    number a replay could not recompute.
    """
    import torch._inductor  # noqa: F401  imported here, when first needed: importing TorchInductor is slow
    from torch.fx.experimental.proxy_tensor import make_fx

    try:
        with recordable_pyro():
            graph = make_fx(fn, decomposition_table=DECOMPOSITIONS, tracing_mode="fake", _allow_non_fake_inputs=True)(
                *args
            )
    except Exception as err:  # what fake tensors cannot run: data-dependent Python, ops without a fake kernel
        raise CannotRecord(named_error(err)) from err
    if reads_tensor_values(graph):
        raise CannotRecord("it reads a tensor's value in Python, e.g. with .item()")
    return graph


def compile_graph(graph: torch.fx.GraphModule, example: list, fallback: str, stacklevel: int, **options):
    """``graph`` compiled by TorchInductor for inputs like ``example``, or None after a warning that ``fallback``.

    Random draws stay those of eager PyTorch (``fallback_random``), so that a
    replay draws what the eager program draws from the same RNG state.
    """
    import torch._inductor  # imported here, when first needed: importing TorchInductor is slow

    try:
        return torch._inductor.compile(graph, example, options={"fallback_random": True, **options})
    except Exception as err:  # the compiler's errors come from many libraries (C++ toolchain, MKL, triton)
        warn_compiler_failed(err, fallback, stacklevel=stacklevel + 1)
        return None


def record(fn: Callable, *inputs: torch.Tensor) -> Callable | None:
    """``fn(*inputs)`` as a compiled graph that replays it for new inputs of the same shapes, or None.

    ``fn`` returns any nesting of tuples, lists and dicts of tensors; the
    replay returns the same structure. Tensors other than ``inputs`` that
    ``fn`` reads (parameters, closed-over tensors) enter the graph as
    constants, frozen at their values now. The replay computes no gradients.
    Pyro records under :func:`recordable_pyro`.
    """
    structure = []

    def flat_fn(*args):
        leaves, spec = pytree.tree_flatten(fn(*args))
        structure.append(spec)
        return tuple(leaves)

    try:
        graph = record_graph(flat_fn, *inputs)
    except CannotRecord as why:
        logger.info("The pass cannot be recorded (%s); it runs eagerly.", why)
        return None
    with torch.no_grad():
        compiled = compile_graph(graph, list(inputs), "the evaluation passes run eagerly", stacklevel=3, freezing=True)
    if compiled is None:
        return None

    def replay(*args: torch.Tensor):
        with torch.no_grad():
            return pytree.tree_unflatten(list(compiled(*args)), structure[0])

    return replay
