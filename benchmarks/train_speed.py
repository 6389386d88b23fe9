"""Epoch time of ``pv.fit`` against a hand-written PyTorch loop of the same VAE, measured in one run.

    python benchmarks/train_speed.py [--batch-sizes 128 512] [--repeats 3]

All three train the 784-400-20 Bernoulli MLP VAE (the same ``MLPEncoder`` and
``MLPDecoder`` modules) on the embedded MNIST, dynamically binarised, with
Adam at 1e-3, one epoch of 60,000 points at a time:

* **plain**: a hand-written PyTorch loop, the reference. It has no Pyro at
  all: the reparameterised draw, the closed-form KL and
  ``binary_cross_entropy_with_logits`` written out, with
  ``torch.optim.Adam(params, lr)`` as such loops are usually written;
* **plain, fused Adam**: the same loop with ``Adam(..., fused=True)``, the
  optimiser ``fit`` uses, to show how much of the gain is the optimiser's;
* **fit**: ``pv.fit``, whose model and guide are ordinary Pyro programs
  (``Trace_ELBO.differentiable_loss`` and one fused torch Adam); its
  optimisation pass is timed, without the per-epoch validation
  (``history[i]["seconds"]``);
* **svi**: the textbook ``SVI(model, guide, pyro.optim.Adam, Trace_ELBO())``
  loop with Pyro's default validation, the path ``fit`` replaces.

The machine is shared and noisy, so the three are interleaved (the order
rotates every repeat) and each reports the median over the repeats; only the
ratios to the plain loop are meaningful.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch
import torch.nn.functional as F

import pyro_vae as pv
from pyro_vae.components.nets import MLPDecoder, MLPEncoder

Z_DIM, HIDDEN, LR = 20, (400,), 1e-3


def plain_epoch(data: pv.Dataset, batch_size: int, fused: bool = False) -> float:
    """One epoch of a hand-written PyTorch VAE loop; returns its seconds."""
    encoder, decoder = MLPEncoder(data.x_shape, Z_DIM, HIDDEN), MLPDecoder(Z_DIM, data.x_shape, HIDDEN)
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=LR, fused=fused)
    x_train = data.train.x
    started = time.perf_counter()
    order = torch.randperm(x_train.shape[0])
    for start in range(0, x_train.shape[0], batch_size):
        x = torch.bernoulli(x_train[order[start : start + batch_size]])
        loc, scale = encoder(x)
        z = loc + scale * torch.randn_like(loc)
        logits = decoder(z).squeeze(1)
        reconstruction = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        kl = 0.5 * (loc**2 + scale**2 - 2 * scale.log() - 1).sum()
        optimizer.zero_grad(set_to_none=True)
        (reconstruction + kl).backward()
        optimizer.step()
    return time.perf_counter() - started


def fit_epoch(data: pv.Dataset, batch_size: int) -> float:
    vae = pv.VAE(data.x_shape, Z_DIM, hidden=HIDDEN)
    history = pv.fit(vae, data, epochs=1, batch_size=batch_size, lr=LR, progress=False)
    return history[-1]["seconds"]


def svi_epoch(data: pv.Dataset, batch_size: int) -> float:
    vae = pv.VAE(data.x_shape, Z_DIM, hidden=HIDDEN)
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": LR}), pyro.infer.Trace_ELBO())
    started = time.perf_counter()
    for x in data.batches(batch_size):
        svi.step(x)
    return time.perf_counter() - started


def main(batch_sizes: list[int], repeats: int) -> None:
    pyro.set_rng_seed(0)
    data = pv.load_dataset("mnist", binarize="dynamic")
    contenders = {
        "plain": plain_epoch,
        "plain, fused Adam": lambda data, batch_size: plain_epoch(data, batch_size, fused=True),
        "fit": fit_epoch,
        "svi": svi_epoch,
    }
    print(f"threads: {torch.get_num_threads()}, torch {torch.__version__}, pyro {pyro.__version__}")
    print("| batch | plain loop | plain, fused Adam | pv.fit | fit / plain | fit / plain fused | SVI | SVI / plain |")
    print("|---|---|---|---|---|---|---|---|")
    for batch_size in batch_sizes:
        fit_epoch(data.subset(train=batch_size * 20), batch_size)  # warm-up: allocator, thread pool
        times: dict[str, list[float]] = {name: [] for name in contenders}
        names = list(contenders)
        for repeat in range(repeats):
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                times[name].append(contenders[name](data, batch_size))
        plain, fused, fit, svi = (statistics.median(times[name]) for name in names)
        print(
            f"| {batch_size} | {plain:.2f} s | {fused:.2f} s | {fit:.2f} s | {fit / plain:.2f} | {fit / fused:.2f} "
            f"| {svi:.2f} s | {svi / plain:.2f} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--repeats", type=int, default=3)
    main(**vars(parser.parse_args()))
