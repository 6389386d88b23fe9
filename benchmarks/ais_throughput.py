"""AIS throughput in gradient evaluations per second, against this machine's matmul bound, and AIS accuracy.

    python benchmarks/ais_throughput.py [--points 100] [--chains 16] [--steps 20] [--accuracy-points 500]
        [--settings T,C,L[,SCHEDULE] ...] [--seed 0] [--output-bias data|random] [--no-throughput]

Throughput: the 784-400-20 Bernoulli MLP VAE (untrained: the cost does not
depend on the weights). One gradient evaluation of log f_t for one chain
costs the decoder's forward products and, for the gradient in z, the same
products backwards: 2 x 2 x (20 x 400 + 400 x 784) FLOPs (the encoder runs
once per point per evaluation, not per chain, and needs no gradient). The
bound is the float32 ``torch.mm`` rate on those shapes, measured in the
same run, as the best of several repeats.

Accuracy: the check of ``tests/test_ais.py`` (a 2-D VAE trained 3 epochs on
3,000 points, AIS against quadrature) on more test points, at the default
settings or at each of ``--settings`` (with the AIS seed ``--seed``), to
weigh accuracy against the number of gradient evaluations. The 2-D VAE's
decoder starts at the data, as the library's and the test's do;
``--output-bias random`` starts it at PyTorch's random bias, which after 3
epochs leaves a poorer model and guide (benchmarks/RESULTS.md): the harder
check of the two.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import pyro
import torch

import pyro_vae as pv
from pyro_vae.accel import bernoulli
from pyro_vae.cli import count_or_zero, positive_int, seed_value
from pyro_vae.infer.ais import (
    DEFAULT_CHAINS,
    DEFAULT_LEAPFROG_STEPS,
    DEFAULT_SCHEDULE,
    DEFAULT_STEPS,
    PILOT_CHAINS,
    SCHEDULES,
)
from pyro_vae.training.engine import OUTPUT_BIAS_STARTS

X_DIM, HIDDEN, Z_DIM = 784, 400, 20
FLOPS_PER_GRADIENT = 2 * 2 * (Z_DIM * HIDDEN + HIDDEN * X_DIM)


def matmul_rate(rows: int, repeats: int = 5) -> float:
    """FLOP/s of the decoder's products forwards and backwards at ``rows`` chains x points."""
    z, w1, h, w2 = (
        torch.randn(rows, Z_DIM),
        torch.randn(Z_DIM, HIDDEN),
        torch.randn(rows, HIDDEN),
        torch.randn(HIDDEN, X_DIM),
    )
    g = torch.randn(rows, X_DIM)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(5):
            torch.mm(z, w1), torch.mm(h, w2), torch.mm(g, w2.T), torch.mm(h, w1.T)
        best = min(best, (time.perf_counter() - start) / 5)
    return FLOPS_PER_GRADIENT * rows / best


def throughput(points: int, chains: int, steps: int) -> None:
    torch.manual_seed(0)
    vae = pv.VAE((1, 28, 28), Z_DIM, hidden=(HIDDEN,))
    x = torch.rand(points, 1, 28, 28).round()
    leapfrog = DEFAULT_LEAPFROG_STEPS
    start = time.perf_counter()  # warm up at the measured shapes: the compiled kernels are built on first use
    minimum, bernoulli.MIN_COMPILED_ELEMENTS = bernoulli.MIN_COMPILED_ELEMENTS, 0  # 2 steps alone stay below it
    pv.ais_log_marginal_likelihood(vae.model, vae.guide, x, num_steps=2, num_chains=chains, batch_size=points)
    bernoulli.MIN_COMPILED_ELEMENTS = minimum
    warm_up = time.perf_counter() - start
    start = time.perf_counter()
    pv.ais_log_marginal_likelihood(vae.model, vae.guide, x, num_steps=steps, num_chains=chains, batch_size=points)
    seconds = time.perf_counter() - start
    rows = points * (chains + PILOT_CHAINS)  # the pilot chains that adapt the step size are evaluated as well
    gradients = rows * (steps * leapfrog + 1)  # each transition starts from the last one's gradient
    rate, bound = gradients / seconds, matmul_rate(rows) / FLOPS_PER_GRADIENT
    print(
        f"AIS, {points} points x ({chains} + {PILOT_CHAINS} pilot) chains x ({steps} steps x {leapfrog} + 1) "
        f"gradients: {seconds:.1f} s"
    )
    print(f"  (a first pass of 2 steps, compiling the Bernoulli kernels for these shapes: {warm_up:.1f} s)")
    print(f"  {rate:,.0f} gradient evaluations/s; matmul bound {bound:,.0f}/s; ratio {rate / bound:.2f}")
    full = 10_000 * (chains + PILOT_CHAINS) * (DEFAULT_STEPS * leapfrog + 1) / rate
    print(f"  {DEFAULT_STEPS} steps x {chains} chains on 10,000 test points: {full / 60:.0f} min at this rate")


