"""A basic VAE on the embedded MNIST, driven from Python.

    python examples/basic_vae.py --epochs 5

Trains with ``pv.fit``, then shows that the model and guide are ordinary
Pyro programs: one more epoch of SVI steps by hand, with Pyro's own optimiser,
and draws from ``Predictive``.
"""

import argparse

import pyro
from pyro.infer import SVI, Predictive, Trace_ELBO

import pyro_vae as pv
from pyro_vae.cli import positive_int


def main(epochs: int, subset: int | None) -> None:
    pyro.set_rng_seed(0)
    data = pv.load_dataset("mnist", binarize="dynamic")  # the embedded copy, no network
    if subset:
        try:
            data = data.quick_subset(subset)
        except pv.DataError as err:
            raise SystemExit(str(err)) from None
    vae = pv.VAE(
        x_shape=(1, 28, 28),
        z_dim=20,
        prior=pv.priors.StandardNormal(),
        likelihood=pv.likelihoods.Bernoulli(),
    )
    history = pv.fit(vae, data, epochs=epochs, batch_size=128)
    print(f"validation ELBO after {epochs} epochs: {history[-1]['val_elbo']:.2f} nats")

    # The same model and guide, by hand: SVI with Pyro's own optimiser.
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-4}), Trace_ELBO())
    for x in data.batches(128):
        svi.step(x)
    print("test", pv.evaluate_elbo(vae, data.test.x))

    # Posterior draws of z for three test digits, and new digits from the prior.
    z = Predictive(vae.model, guide=vae.guide, num_samples=5, return_sites=("z",))(data.test.x[:3])["z"]
    print("posterior z draws:", tuple(z.shape), "new digits:", tuple(vae.sample(16).shape))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=positive_int, default=5)
    parser.add_argument("--subset", type=positive_int, help="train on this many points only")
    main(**vars(parser.parse_args()))
