"""Training speed: ``pv.fit`` against hand-written PyTorch loops of the same VAE, and compiled steps against eager ones.

    python benchmarks/train_speed.py [--batch-sizes 128 512] [--repeats 3] [--steps 30] [--m2-run RUN]
    python benchmarks/train_speed.py --profile 100     # what 100 steady-state steps of fit are made of
    python benchmarks/train_speed.py --matmul-precision medium   # every contender's products in bfloat16

**Epochs** (784-400-20 Bernoulli MLP VAE, the same ``MLPEncoder`` and
``MLPDecoder`` modules, the embedded MNIST dynamically binarised, Adam 1e-3,
one epoch of the 50,000 training points), interleaved (a seeded shuffle of the order every repeat),
the median of the repeats:

* **plain**: a hand-written eager PyTorch loop, the reference. No Pyro: the
  reparameterised draw, the closed-form KL and
  ``binary_cross_entropy_with_logits`` written out, with
  ``torch.optim.Adam(params, lr)`` as such loops are usually written;
* **plain, fused Adam**: the same loop with ``Adam(..., fused=True)``;
* **plain, torch.compile**: the same loop with its loss and backward under
  ``torch.compile`` and fused Adam, as a user could write it;
* **fit**: ``pv.fit`` with its compiled step (``compile=True``), whose model
  and guide are ordinary Pyro programs under ``Trace_ELBO``;
* **fit, eager**: ``pv.fit(compile=False)``, the engine before the compiled step.

``fit``'s epochs are steady-state: each call trains two epochs and the
second is timed (``history[2]["seconds"]``, without validation); the first,
which records and compiles, is reported apart as the compile time. The
plain loops' first epoch pays no compilation except under torch.compile,
whose warm-up epoch is also excluded.

**The matmul bound** of an epoch is the time of its matrix products alone:
the four forward products and the seven backward ones of every step, run
back to back on tensors of the same shapes.

**Binarising a batch** of the training images, first: ``torch.bernoulli``
as the plain loops draw, one float uniform per pixel below its intensity
as a boolean made float, and ``pyro_vae.data.binarize`` (the same uniforms,
compared into floats), medians of 200.

**Steps** (``--steps`` timed steps after warm-up, interleaved, medians):
the enumerated M2 step (``pv.SSVAE``, z 50, hidden 500, batch 200, 100
labels) and the IWAE k = 50 step (the VAE above, batch 128, the standard
gradient and DReG), each compiled against the same step eager, through
``take_step``, and against the eager step with every term of negligible
weight kept (``pyro_vae.infer.densities.negligible_shares`` answering no
everywhere), as the objectives were before they left them out: the float32
subnormals of those terms slow the backward products. ``--m2-run RUN``
times the M2 step from a run's last checkpoint instead of a fresh model (its
label count from the run's config): a trained q(y | x) is confident, and
its negligible values of y are what the cut-off drops. **Its products
alone**: every matrix product of one eager step (``aten::mm``, ``addmm``,
``bmm``, ``baddbmm``, forwards and backwards, recorded by a
``TorchDispatchMode`` with their very operands: shapes, layouts and values),
run again back to back, interleaved with the steps; no step that
computes its gradient with these products can take less.

**Profile** (``--profile N``): the time of a steady-state step of ``pv.fit``
at the first batch size (the second of two epochs of N steps), and
``torch.profiler``'s table of N such steps through ``take_step``, the step
without the engine's loop, the operators by their own time.

**Precision** (``--matmul-precision``, default ``highest``): every
contender's float32 products at that precision of
:func:`torch.set_float32_matmul_precision`, ``fit`` through its own
``matmul_precision``, so that the comparisons stay like for like.

The machine is shared and noisy: only the ratios within one run mean something.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import time
from collections.abc import Callable
from unittest import mock

import pyro
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import pyro_vae as pv
from pyro_vae.cli import positive_int
from pyro_vae.components.nets import MLPDecoder, MLPEncoder
from pyro_vae.data import binarize
from pyro_vae.infer import build_objective
from pyro_vae.training.engine import adam, compiled_step, take_step
from pyro_vae.training.precision import MATMUL_PRECISIONS, float32_matmul_precision

Z_DIM, HIDDEN, LR = 20, (400,), 1e-3
#: The embedded MNIST's training points, after the 10,000 of its validation split.
TRAINING_POINTS = 50_000


def plain_loss(encoder, decoder, x):
    loc, scale = encoder(x)
    z = loc + scale * torch.randn_like(loc)
    logits = decoder(z).squeeze(1)
    reconstruction = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    return reconstruction + 0.5 * (loc**2 + scale**2 - 2 * scale.log() - 1).sum()


def plain_epoch(data: pv.Dataset, batch_size: int, fused: bool = False, compiled: bool = False) -> float:
    """One epoch (two under torch.compile, the first to compile) of a hand-written PyTorch loop; its seconds."""
    encoder, decoder = MLPEncoder(data.x_shape, Z_DIM, HIDDEN), MLPDecoder(Z_DIM, data.x_shape, HIDDEN)
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=LR, fused=fused or compiled)

    def loss_and_backward(x):
        loss = plain_loss(encoder, decoder, x)
        loss.backward()
        return loss

    step = torch.compile(loss_and_backward) if compiled else loss_and_backward
    x_train = data.train.x
    for _epoch in range(2 if compiled else 1):
        started = time.perf_counter()
        order = torch.randperm(x_train.shape[0])
        for start in range(0, x_train.shape[0], batch_size):
            x = torch.bernoulli(x_train[order[start : start + batch_size]])
            optimizer.zero_grad(set_to_none=True)
            step(x)
            optimizer.step()
    return time.perf_counter() - started


def fit_epoch(data: pv.Dataset, batch_size: int, compile: bool = True) -> tuple[float, float]:
    """The second epoch of ``pv.fit`` and the first epoch's compile seconds, at the caller's matmul precision."""
    vae = pv.VAE(data.x_shape, Z_DIM, hidden=HIDDEN)
    history = pv.fit(vae, data, epochs=2, batch_size=batch_size, lr=LR, progress=False, compile=compile,
                     matmul_precision=torch.get_float32_matmul_precision())  # fmt: skip
    return history[2]["seconds"], history[1].get("compile_seconds", 0.0)


def matmul_bound_epoch(num_points: int, batch_size: int) -> float:
    """Seconds of an epoch's matrix products alone, forward and backward, for the 784-400-20 VAE."""
    sizes = [(784, 400), (400, 2 * Z_DIM), (Z_DIM, 400), (400, 784)]  # encoder, its head, decoder, its output
    weights = [torch.randn(n_out, n_in) for n_in, n_out in sizes]
    batches = [min(batch_size, num_points - start) for start in range(0, num_points, batch_size)]
    operands = {b: [(torch.randn(b, n_in), torch.randn(b, n_out)) for n_in, n_out in sizes] for b in set(batches)}
    started = time.perf_counter()
    for b in batches:
        for i, ((inputs, grad_out), weight) in enumerate(zip(operands[b], weights, strict=True)):
            inputs @ weight.T  # forward
            grad_out.T @ inputs  # gradient of the weight
            if i > 0:  # no gradient flows into the data
                grad_out @ weight
    return time.perf_counter() - started


