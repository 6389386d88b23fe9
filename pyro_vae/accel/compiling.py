"""``torch.compile`` with a way out: where the compiler cannot run, the eager code runs instead."""

from __future__ import annotations

import warnings

import torch

from ..checks import named_error


class CompiledOnce:
    """``torch.compile(fn)``, falling back to ``eager`` for good after the first failure to compile.

    A call that fails compiled is run eagerly: where the eager code fails too, the inputs are at fault
    (a shape, memory), not the compiler, and the eager error is raised with the compiled code kept.

    :param what: names the code in the warning, e.g. "the Bernoulli log-density".
    """

    def __init__(self, fn, eager, what: str):
        self.fn, self.eager, self.what = fn, eager, what
        self.compiled, self.failed = None, False

    def __call__(self, *args):
        if self.failed:
            return self.eager(*args)
        try:
            if self.compiled is None:  # compiled on first use: importing TorchDynamo is slow
                self.compiled = torch.compile(self.fn)
            return self.compiled(*args)
        except Exception as err:  # the compiler's errors come from many libraries (C++ toolchain, triton)
            result = self.eager(*args)  # raises where the inputs, not the compiler, are at fault
            self.failed = True
            warn_compiler_failed(err, f"{self.what} falls back to eager PyTorch", stacklevel=4)
            return result


def warn_compiler_failed(err: Exception, fallback: str, stacklevel: int) -> None:
    """Warn that TorchInductor failed with ``err`` and that ``fallback`` happens instead, with the fix."""
    warnings.warn(
        f"Compiling with TorchInductor failed ({named_error(err)}); {fallback}, which gives the "
        "same numbers more slowly. A C++ compiler (e.g. apt install g++) makes it fast.",
        RuntimeWarning,
        stacklevel=stacklevel,
    )
