"""Record one training step, its loss and its gradient, and replay it compiled.

A step of stochastic variational inference computes a loss on a minibatch
(the negative ELBO of Pyro's ``Trace_ELBO``, the IWAE bound, the enumerated
semi-supervised loss) and its gradient with respect to every trainable
parameter of the model. Eagerly, every step pays Pyro's Python (tracing the
model and guide, building the log densities site by site) and PyTorch's
per-operator dispatch, forwards and backwards.

:class:`CompiledStep` records the step once with ``make_fx``
(``torch.fx.experimental.proxy_tensor``) on fake tensors. The module's
parameters and buffers and the step's data are the graph's inputs: while
recording, the module's own tensors are swapped for them
(``torch.nn.utils.stateless``). The loss and its gradient
(``torch.autograd.grad``) are the outputs, so the backward pass is written
down with the forward pass as ATen operations, and TorchInductor
(``torch._inductor.compile``) compiles both as one program, fusing the
elementwise work of the densities and of their derivatives around the
matrix products. With ``fallback_random`` the replay draws with the same ATen
random functions, in the same order, as the eager step: for the same seed it
gives the eager step's loss and gradient up to the rounding of fused kernels
(``tests/test_compiled_step.py``).

Pyro registers module parameters in its param store through ``pyro.module``.
While recording, :class:`ModuleParameters` answers those ``param`` messages
with the swapped-in tensors, so the param store never holds a fake tensor;
Pyro's own reads of tensor values are turned off by
:func:`~pyro_vae.accel.replay.recordable_pyro`.

A recording fixes the shapes and every Python decision of the step.

* **Decisions on tensor values** (``if x.mean() > 0:``) cannot be taken on
  fake tensors. :func:`assume_true` records each as taken (true) and makes
  the condition an output of the graph, a guard: a replay whose guards do
  not all hold is thrown away, its random draws are given back, and the
  caller runs the eager step, which takes the other branch. After
  ``MAX_GUARD_FAILURES`` such steps in a row the recording is dropped.
  Pyro's ``Dice`` takes one for every cost term of an enumerated ELBO, and
  is recorded so that both its branches give the recorded numbers
  (:func:`~pyro_vae.accel.replay.recordable_pyro`): it needs no guard.
* **Values read into Python** (``.item()`` feeding arithmetic) would be
  frozen at their recorded values: such a step is not replayed.
* **Inputs of other shapes** (the last, shorter batch of an epoch) get
  ``None``: the caller runs the eager step, which costs what it always did,
  instead of compiling a graph for a shape that comes once an epoch. So do
  calls with the module in another mode (``train()``/``eval()``) or with
  other parameters trainable than when it was recorded.
* **In-place updates of buffers** (batch normalisation's running
  statistics) of a replay whose guards fail are given back with its random
  draws. A weight shared by two layers is one input of the recording, read
  by both.

A step that cannot be recorded, or a machine where TorchInductor fails,
gets ``None`` from then on, after one warning.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from unittest import mock

import torch
from pyro.poutine.messenger import Messenger
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.utils import stateless

from .replay import DECISIONS_WITHOUT_GUARD, CannotRecord, compile_graph, record_graph


class ModuleParameters(Messenger):
    """Answers ``pyro.param(name, tensor)`` with ``tensor`` itself where it is one of ``tensors``.

    ``pyro.module`` registers each parameter of a module with
    ``pyro.param(name, parameter)``; under this messenger the swapped-in
    tensors of a recording are used as they are and never reach the param store.
    """

    def __init__(self, tensors):
        super().__init__()
        self.ids = {id(tensor) for tensor in tensors}

    def _pyro_param(self, msg):
        if len(msg["args"]) > 1 and id(msg["args"][1]) in self.ids:
            msg["value"], msg["done"] = msg["args"][1], True


#: Replays in a row whose guards fail before a recording is dropped for the eager step.
MAX_GUARD_FAILURES = 5


@contextlib.contextmanager
def assume_true(guards: list[torch.Tensor]) -> Iterator[None]:
    """While recording, ``bool(t)`` of a fake one-element tensor is True, and ``t != 0`` is appended to ``guards``.

    Decisions taken in the code of :data:`~pyro_vae.accel.replay.DECISIONS_WITHOUT_GUARD` get no guard.
    """
    original = torch.Tensor.__bool__

    def assumed(tensor: torch.Tensor) -> bool:
        if not isinstance(tensor, FakeTensor) or tensor.numel() != 1:
            return original(tensor)
        if sys._getframe(1).f_code not in DECISIONS_WITHOUT_GUARD:  # the frame that asked for bool(tensor)
            guards.append((tensor if tensor.dtype == torch.bool else tensor != 0).reshape(()))
        return True

    with mock.patch.object(torch.Tensor, "__bool__", assumed):
        yield


class CompiledStep:
    """``loss_fn(*inputs)`` and its gradient with respect to ``module``'s trainable parameters, compiled.

    Called with the step's inputs, it returns ``(loss, gradients)``, the loss detached and
    the gradients in the order of :attr:`parameters` (None where the loss does
    not depend on one), or None where the caller must run the eager step:
    inputs of another shape than the first call's, or a step that cannot be
    compiled. The first call records and compiles; :attr:`compile_seconds`
    says how long that took. ``loss_fn`` must be a function of its inputs and
    the module alone: Python state it reads is frozen at its first value.
    """

    def __init__(self, loss_fn: Callable[..., torch.Tensor], module: torch.nn.Module):
        self.loss_fn, self.module = loss_fn, module
        named = [(name, parameter) for name, parameter in module.named_parameters() if parameter.requires_grad]
        self.names = [name for name, _ in named]
        #: The trainable parameters, in the order of the gradients (the optimiser's tensors, updated in place).
        self.parameters = [parameter for _, parameter in named]
        self.buffer_names = [name for name, _ in module.named_buffers()]
        self.compiled: Callable | None = None
        self.signature: list | None = None
        self.failed = False
        self.compile_seconds = 0.0
        self._used: list[bool] = []
        self._guarded = False
        self._guard_failures = 0

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]] | None:
        if self.failed:
            return None
        signature = [(tensor.shape, tensor.dtype, tensor.device) for tensor in inputs]
        # the recording's mode (dropout, batch statistics) and trainable set: another one steps eagerly
        signature.append((self.module.training, tuple(p.requires_grad for p in self.module.parameters())))
        if self.compiled is None:
            started = time.perf_counter()
            self.compiled = self._compile(inputs)
            self.compile_seconds = time.perf_counter() - started
            if self.compiled is None:
                self.failed = True
                return None
            self.signature = signature
        if signature != self.signature:
            return None
        generators = self._random_states(inputs) if self._guarded else None
        buffers = [buffer.clone() for buffer in self.module.buffers()] if self._guarded else None
        outputs = list(self.compiled(*self._state(), *inputs))
        if self._guarded and not outputs.pop().item():  # the eager step runs instead, from the same state
            self._restore_random_states(generators)
            for buffer, before in zip(self.module.buffers(), buffers, strict=True):
                buffer.copy_(before)  # a running statistic the replay updated in place
            self._guard_failures += 1
            if self._guard_failures >= MAX_GUARD_FAILURES:
                self.failed = True
                warnings.warn(
                    f"The recording of the training step took a branch that {MAX_GUARD_FAILURES} steps in a row did "
                    "not take; it runs eagerly from now on.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return None
        self._guard_failures = 0
        outputs = iter(outputs)
        loss = next(outputs)
        return loss, [next(outputs) if used else None for used in self._used]

    def state_dict(self) -> dict:
        """What a resumed run needs to step as the uninterrupted one: a recording dropped for the eager step,
        and the failed guards in a row (the recording itself is made again)."""
        return {"failed": self.failed, "guard_failures": self._guard_failures}

    def load_state_dict(self, state: dict) -> None:
        self.failed, self._guard_failures = bool(state["failed"]), int(state["guard_failures"])

    @staticmethod
    def _random_states(inputs) -> list:
        """The CPU generator's state, and that of the GPU the inputs are on (a step's draws come from both)."""
        states = [torch.get_rng_state()]
        device = next((tensor.device for tensor in inputs if tensor.is_cuda), None)
        if device is not None:
            states.append((device, torch.cuda.get_rng_state(device)))
        return states

    @staticmethod
    def _restore_random_states(states: list) -> None:
        torch.set_rng_state(states[0])
        for device, state in states[1:]:
            torch.cuda.set_rng_state(state, device)

    def _state(self) -> list[torch.Tensor]:
        buffers = dict(self.module.named_buffers())
        return [parameter.detach() for parameter in self.parameters] + [buffers[name] for name in self.buffer_names]

    def _step(self, state: list[torch.Tensor], *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The eager step as a function of the module's tensors: loss, the gradients that exist, and any guard."""
        parameters = state[: len(self.names)]
        tensors = dict(zip(self.names + self.buffer_names, state, strict=True))
        guards: list[torch.Tensor] = []
        tied = stateless._reparametrize_module(self.module, tensors, tie_weights=True)  # a shared weight: every use
        trainable = [
            tensor for tensor, parameter in zip(parameters, self.parameters, strict=True) if parameter.requires_grad
        ]
        with tied, ModuleParameters(parameters), assume_true(guards):
            loss = self.loss_fn(*inputs)
            found = iter(torch.autograd.grad(loss, trainable, allow_unused=True))
        gradients = [next(found) if parameter.requires_grad else None for parameter in self.parameters]  # frozen: none
        self._used = [gradient is not None for gradient in gradients]
        self._guarded = bool(guards)
        held = (torch.stack(guards).all(),) if guards else ()
        return (loss.detach(), *(gradient for gradient in gradients if gradient is not None), *held)

    def _compile(self, inputs: tuple[torch.Tensor, ...]) -> Callable | None:
        state = self._state()  # detached: the recording's own leaves, trainable as the parameters are now
        trainable = [parameter.requires_grad for parameter in self.parameters]
        parameters = zip(state[: len(self.names)], trainable, strict=True)
        state[: len(self.names)] = [tensor.requires_grad_(grad) for tensor, grad in parameters]
        try:
            graph = record_graph(self._step, state, *inputs)
        except CannotRecord as why:
            return self._cannot_record(str(why))
        example = [tensor.detach() for tensor in state] + list(inputs)
        return compile_graph(graph, example, "the training step runs eagerly", stacklevel=4)

    def _cannot_record(self, why: str) -> None:
        warnings.warn(
            f"The training step cannot be recorded for compiling ({why}); it runs eagerly, "
            "with the same numbers, more slowly. Pass compile=False (pyro-vae train --compile off) to silence this.",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