def binarisation_milliseconds(data: pv.Dataset, batch_size: int, repeats: int = 200) -> dict[str, float]:
    """Median milliseconds to binarise a batch of the training images: the plain loop's way, the float-uniform
    way, and the library's (``pyro_vae.data.binarize``), interleaved."""
    x = data.train.x[:batch_size]
    ways = {
        "torch.bernoulli(x)": lambda: torch.bernoulli(x),
        "(torch.rand_like(x) < x).float()": lambda: (torch.rand_like(x) < x).float(),
        "pyro_vae.data.binarize(x)": lambda: binarize(x),
    }
    times: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(repeats):
        for way, draw in ways.items():
            started = time.perf_counter()
            draw()
            times[way].append(time.perf_counter() - started)
    return {way: 1000 * statistics.median(values) for way, values in times.items()}


@contextlib.contextmanager
def every_term_kept():
    """The objectives as they were before they left out the terms of negligible weight."""
    none_negligible = lambda log_weights, dim=0: torch.zeros_like(log_weights, dtype=torch.bool)  # noqa: E731
    with contextlib.ExitStack() as stack:
        for module in ("iwae", "path_derivatives", "semisupervised"):
            stack.enter_context(mock.patch(f"pyro_vae.infer.{module}.negligible_shares", none_negligible))
        yield


