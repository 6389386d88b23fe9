"""Does the code or the random stream decide M2 from 100 labels? (benchmarks/RESULTS.md, "Eight starts at 100
labels").

    python benchmarks/m2_streams.py same-draws                      # two epochs, the same binarisations
    python benchmarks/m2_streams.py same-draws --keep-negligible    # M2's negligible values of y kept
    python benchmarks/m2_streams.py seed 1 --out RUN                # ten epochs from seed 0's weights, training seed 1

``same-draws`` trains M2 (z 50, hidden 500, softplus; 100 labels of draw 0; the classifier's warm start; Adam
3e-3, batch 200) for two epochs on the first 10,000 training points, every dynamic binarisation drawn by
``torch.bernoulli`` from the training seed, so that two versions of the package draw the same binary images
however their own ``binarize`` draws them, on one thread, and prints the history: the same objective gives the same
numbers to rounding. ``--keep-negligible`` (of either command) enumerates every value of y (no
``NegligibleValuesDropped``), as the code before 2026-12-06 did; ``--compile`` replays the compiled step.

``seed S`` trains the same M2 on all the training points for ten epochs at a constant rate, from the weights drawn
under seed 0 (those of ``pyro-vae train --seed 0`` and of the study) with the training seed S, into ``--out``, and
prints the validation accuracy by epoch. ``--binarize`` draws the training batches' binary images with the
package's own ``binarize``, ``torch.bernoulli`` (the package's draws before commit e81f9a2 and again since
2026-12-07), or the 16-bit draws of e81f9a2 (the package's between; given here to run on any commit).

Either runs against another commit's package: ``PYTHONPATH=<a worktree of it> python benchmarks/m2_streams.py ...``
(it uses only ``pv.load_dataset``, ``pv.SSVAE``, ``pv.SemiSupervisedELBO`` and ``pv.fit``, which every commit since
2026-12-05 has).
"""

import argparse

import pyro
import torch
from pyro.infer import config_enumerate

import pyro_vae as pv
import pyro_vae.data


def m2(data: pv.Dataset) -> pv.SSVAE:
    """The study's M2, its weights drawn from the generator as seed 0 left it after loading the data."""
    return pv.SSVAE(data.x_shape, z_dim=50, hidden=(500,), activation="softplus")


def keep_negligible() -> None:
    """Enumerate every value of y in M2's unlabelled loss, as the code before 2026-12-06 did."""
    pv.SemiSupervisedELBO.enumerated_guide = lambda self, model: config_enumerate(model.guide, "parallel")


def same_draws(args) -> None:
    pyro_vae.data.binarize = torch.bernoulli  # the same binary images in every version
    if args.keep_negligible:
        keep_negligible()
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    data = pv.load_dataset("mnist", binarize="dynamic").subset(train=10000, val=2000, test=500)
    history = pv.fit(
        m2(data), data, objective=pv.SemiSupervisedELBO(num_labels=100), epochs=2, batch_size=200, lr=3e-3,
        compile=args.compile, eval_samples=0, progress=False,
    )  # fmt: skip
    print(pv.__file__)
    for row in history:
        print({key: round(value, 6) if isinstance(value, float) else value for key, value in row.items()
               if not key.endswith("seconds")})  # fmt: skip


def binarize_16_bit(x: torch.Tensor) -> torch.Tensor:
    """Commit e81f9a2's ``pyro_vae.data.binarize``: x_bin = 1 where u < x, u on the midpoints of 2^16 cells."""
    words = torch.empty(-(-x.numel() // 4), dtype=torch.int64, device=x.device).random_(-(2**63), None)
    levels = words.view(torch.int16)[: x.numel()].view(x.shape).to(torch.float32)
    return (levels.add_(2**15 + 0.5).mul_(2.0**-16) < x).to(x.dtype)


#: ``--binarize``: how the training batches are binarised.
BINARIZE = {"package": None, "bernoulli": torch.bernoulli, "16-bit": binarize_16_bit}


def seed(args) -> None:
    if args.keep_negligible:
        keep_negligible()
    if BINARIZE[args.binarize] is not None:
        pyro_vae.data.binarize = BINARIZE[args.binarize]
    pyro.set_rng_seed(0)
    data = pv.load_dataset("mnist", binarize="dynamic")
    history = pv.fit(
        m2(data), data, objective=pv.SemiSupervisedELBO(num_labels=100), epochs=10, batch_size=200, lr=3e-3,
        seed=args.seed, eval_samples=0, progress=False, run_dir=args.out, compile=True,
    )  # fmt: skip
    print(pv.__file__, f"training seed {args.seed}:", " ".join(f"{100 * row['val_accuracy']:.1f}" for row in history))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    draws = commands.add_parser("same-draws", help="two epochs with the same binarisations")
    draws.add_argument("--keep-negligible", action="store_true", help="enumerate every value of y")
    draws.add_argument("--compile", action="store_true", help="replay the compiled step")
    seeded = commands.add_parser("seed", help="ten epochs from seed 0's weights with another training seed")
    seeded.add_argument("seed", type=int)
    seeded.add_argument("--out", required=True, help="the run directory")
    seeded.add_argument("--keep-negligible", action="store_true", help="enumerate every value of y")
    seeded.add_argument("--binarize", choices=BINARIZE, default="package", help="the training batches' binarisation")
    args = parser.parse_args()
    {"same-draws": same_draws, "seed": seed}[args.command](args)


if __name__ == "__main__":
    main()
