"""The precision of float32 matrix products while training.

Training's matrix products may run with inputs rounded to fewer mantissa
bits, and float32 accumulation, where the hardware does that faster: PyTorch's
:func:`torch.set_float32_matmul_precision`, whose names are kept here.

* ``"highest"`` (the default): float32 products;
* ``"high"``: TensorFloat-32 inputs (10 stored mantissa bits) where the
  hardware has them (NVIDIA Ampere and later GPUs); elsewhere as ``"highest"``;
* ``"medium"``: bfloat16 inputs (7 stored mantissa bits) and float32 sums
  where a fast bfloat16 product exists (oneDNN on CPUs with AVX-512 BF16 or
  AMX); elsewhere as ``"high"`` (on NVIDIA GPUs, TensorFloat-32).

Parameters, gradients, densities and Adam's state stay float32: only the
products' inputs are rounded, by up to 2^-8 relatively at ``"medium"``: a
milder form of the trade that mixed-precision training makes (Micikevicius
et al. 2018, *Mixed Precision Training*; Kalamkar et al. 2019, *A Study of
BFLOAT16 for Deep Learning Training*). :func:`~pyro_vae.training.engine.fit` uses the
precision for the optimisation alone, the objective's start and every
epoch's steps, and the caller's setting for validation and evaluation, so
that a log p(x) or a certificate is computed as it always is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: The precisions of :func:`torch.set_float32_matmul_precision`, the most exact first.
MATMUL_PRECISIONS = ("highest", "high", "medium")


def precision_conflict(precision: str) -> str | None:
    """Why a run trained at ``precision`` cannot join a study whose runs all train in float32 (None where it can)."""
    if precision != "highest":
        return f"was trained with --matmul-precision {precision}; the study trains in float32 (highest)"
    return None


def per_backend_settings() -> list:
    """The backends' own float32 matmul settings that :func:`torch.set_float32_matmul_precision` writes
    (``torch.backends.mkldnn.matmul`` and ``torch.backends.cuda.matmul``, each with ``fp32_precision``), where
    this torch has them (recent releases); an empty list before."""
    backends = (getattr(torch.backends.mkldnn, "matmul", None), getattr(torch.backends.cuda, "matmul", None))
    return [backend for backend in backends if hasattr(backend, "fp32_precision")]


@contextlib.contextmanager
def float32_matmul_precision(precision: str) -> Iterator[None]:
    """Run the block with torch's float32 matmul precision set to ``precision``; the caller's settings after it.

    Both of torch's records are restored: the one precision of :func:`torch.get_float32_matmul_precision`,
    and each backend's own setting where torch has them. A caller who set the backends apart
    (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``, say) has no one precision to read back (torch
    raises), and gets the backends' settings back as they were.
    """
    backends = per_backend_settings()
    settings = [backend.fp32_precision for backend in backends]
    try:
        callers = torch.get_float32_matmul_precision()
    except RuntimeError:  # the backends were set apart
        callers = None
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        if callers is not None:
            torch.set_float32_matmul_precision(callers)
        for backend, setting in zip(backends, settings, strict=True):
            backend.fp32_precision = setting
