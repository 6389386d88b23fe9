"""What the evaluators' compiled Bernoulli kernel costs and saves: the case for ``MIN_COMPILED_ELEMENTS``.

    python benchmarks/bernoulli_kernel.py [--points 600] [--samples 10] [--repeats 3]

Each measurement runs in a fresh Python process, as a command would, on the
784-400-20 Bernoulli MLP VAE (random weights) and the first ``--points`` test
images of the embedded MNIST, binarised:

- a small evaluation, ``pv.log_marginal_likelihood(num_samples=--samples)``, timed
  whole, with the eager density (the library's choice below its threshold)
  and with the kernel compiled for it (the threshold at 0), and the latter with
  TorchInductor's caches off (``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``, a
  machine's first run);
- the kernel's first call (compiling) and its steady time against the eager
  density's, per element, on 4,000 images (an evaluator's pass of 4,096 particle
  x point evaluations).

Medians over ``--repeats`` processes; the modes alternate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time


def child(mode: str, points: int, samples: int) -> dict:
    """Runs in the fresh process: the timings of one mode."""
    import torch

    import pyro_vae as pv
    from pyro_vae.accel import bernoulli

    torch.manual_seed(0)
    if mode == "kernel":
        logits, value = torch.randn(4000, 784), (torch.rand(4000, 784) < 0.5).float()
        first = time.perf_counter()
        bernoulli.compiled_bernoulli_log_prob_sum(logits, value)
        first = time.perf_counter() - first
        steady = {}
        for name, fn in [
            ("compiled", bernoulli.compiled_bernoulli_log_prob_sum),
            ("eager", bernoulli.bernoulli_log_prob_sum),
        ]:
            times = []
            for _ in range(20):
                start = time.perf_counter()
                fn(logits, value)
                times.append(time.perf_counter() - start)
            steady[name] = statistics.median(times) / logits.numel() * 1e9
        return {"first call": first, "ns per element": steady}
    bernoulli.MIN_COMPILED_ELEMENTS = 0 if mode == "compiled" else math.inf  # whatever the evaluation's size
    x = pv.load_dataset("mnist").test.x[:points]  # binarised once, as evaluations read them
    vae = pv.VAE((1, 28, 28), 20, hidden=(400,))
    start = time.perf_counter()
    estimate = pv.log_marginal_likelihood(vae.model, vae.guide, x, num_samples=samples)
    return {"evaluation": time.perf_counter() - start, "log p(x)": estimate.mean}


def run(mode: str, args, cold: bool = False) -> dict:
    env = {**os.environ, **({"TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"} if cold else {})}
    command = [sys.executable, __file__, "--child", mode, "--points", str(args.points), "--samples", str(args.samples)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"the {mode} process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from pyro_vae.cli import positive_int

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=positive_int, default=600, help="test points, at most the 10,000 of MNIST")
    parser.add_argument("--samples", type=positive_int, default=10)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--child", choices=("eager", "compiled", "kernel"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.points > 10_000:
        parser.error(f"--points {args.points}: MNIST has 10,000 test points; give at most that.")
    if args.child:
        print(json.dumps(child(args.child, args.points, args.samples)))
        return
    import torch

    from pyro_vae.accel.bernoulli import MIN_COMPILED_ELEMENTS

    elements = args.points * 784 * args.samples
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.points} points x 784 x K = "
          f"{args.samples}: {elements:,} elements (threshold {MIN_COMPILED_ELEMENTS:,})")  # fmt: skip
    results = {mode: [] for mode in ("eager", "compiled", "compiled, caches off", "kernel")}
    for _ in range(args.repeats):
        results["eager"].append(run("eager", args))
        results["compiled"].append(run("compiled", args))
        results["compiled, caches off"].append(run("compiled", args, cold=True))
        results["kernel"].append(run("kernel", args))
    median = lambda mode, key: statistics.median(r[key] for r in results[mode])  # noqa: E731
    print("| evaluation, fresh process | seconds (median) | each | log p(x) |")
    print("|---|---|---|---|")
    for mode in ("eager", "compiled", "compiled, caches off"):
        each = ", ".join(f"{r['evaluation']:.2f}" for r in results[mode])
        print(f"| {mode} | {median(mode, 'evaluation'):.2f} | {each} | {results[mode][0]['log p(x)']:.4f} |")
    per_element = {
        name: statistics.median(r["ns per element"][name] for r in results["kernel"]) for name in ("compiled", "eager")
    }
    first = median("kernel", "first call")
    print(f"kernel's first call (4000 x 784, a fresh process): {first:.2f} s; steady: compiled "
          f"{per_element['compiled']:.2f} ns an element, eager {per_element['eager']:.2f} ns")  # fmt: skip


if __name__ == "__main__":
    main()
