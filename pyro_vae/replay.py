"""Record one particle pass of a Pyro model and guide, and replay it compiled.

:func:`~pyro_vae.marginal.log_marginal_likelihood` runs one program many
times: trace the guide with a plate of particles, replay the model on the
draws, read off every site's log density. At K = 5000 that is about a hundred
passes per batch that differ only in their random draws. Eagerly, each pass
pays about a millisecond of Pyro's Python, and the Gaussian log densities
run as dozens of small ATen calls one after another.

:func:`record` runs the pass once on fake tensors under ``make_fx``
(``torch.fx.experimental.proxy_tensor``), which writes down every ATen
operation the program performs, the random draws included, as an FX graph.
TorchInductor compiles the graph with ``fallback_random=True``: a replay
draws with the same ATen random functions, in the same order, as the eager
pass. For the same seed it gives the eager pass's numbers, up to the float
rounding of the fused kernels.

A recording fixes the shapes (one graph per batch and particle shape) and
every Python decision the program took. A decision on tensor values
(``if z.sum() > 0``, ``.item()``) cannot be taken on fake tensors:
:func:`record` returns None and the caller runs the pass eagerly. A program
that reads Python state that changes from one call to the next (a counter,
Python's ``random``) would replay the recorded value; evaluate such a program
with ``replay=False``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pyro
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from .compiling import CompiledOnce

logger = logging.getLogger(__name__)


def record(fn: Callable, *inputs: torch.Tensor) -> Callable | None:
    """``fn(*inputs)`` as a compiled graph that replays it for new inputs of the same shapes, or None.

    Tensors other than ``inputs`` that ``fn`` reads (parameters, closed-over
    tensors) enter the graph as constants. Pyro's validation is off while
    recording: its support checks take decisions on tensor values.
    """
    try:
        with pyro.validation_enabled(False):
            graph = make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)(*inputs)
    except Exception as err:  # what fake tensors cannot run: data-dependent Python, ops without a fake kernel
        logger.info("The pass cannot be recorded (%s: %s); it runs eagerly.", type(err).__name__, err)
        return None
    return CompiledOnce(graph, graph, "the recorded evaluation pass", options={"fallback_random": True})
