"""Throughput of the log p(x) evaluator against this machine's own matmul bound.

    python benchmarks/eval_throughput.py [--points 200] [--samples 5000]

Network: the 784-400-20 Bernoulli MLP VAE. Each importance sample costs the
decoder's two matmuls, 2 * (20 * 400 + 400 * 784) FLOPs (the encoder runs
once per data point, not per sample). The bound is the float32 matmul
throughput measured here, in the same run, on the decoder's own shapes:
bound rate = matmul FLOP/s / FLOPs per sample.
"""

from __future__ import annotations

import argparse
import time

import torch

import pyro_vae as pv

X_DIM, HIDDEN, Z_DIM = 784, 400, 20
FLOPS_PER_SAMPLE = 2 * (Z_DIM * HIDDEN + HIDDEN * X_DIM)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_flops_per_second(rows: int) -> float:
    """float32 FLOP/s of the decoder's two matmuls at ``rows`` samples per pass (the best of several)."""
    z, w1 = torch.randn(rows, Z_DIM), torch.randn(Z_DIM, HIDDEN)
    h, w2 = torch.randn(rows, HIDDEN), torch.randn(HIDDEN, X_DIM)
    out1, out2 = torch.empty(rows, HIDDEN), torch.empty(rows, X_DIM)

    def both():
        for _ in range(5):
            torch.mm(z, w1, out=out1)
            torch.mm(h, w2, out=out2)

    both()
    return 5 * rows * FLOPS_PER_SAMPLE / best_of(both, 5)


def main(points: int, samples: int) -> None:
    torch.manual_seed(0)
    data = pv.load_dataset("mnist")
    vae = pv.VAE((1, 28, 28), Z_DIM, hidden=(HIDDEN,))
    x = data.test.x[:points]
    rows = 4096  # the evaluator's default particle-point evaluations per pass
    bound = matmul_flops_per_second(rows) / FLOPS_PER_SAMPLE

    def evaluate():
        pv.log_marginal_likelihood(vae.model, vae.guide, x, num_samples=samples)

    pv.log_marginal_likelihood(vae.model, vae.guide, x[:10], num_samples=100)  # warm-up
    rate = points * samples / best_of(evaluate, 2)
    bound_after = matmul_flops_per_second(rows) / FLOPS_PER_SAMPLE  # the machine is noisy: bracket the run
    bound = max(bound, bound_after)
    print(f"threads: {torch.get_num_threads()}, points: {points}, K: {samples}")
    print(f"matmul bound:    {bound:12,.0f} sample evaluations / s ({bound * FLOPS_PER_SAMPLE / 1e9:.1f} GFLOP/s)")
    print(f"evaluator:       {rate:12,.0f} sample evaluations / s")
    print(f"fraction of bound: {rate / bound:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--samples", type=int, default=5000)
    main(**vars(parser.parse_args()))
