"""Throughput of the log p(x) evaluator against this machine's own matmul bound, and against pythae.

    python benchmarks/eval_throughput.py [--points 2000] [--samples 5000] [--peer-points 20]

Network: the 784-400-20 Bernoulli MLP VAE. Each importance sample costs the
decoder's two matmuls, 2 * (20 * 400 + 400 * 784) FLOPs (the encoder runs
once per data point, not per sample). The bound is the float32 matmul
throughput measured here, in the same run, on the decoder's own shapes, by
the fastest method PyTorch offers on this CPU (``torch.mm`` or MKL's GEMM on
packed weights): bound rate = matmul FLOP/s / FLOPs per sample. The evaluator's time is that of
whole calls, so it includes recording and compiling the replayed pass
(:mod:`pyro_vae.accel.replay`), which a call of 2,000 points at K = 5000 (2,500
passes) pays once.

The peer is pythae's ``VAE.get_nll`` (``pip install pythae``; skipped when it
is not installed) on the same network: a 784-400-20 encoder and a
20-400-784 sigmoid decoder with pythae's "bce" reconstruction loss, under
``torch.no_grad()``. Its ``batch_size`` (importance samples per pass) is
tried at 100 (its default), 1000 and 5000, and the fastest counts.
"""

from __future__ import annotations

import argparse
import time

import torch

import pyro_vae as pv
from pyro_vae.cli import count_or_zero, positive_int

X_DIM, HIDDEN, Z_DIM = 784, 400, 20
FLOPS_PER_SAMPLE = 2 * (Z_DIM * HIDDEN + HIDDEN * X_DIM)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_flops_per_second(rows: int) -> dict[str, float]:
    """float32 FLOP/s of the decoder's two matmuls at ``rows`` samples per pass (the best of several), per method.

    ``torch.mm`` always; where PyTorch has MKL, also MKL's GEMM on weights
    packed in advance (``mkl._mkl_linear``), which is what the evaluator's
    frozen, compiled pass calls. The bound is the fastest of them.
    """
    z, w1 = torch.randn(rows, Z_DIM), torch.randn(Z_DIM, HIDDEN)
    h, w2 = torch.randn(rows, HIDDEN), torch.randn(HIDDEN, X_DIM)
    out1, out2 = torch.empty(rows, HIDDEN), torch.empty(rows, X_DIM)

    def mm():
        for _ in range(5):
            torch.mm(z, w1, out=out1)
            torch.mm(h, w2, out=out2)

    methods = {"torch.mm": mm}
    if torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear"):
        w1_t, w2_t = w1.T.contiguous(), w2.T.contiguous()  # a Linear layer's (out, in) weights
        packed1, packed2 = (torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in (w1_t, w2_t))

        def mkl_packed():
            for _ in range(5):
                torch.ops.mkl._mkl_linear(z, packed1, w1_t, None, rows)
                torch.ops.mkl._mkl_linear(h, packed2, w2_t, None, rows)

        methods["MKL packed"] = mkl_packed
    rates = {}
    for name, both in methods.items():
        both()
        rates[name] = 5 * rows * FLOPS_PER_SAMPLE / best_of(both, 5)
    return rates


def pythae_rate(x: torch.Tensor, samples: int) -> float | None:
    """Sample evaluations per second of pythae's get_nll on the same network, or None without pythae."""
    try:
        from pythae.models import VAE as PythaeVAE
        from pythae.models import VAEConfig
        from pythae.models.base.base_utils import ModelOutput
        from pythae.models.nn import BaseDecoder, BaseEncoder
    except ImportError:
        print("pythae is not installed (pip install pythae): no peer comparison")
        return None

    class Encoder(BaseEncoder):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(X_DIM, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 2 * Z_DIM)
            )

        def forward(self, x):
            loc, log_var = self.net(x.reshape(x.shape[0], -1)).chunk(2, dim=-1)
            return ModelOutput(embedding=loc, log_covariance=log_var)

    class Decoder(BaseDecoder):
        def __init__(self):
            super().__init__()
            layers = [
                torch.nn.Linear(Z_DIM, HIDDEN),
                torch.nn.ReLU(),
                torch.nn.Linear(HIDDEN, X_DIM),
                torch.nn.Sigmoid(),
            ]
            self.net = torch.nn.Sequential(*layers)

        def forward(self, z):
            return ModelOutput(reconstruction=self.net(z).reshape(z.shape[0], 1, 28, 28))

    config = VAEConfig(input_dim=(1, 28, 28), latent_dim=Z_DIM, reconstruction_loss="bce")
    model = PythaeVAE(config, encoder=Encoder(), decoder=Decoder()).eval()
    rates = {}
    with torch.no_grad():
        for batch_size in (100, 1000, 5000):
            seconds = best_of(lambda b=batch_size: model.get_nll(x, n_samples=samples, batch_size=b), 1)
            rates[batch_size] = x.shape[0] * samples / seconds
    print("pythae get_nll:  " + ", ".join(f"batch_size {b}: {r:,.0f}/s" for b, r in rates.items()))
    return max(rates.values())


def main(points: int, samples: int, peer_points: int) -> None:
    torch.manual_seed(0)
    data = pv.load_dataset("mnist")
    for flag, count in (("--points", points), ("--peer-points", peer_points)):
        if count > len(data.test):
            raise SystemExit(f"{flag} {count} exceeds the {len(data.test)} test points; give at most that.")
    vae = pv.VAE((1, 28, 28), Z_DIM, hidden=(HIDDEN,))
    x = data.test.x[:points]
    rows = 4096  # particle-point evaluations per pass, the bound's and the evaluator's
    before = matmul_flops_per_second(rows)

    def evaluate():
        pv.log_marginal_likelihood(vae.model, vae.guide, x, num_samples=samples, max_samples_per_pass=rows)

    pv.log_marginal_likelihood(vae.model, vae.guide, x[:10], num_samples=100)  # warm-up: imports, first calls
    rate = points * samples / best_of(evaluate, 2)
    after = matmul_flops_per_second(rows)  # the machine is noisy: bracket the run, keep the best
    flops = {name: max(before[name], after[name]) for name in before}
    bound = max(flops.values()) / FLOPS_PER_SAMPLE
    print(f"threads: {torch.get_num_threads()}, points: {points}, K: {samples}")
    print("matmul:          " + ", ".join(f"{name} {rate / 1e9:.1f} GFLOP/s" for name, rate in flops.items()))
    print(f"matmul bound:    {bound:12,.0f} sample evaluations / s ({bound * FLOPS_PER_SAMPLE / 1e9:.1f} GFLOP/s)")
    print(f"evaluator:       {rate:12,.0f} sample evaluations / s")
    print(f"fraction of bound: {rate / bound:.2f}")
    peer = pythae_rate(data.test.x[:peer_points], samples) if peer_points else None
    if peer is not None:
        print(f"pythae get_nll:  {peer:12,.0f} sample evaluations / s (best batch_size)")
        print(f"speed-up over pythae: {rate / peer:.1f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=positive_int, default=2000)
    parser.add_argument("--samples", type=positive_int, default=5000)
    parser.add_argument(
        "--peer-points", type=count_or_zero, default=20, help="test points for the (slower) pythae peer; 0 skips it"
    )
    main(**vars(parser.parse_args()))
