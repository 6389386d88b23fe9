import sys

import pyro
import pytest

import pyro_vae as pv


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


def pytest_terminal_summary(terminalreporter):
    """The counts of kills survived and bad inputs refused, from tests/test_robustness.py."""
    robustness = sys.modules.get("test_robustness")
    if robustness is not None and robustness.REPORT:
        counts = ", ".join(f"{name}: {count}" for name, count in sorted(robustness.REPORT.items()))
        terminalreporter.write_line(f"robustness: {counts}, nothing lost")