def settings_of(text: str) -> tuple[int, int, int, str]:
    """``"500,32,2"`` or ``"500,32,2,linear"`` -> (steps, chains, leapfrog steps, schedule; sigmoid by default)."""
    parts = text.split(",")
    schedule = parts.pop() if len(parts) == 4 else DEFAULT_SCHEDULE
    try:
        steps, chains, leapfrog = (int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected steps,chains,leapfrog[,schedule], e.g. 500,32,2 or 500,32,2,linear; got {text!r}"
        ) from None
    if min(steps, chains, leapfrog) < 1:
        raise argparse.ArgumentTypeError(f"steps, chains and leapfrog steps must be >= 1; got {text!r}")
    if schedule not in SCHEDULES:
        raise argparse.ArgumentTypeError(f"the schedule must be one of {SCHEDULES}; got {schedule!r} in {text!r}")
    return steps, chains, leapfrog, schedule


def accuracy(points: int, settings: list[tuple[int, int, int, str]], output_bias: str, seed: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from quadrature import log_px_by_quadrature  # the tests' known answer

    pyro.set_rng_seed(0)
    data = pv.load_dataset("mnist", binarize="dynamic").subset(train=3000, val=300, test=points)
    vae = pv.VAE((1, 28, 28), 2, hidden=(32,))
    pv.fit(vae, data, epochs=3, batch_size=100, progress=False, output_bias=output_bias)
    x = data.test.x
    truth, border = log_px_by_quadrature(vae, x)
    print(f"AIS against quadrature on {points} test points of a 2-D VAE (output bias started at {output_bias}):")
    columns = (
        "steps T",
        "chains C",
        "leapfrog L",
        "schedule",
        f"gradients per point, (C + {PILOT_CHAINS}) (T L + 1)",
        "mean abs error",
    )
    print("| " + " | ".join((*columns, "worst point", "mean signed error", "seconds")) + " |")
    print("|---|---|---|---|---|---|---|---|---|")
    for steps, chains, leapfrog, schedule in settings:
        start = time.perf_counter()
        ais = pv.ais_log_marginal_likelihood(
            vae.model, vae.guide, x, num_steps=steps, num_chains=chains, leapfrog_steps=leapfrog, schedule=schedule,
            batch_size=100, seed=seed,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        error = ais.log_px - truth
        print(
            f"| {steps} | {chains} | {leapfrog} | {schedule} | {(chains + PILOT_CHAINS) * (steps * leapfrog + 1):,} "
            f"| {error.abs().mean():.4f} | {error.abs().max():.3f} | {error.mean():+.4f} | {seconds:.0f} |"
        )
    is_error = (pv.log_marginal_likelihood(vae.model, vae.guide, x, num_samples=5000).log_px - truth).abs()
    print(f"importance sampling, K = 5000: mean |error| {is_error.mean():.3f}, max {is_error.max():.3f}")
    print(f"quadrature: largest share of mass on the grid's border {border.exp().max():.1e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--points", type=positive_int, default=100, help="points annealed at once (AIS's batch_size)")
    parser.add_argument(
        "--chains", type=positive_int, default=DEFAULT_CHAINS, help="chains per point of the throughput"
    )
    parser.add_argument("--steps", type=positive_int, default=20)
    parser.add_argument("--accuracy-points", type=count_or_zero, default=500, help="0 skips the accuracy check")
    parser.add_argument(
        "--settings",
        nargs="+",
        type=settings_of,
        default=[(DEFAULT_STEPS, DEFAULT_CHAINS, DEFAULT_LEAPFROG_STEPS, DEFAULT_SCHEDULE)],
        metavar="T,C,L[,SCHEDULE]",
        help="AIS settings of the accuracy check, steps,chains,leapfrog[,schedule] each (default: the defaults)",
    )
    parser.add_argument("--seed", type=seed_value, default=0, help="the AIS seed of the accuracy check")
    parser.add_argument("--no-throughput", action="store_true", help="the accuracy check only")
    parser.add_argument(
        "--output-bias", choices=OUTPUT_BIAS_STARTS, default="data", help="the 2-D VAE's output-bias start"
    )
    args = parser.parse_args()
    given = {arg.split("=")[0] for arg in sys.argv[1:]}
    for flags, part, skipped in (
        ({"--points", "--chains", "--steps"}, "the throughput", args.no_throughput),
        ({"--settings", "--seed", "--output-bias"}, "the accuracy check", not args.accuracy_points),
    ):
        if skipped and (ignored := sorted(flags & given)):
            one = len(ignored) == 1
            parser.error(f"{', '.join(ignored)} {'sets' if one else 'set'} {part}, which this command skips; drop "
                         f"{'it' if one else 'them'}.")  # fmt: skip
    if args.no_throughput and not args.accuracy_points:
        parser.error("--no-throughput with --accuracy-points 0 leaves nothing to run; drop one of them.")
    if args.accuracy_points > (test_points := len(pv.load_dataset("mnist").test)):
        parser.error(f"--accuracy-points {args.accuracy_points} exceeds the {test_points} test points.")
    if not args.no_throughput:
        throughput(args.points, args.chains, args.steps)
    if args.accuracy_points:
        accuracy(args.accuracy_points, args.settings, args.output_bias, args.seed)
