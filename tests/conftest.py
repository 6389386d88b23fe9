import os
from collections import Counter

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

import pyro_vae as pv

# pytest-xdist workers share the cores: each takes its share of threads, so that they never outnumber the cores
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


@pytest.fixture(autouse=True)
def _fresh_pyro():
    """Every test starts from a clear param store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield


@pytest.fixture(scope="session")
def mnist():
    """The embedded MNIST, dynamically binarised (loaded once per session)."""
    return pv.load_dataset("mnist", binarize="dynamic")


@pytest.fixture
def small_mnist(mnist):
    """2,000 training points, 500 validation and 500 test points."""
    return mnist.subset(train=2000, val=500, test=500)


def small_vae(**kwargs):
    """A small MLP VAE for MNIST that trains in a second."""
    kwargs.setdefault("hidden", (128,))
    return pv.VAE((1, 28, 28), kwargs.pop("z_dim", 8), **kwargs)


def without_timings(history: list[dict]) -> list[dict]:
    """History rows without their wall-clock columns (which no two runs share), for comparing runs."""
    return [{key: value for key, value in row.items() if not key.endswith("seconds")} for row in history]


def discrete_latent_program():
    """A model with a discrete latent y, Bernoulli(1/2), and a guide that samples it: (model, guide)."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(y, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Bernoulli(0.3))

    return model, guide


def delta_method_sd(estimate, num_samples: int) -> torch.Tensor:
    """Per point, the standard deviation of an importance-sampled log p(x) by the delta method: about
    sqrt(r / K), with r = K / ESS - 1 the relative variance of the K weights."""
    return ((num_samples / estimate.ess - 1) / num_samples).sqrt()


class LinearGaussian:
    """p(z) = N(0, I), p(x | z) = N(W z + b, diag sigma^2), with W, b and sigma drawn from ``seed``.

    Its answers are known in closed form: p(x) = N(x; b, W W^T + diag sigma^2) (:attr:`marginal`), and
    p(z | x) = N(S W^T diag(sigma^-2) (x - b), S) with S = (I + W^T diag(sigma^-2) W)^-1.
    """

    def __init__(self, seed: int, data_dim: int = 5, latent_dim: int = 2):
        g = torch.Generator().manual_seed(seed)
        self.W, self.b = torch.randn(data_dim, latent_dim, generator=g), torch.randn(data_dim, generator=g)
        self.sigma = 0.5 + torch.rand(data_dim, generator=g)
        self.marginal = dist.MultivariateNormal(self.b, self.W @ self.W.T + torch.diag(self.sigma**2))
        precision = torch.eye(latent_dim) + self.W.T @ torch.diag(self.sigma**-2) @ self.W
        self.posterior_covariance = torch.linalg.inv(precision)

    def posterior_mean(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b) @ torch.diag(self.sigma**-2) @ self.W @ self.posterior_covariance

    def model(self, x=None, scale=1.0, batch_size=None):
        """The model; ``scale`` scales the latent site's log density (KL annealing), ``batch_size`` simulates."""
        with pyro.plate("data", x.shape[0] if x is not None else batch_size):
            with poutine.scale(scale=scale):
                z = pyro.sample("z", dist.Normal(torch.zeros(self.W.shape[1]), 1.0).to_event(1))
            return pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.sigma).to_event(1), obs=x)


def continuous_bernoulli_log_density(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log CB(x; sigmoid(l)) = x l - softplus(l) + log(l / tanh(l / 2)) (2 at l = 0), in float64, elementwise.

    From C(lambda) = 2 atanh(1 - 2 lambda) / (1 - 2 lambda) (Loaiza-Ganem & Cunningham 2019) and
    2 atanh(1 - 2 sigmoid(l)) = -l.
    """
    x, logits = x.double(), logits.double()
    ratio = torch.where(logits == 0, torch.full_like(logits, 2.0), logits / torch.tanh(logits / 2))
    return x * logits - torch.nn.functional.softplus(logits) + ratio.log()


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory):
    """``reference_runs(kind)`` -> (a run of that kind trained without interruption, the M1 it stacks on or None):
    what the kill and interrupt tests compare against, trained once per test session on first use."""
    from training_processes import reference_runs  # imported here: it imports this module's helpers

    return reference_runs(tmp_path_factory)


ROBUSTNESS: Counter = Counter()


@pytest.fixture
def robustness_report(request) -> Counter:
    """This test's counts of kills survived and bad inputs refused, handed to the summary as a user property."""
    counts: Counter = Counter()
    yield counts
    request.node.user_properties.append(("robustness", dict(counts)))


def pytest_runtest_logreport(report):
    """Add up the robustness tests' counts (their "robustness" user property), from any pytest-xdist worker."""
    if report.when == "teardown":
        for name, counts in report.user_properties:
            if name == "robustness":
                ROBUSTNESS.update(counts)


def pytest_terminal_summary(terminalreporter):
    """The counts of kills survived and bad inputs refused (the tests that take ``robustness_report``)."""
    if ROBUSTNESS:
        counts = ", ".join(f"{name}: {count}" for name, count in sorted(ROBUSTNESS.items()))
        terminalreporter.write_line(f"robustness: {counts}, nothing lost")
