"""The marginal likelihood of a hand-written Pyro model, checked against its closed form.

    python examples/hand_written_model.py
    python examples/hand_written_model.py --steps 50 --subset 500 --test 50   # a smoke test

Factor analysis of MNIST digits, written in plain Pyro with no pyro-vae class:

    z_n ~ N(0, I_k),    x_n | z_n ~ N(W z_n + b, diag psi),    n in the plate "data",

with the guide an amortised diagonal Gaussian q(z | x) = N(A x + c, diag s^2).
The images are averaged down to 14 x 14 pixels. SVI with ``Trace_ELBO`` fits
both; then ``pv.log_marginal_likelihood`` estimates the test log p(x) with K
importance samples. For this model log p(x) is known exactly,

    log p(x) = log N(x; b, W W^T + diag psi),

so the script prints the estimate next to the truth for growing K: below
the truth (it is a lower bound in expectation), rising with K, and closing
the gap that the ELBO leaves. The exact posterior has a full covariance,
which the diagonal guide cannot represent, so at small K the gap is real.
"""

import argparse

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

import pyro_vae as pv
from pyro_vae.cli import positive_int

LATENT = 10


def noise_variance(raw_psi):
    """psi = 0.01 + softplus(raw_psi): the floor keeps the density bounded on constant pixels."""
    return 1e-2 + F.softplus(raw_psi)


def model(x, num_data=None):
    """Factor analysis; the "data" plate subsamples when ``num_data`` exceeds the batch."""
    d = x.shape[-1]
    W = pyro.param("W", 0.01 * torch.randn(d, LATENT))
    b = pyro.param("b", x.mean(0))
    psi = noise_variance(pyro.param("raw_psi", torch.full((d,), -2.0)))
    with pyro.plate("data", num_data or len(x), subsample_size=len(x)):
        z = pyro.sample("z", dist.Normal(torch.zeros(LATENT), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ W.T + b, psi.sqrt()).to_event(1), obs=x)


def guide(x, num_data=None):
    d = x.shape[-1]
    A = pyro.param("A", torch.zeros(LATENT, d))
    c = pyro.param("c", torch.zeros(LATENT))
    raw_s = pyro.param("raw_s", torch.zeros(LATENT))
    with pyro.plate("data", num_data or len(x), subsample_size=len(x)):
        pyro.sample("z", dist.Normal(x @ A.T + c, F.softplus(raw_s)).to_event(1))


def exact_log_px(x):
    """log N(x; b, W W^T + diag psi), the marginal of the fitted model."""
    W, b = pyro.param("W").detach(), pyro.param("b").detach()
    psi = noise_variance(pyro.param("raw_psi").detach())
    return dist.LowRankMultivariateNormal(b, W, psi).log_prob(x)


def main(steps: int, subset: int | None, test: int) -> None:
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    data = pv.load_dataset("mnist", binarize="none")
    for flag, count, split in (("--subset", subset, data.train), ("--test", test, data.test)):
        if count and count > len(split):
            raise SystemExit(f"{flag} {count} exceeds the {len(split)} images of the split; give at most that.")
    train = F.avg_pool2d(data.train.x[:subset], 2).flatten(1)  # 14 x 14 grayscale
    x_test = F.avg_pool2d(data.test.x[:test], 2).flatten(1)

    svi = SVI(model, guide, Adam({"lr": 1e-2}), Trace_ELBO())
    batch_size = min(256, len(train))  # Pyro's plate takes no subsample larger than the data
    for step in range(steps):
        batch = train[torch.randint(len(train), (batch_size,))]
        loss = svi.step(batch, num_data=len(train))
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"step {step:5d}  ELBO per point {-loss / len(train):9.2f}")

    truth = exact_log_px(x_test)
    print(f"\nexact test log p(x): {truth.mean():.2f} nats per image ({len(x_test)} images)")
    print("    K   estimate    gap to exact   ELBO      mean ESS")
    for k in (1, 10, 100, 1000):
        estimate = pv.log_marginal_likelihood(model, guide, x_test, num_samples=k, seed=0)
        gap = (truth - estimate.log_px).mean()
        print(f"{k:5d}  {estimate.mean:9.2f}   {gap:9.2f}   {estimate.elbo.mean():9.2f}  {estimate.ess.mean():8.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--steps", type=positive_int, default=3000, help="SVI steps of 256 images (all of them, if fewer)"
    )
    parser.add_argument("--subset", type=positive_int, help="train on this many images only")
    parser.add_argument("--test", type=positive_int, default=1000, help="test images to evaluate")
    main(**vars(parser.parse_args()))