#: The matrix products of a step, as ATen runs them.
PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten.baddbmm.default}  # fmt: skip


class RecordProducts(TorchDispatchMode):
    """Keeps every matrix product that runs under it, forwards and backwards, with its very operands."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in PRODUCTS:
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def recorded_products(step) -> Callable[[], None]:
    """A function that runs the matrix products of one call of ``step()`` again, back to back, on their very
    operands (the same shapes, layouts and values, in the same order)."""
    with RecordProducts() as recorder:
        step()

    def products() -> None:
        for func, args, kwargs in recorder.calls:
            func(*args, **kwargs)

    return products


def time_steps(model, objective_config, data, batch_size: int, steps: int) -> tuple[float, ...]:
    """Median seconds of a compiled step, an eager one, an eager one keeping every term and the eager step's
    products alone (:func:`recorded_products`), interleaved, and the compile seconds."""
    objective = build_objective(objective_config)
    objective.setup(model, data, batch_size=batch_size)
    optimizer = adam(model.parameters(), LR, torch.device("cpu"))
    compiled = compiled_step(model, objective)
    points = objective.training_points(data)
    batches = [points[torch.randint(len(points), (batch_size,))] for _ in range(steps + 4)]
    take_step(model, objective, optimizer, data, batches[0], compiled=compiled)  # records and compiles
    products = recorded_products(lambda: take_step(model, objective, optimizer, data, batches[1]))
    kinds = ("compiled", "eager", "eager, every term", "products alone")
    times = {kind: [] for kind in kinds}
    for i, batch in enumerate(batches[2:]):
        for kind in kinds[i % 4 :] + kinds[: i % 4]:
            started = time.perf_counter()
            if kind == "products alone":
                products()
            else:
                with every_term_kept() if kind == "eager, every term" else contextlib.nullcontext():
                    take_step(
                        model, objective, optimizer, data, batch, compiled=compiled if kind == "compiled" else None
                    )
            if i >= 2:  # warm-up
                times[kind].append(time.perf_counter() - started)
    return (*(statistics.median(times[kind]) for kind in kinds), compiled.compile_seconds)


def m2_case(data, run_dir: str | None):
    """The M2 model to time, and its objective's config: fresh (100 labels), or a run's last checkpoint."""
    if run_dir is None:
        return "enumerated M2 (z 50, hidden 500, batch 200, 100 labels, fresh)", (
            lambda: pv.SSVAE(data.x_shape, 50, hidden=(500,)),
            {"name": "semi-supervised", "num_labels": 100},
            200,
        )
    run = pv.load_run(run_dir, checkpoint="last")
    objective = run.config["train"]["objective"]
    return f"enumerated M2 from {run_dir} (epoch {run.epoch}, {objective['num_labels']} labels)", (
        lambda: run.model.train(),
        objective,
        run.config["train"]["batch_size"],
    )


def profile_fit(data: pv.Dataset, batch_size: int, steps: int) -> None:
    """What a steady-state step of ``pv.fit`` is made of: its time, and ``torch.profiler``'s table of the
    same steps through ``take_step`` (fit's step without the engine's loop), by operator."""
    from torch.profiler import profile

    few = data.subset(train=steps * batch_size, val=batch_size, test=batch_size)
    history = pv.fit(pv.VAE(data.x_shape, Z_DIM, hidden=HIDDEN), few, epochs=2, batch_size=batch_size, lr=LR,
                     progress=False, compile=True, matmul_precision=torch.get_float32_matmul_precision())  # fmt: skip
    model = pv.VAE(data.x_shape, Z_DIM, hidden=HIDDEN)
    objective = build_objective({"name": "trace"})
    objective.setup(model, few, batch_size=batch_size)
    optimizer = adam(model.parameters(), LR, torch.device("cpu"))
    compiled = compiled_step(model, objective)
    batches = [torch.randint(len(few.train), (batch_size,)) for _ in range(steps + 3)]
    for batch in batches[:3]:  # the first records and compiles
        take_step(model, objective, optimizer, few, batch, compiled=compiled)
    started = time.perf_counter()
    with profile() as profiler:
        for batch in batches[3:]:
            take_step(model, objective, optimizer, few, batch, compiled=compiled)
    print(
        f"fit: {1000 * history[2]['seconds'] / steps:.2f} ms a step (its second epoch); take_step under the "
        f"profiler: {1000 * (time.perf_counter() - started) / steps:.2f} ms a step"
    )
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main(batch_sizes: list[int], repeats: int, steps: int, m2_run: str | None, profile: int | None) -> None:
    pyro.set_rng_seed(0)
    data = pv.load_dataset("mnist", binarize="dynamic")
    if profile:
        profile_fit(data, batch_sizes[0], profile)
        return
    contenders = {
        "plain": lambda batch_size: plain_epoch(data, batch_size),
        "plain, fused Adam": lambda batch_size: plain_epoch(data, batch_size, fused=True),
        "plain, torch.compile": lambda batch_size: plain_epoch(data, batch_size, compiled=True),
        "fit": lambda batch_size: fit_epoch(data, batch_size),
        "fit, eager": lambda batch_size: fit_epoch(data, batch_size, compile=False)[0],
        "matmul bound": lambda batch_size: matmul_bound_epoch(len(data.train), batch_size),
    }
    print(
        f"threads: {torch.get_num_threads()}, torch {torch.__version__}, pyro {pyro.__version__}, "
        f"float32 matmul precision {torch.get_float32_matmul_precision()}"
    )
    for batch_size in batch_sizes:
        binarising = binarisation_milliseconds(data, batch_size)
        times = ", ".join(f"{way} {ms:.2f} ms" for way, ms in binarising.items())
        print(f"binarising a batch of {batch_size}: {times}")
    print(
        "| batch | plain | plain, fused Adam | plain, torch.compile | fit | fit, eager | matmul bound "
        "| fit / plain | fit / plain fused | fit / plain compiled | fit / fit eager | fit / matmul bound "
        "| fit's compile |"
    )
    print("|" + "---|" * 13)
    for batch_size in batch_sizes:
        times: dict[str, list] = {name: [] for name in contenders}
        names = list(contenders)
        for repeat in range(repeats):
            # a fresh order every repeat: three rotations of six would keep each contender in one half of the
            # sequence, and its neighbours, through the machine's slower and faster minutes
            for name in random.Random(repeat).sample(names, len(names)):
                times[name].append(contenders[name](batch_size))
        compile_seconds = statistics.median(t[1] for t in times["fit"])
        times["fit"] = [t[0] for t in times["fit"]]
        med = {name: statistics.median(values) for name, values in times.items()}
        fit = med["fit"]
        print(
            f"| {batch_size} | {med['plain']:.2f} s | {med['plain, fused Adam']:.2f} s "
            f"| {med['plain, torch.compile']:.2f} s | {fit:.2f} s | {med['fit, eager']:.2f} s "
            f"| {med['matmul bound']:.2f} s | {fit / med['plain']:.2f} | {fit / med['plain, fused Adam']:.2f} "
            f"| {fit / med['plain, torch.compile']:.2f} | {fit / med['fit, eager']:.2f} "
            f"| {fit / med['matmul bound']:.2f} | {compile_seconds:.1f} s |",
            flush=True,
        )

    print(
        "\n| step | compiled | eager | eager, every term kept | its products alone | compiled / eager "
        "| compiled / every term | compiled / products | eager / products | compile |"
    )
    print("|" + "---|" * 10)
    m2_name, m2 = m2_case(data, m2_run)
    cases = {
        m2_name: m2,
        "IWAE k = 50 (784-400-20, batch 128)": (
            lambda: pv.VAE(data.x_shape, Z_DIM, hidden=HIDDEN),
            {"name": "iwae", "num_particles": 50},
            128,
        ),
        "IWAE k = 50, DReG (784-400-20, batch 128)": (
            lambda: pv.VAE(data.x_shape, Z_DIM, hidden=HIDDEN),
            {"name": "iwae", "num_particles": 50, "gradient": "dreg"},
            128,
        ),
    }
    for name, (build, config, batch_size) in cases.items():
        pyro.clear_param_store()
        compiled, eager, every_term, products, compile_seconds = time_steps(build(), config, data, batch_size, steps)
        print(
            f"| {name} | {1000 * compiled:.1f} ms | {1000 * eager:.1f} ms | {1000 * every_term:.1f} ms "
            f"| {1000 * products:.1f} ms | {compiled / eager:.2f} | {compiled / every_term:.2f} "
            f"| {compiled / products:.2f} | {eager / products:.2f} | {compile_seconds:.1f} s |",
            flush=True,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[128, 512])
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument(
        "--steps", type=positive_int, default=30, help="timed steps of each kind in the step comparison"
    )
    parser.add_argument("--m2-run", help="time the M2 step from this run's last checkpoint, not a fresh model")
    parser.add_argument(
        "--profile",
        type=positive_int,
        help="profile this many steady-state steps of fit instead, at one batch size (128, or one --batch-sizes)",
    )
    parser.add_argument(
        "--matmul-precision",
        choices=MATMUL_PRECISIONS,
        default="highest",
        help="torch's float32 matmul precision for every contender (fit's matmul_precision)",
    )
    args = parser.parse_args()
    given = sorted({arg.split("=")[0] for arg in sys.argv[1:]} & {"--repeats", "--steps", "--m2-run"})
    if args.profile and given:
        verb = "does" if len(given) == 1 else "do"
        parser.error(f"--profile times fit's steps alone; {', '.join(given)} {verb} not apply to it.")
    if args.profile and len(args.batch_sizes) > 1 and "--batch-sizes" in sys.argv:
        parser.error("--profile profiles one batch size; give one --batch-sizes value.")
    if args.profile and args.profile > (most := TRAINING_POINTS // args.batch_sizes[0]):
        parser.error(f"--profile {args.profile}: one epoch of the {TRAINING_POINTS:,} training points holds "
                     f"{most} steps of {args.batch_sizes[0]}; give at most that.")  # fmt: skip
    if args.m2_run:  # checked now, not after the minutes of the epoch benchmarks
        if not pv.RunDirectory(args.m2_run).holds_run():
            parser.error(f"--m2-run {args.m2_run} holds no trained run; give a pyro-vae train run of M2.")
        config = pv.RunDirectory(args.m2_run).read_config()
        if config["model"].get("type") != "ssvae":
            parser.error(f"--m2-run {args.m2_run} is not an M2 run; give one of pyro-vae train --semi-supervised.")
        if config["model"]["x_shape"] != [1, 28, 28]:  # timed on the embedded MNIST
            parser.error(f"--m2-run {args.m2_run} models points of shape {config['model']['x_shape']}; give an M2 "
                         "run on MNIST (shape [1, 28, 28]).")  # fmt: skip
    precision = vars(args).pop("matmul_precision")
    with float32_matmul_precision(precision):
        main(**vars(args))
