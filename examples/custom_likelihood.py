"""A likelihood of your own: heavy-tailed Student-t pixels, compared with a Gaussian by test log p(x).

    python examples/custom_likelihood.py --epochs 10
    python examples/custom_likelihood.py --epochs 1 --subset 500 --samples 10   # a smoke test

The likelihood is one small class. The decoder gives each pixel's location;
the degrees of freedom nu and the scale s are learned and shared by all
pixels. Registering the class makes its name known to configs, so a saved
run loads, evaluates and compares like a built-in one.

Both models train on the same grayscale MNIST (no binarisation: a
Student-t and a Gaussian are densities on the real line), and their test
log p(x) is compared point by point with ``pv.compare_runs``.
"""

import argparse
import math
from pathlib import Path

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

import pyro_vae as pv
from pyro_vae.cli import positive_int
from pyro_vae.evaluate import comparison_markdown


@pv.likelihoods.register_likelihood
class StudentT(pv.likelihoods.Likelihood):
    """p(x | z) = prod_d StudentT(x_d; nu, mu_d(z), s), with nu > 1 and s >= min_scale learned and shared.

    The lower bound on s keeps the density bounded: MNIST has many pixels that
    are exactly 0, and a free scale could put infinite density on them.
    """

    name = "student-t"
    params_per_dim = 1

    def __init__(self, init_df: float = 3.0, init_scale: float = 0.1, min_scale: float = 1e-3):
        super().__init__()
        self.init_df, self.init_scale, self.min_scale = init_df, init_scale, min_scale
        self.raw_df = nn.Parameter(torch.tensor(math.log(init_df - 1)))
        self.raw_scale = nn.Parameter(torch.tensor(math.log(math.expm1(init_scale - min_scale))))

    @property
    def df(self) -> torch.Tensor:
        """nu = 1 + exp(raw): above 1, so the mean exists."""
        return 1 + self.raw_df.exp()

    @property
    def scale(self) -> torch.Tensor:
        """s = min_scale + softplus(raw)."""
        return self.min_scale + F.softplus(self.raw_scale)

    def forward(self, params):
        return dist.StudentT(self.df, self._param(params, 0), self.scale).to_event(len(self.x_shape))

    def config(self):
        return {"name": self.name, "init_df": self.init_df, "init_scale": self.init_scale, "min_scale": self.min_scale}


def main(epochs: int, subset: int | None, samples: int, out: str) -> None:
    data = pv.load_dataset("mnist", binarize="none")  # grayscale pixels in [0, 1]
    if subset:
        try:
            data = data.quick_subset(subset)
        except pv.DataError as err:
            raise SystemExit(str(err)) from None
    likelihoods = {"student-t": StudentT(), "gaussian": pv.likelihoods.Gaussian(sigma="shared")}
    if taken := [name for name in likelihoods if (Path(out) / name).exists()]:  # before any training
        raise SystemExit(f"{out} already holds {', '.join(taken)} from an earlier run of this example; give another "
                         "--out, or remove them.")  # fmt: skip
    runs = []
    for name, likelihood in likelihoods.items():
        run_dir = Path(out) / name
        vae = pv.VAE((1, 28, 28), z_dim=20, likelihood=likelihood)
        pv.fit(vae, data, epochs=epochs, batch_size=128, seed=0, run_dir=run_dir, progress=False)
        metrics = pv.evaluate_run(run_dir, num_samples=samples, progress=False)
        print(f"{name}: test log p(x) {metrics['test_log_px']:.1f} +- {metrics['test_log_px_se']:.1f} nats")
        runs.append(run_dir)

    fitted = pv.load_run(runs[0]).model.likelihood  # rebuilt from config.json by its registered name
    print(f"learned Student-t: nu = {fitted.df.item():.2f}, s = {fitted.scale.item():.4f}")
    print(comparison_markdown(pv.compare_runs(runs)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=positive_int, default=10)
    parser.add_argument("--subset", type=positive_int, help="train on this many points only")
    parser.add_argument("--samples", type=positive_int, default=1000, help="K, importance samples per test point")
    parser.add_argument("--out", default="runs/custom-likelihood", help="where the two run directories go")
    main(**vars(parser.parse_args()))
