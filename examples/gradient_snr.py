"""The signal-to-noise ratio of the IWAE bound's gradient against K, for the standard and the DReG estimator.

    python examples/gradient_snr.py                    # the figure and table in docs/gradients.md
    python examples/gradient_snr.py --train-epochs 1 --subset 200 --repeats 10 --out /tmp/snr.png   # a smoke test

Rainforth et al. (*Tighter Variational Bounds are Not Necessarily Better*,
ICML 2018) showed that the signal-to-noise ratio |E g| / sd(g) of the IWAE
bound's gradient in the encoder's parameters falls like 1 / sqrt(K), while
the decoder's rises like sqrt(K); Tucker et al.'s doubly reparameterised
gradient (ICLR 2019) fixes the encoder's. This script trains Burda et al.'s
one-layer MNIST model (784-200-200-50, tanh) briefly as a VAE, then, on one
fixed minibatch of test points, draws R independent gradients of the bound
at each K with each estimator and reports the SNR of each parameter entry,
averaged over the encoder's and over the decoder's entries.
"""

import argparse
from pathlib import Path

import matplotlib
import pyro
import torch

import pyro_vae as pv
from pyro_vae.cli import count_or_zero, positive_int, seed_value

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402

KS = (1, 3, 10, 30, 100)


def gradient_draws(model, x, k: int, gradient: str, repeats: int) -> dict[str, torch.Tensor]:
    """``repeats`` independent gradients of the bound on ``x``, flattened per part: {"encoder": (R, P), ...}."""
    objective = pv.IWAEBound(k, gradient=gradient)
    draws = {"encoder": [], "decoder": []}
    for _ in range(repeats):
        model.zero_grad()
        objective.loss(model, x, kl_weight=1.0).backward()
        for part in draws:
            draws[part].append(torch.cat([p.grad.flatten() for p in getattr(model, part).parameters()]))
    return {part: torch.stack(values) for part, values in draws.items()}


def mean_snr(draws: torch.Tensor) -> float:
    """Rainforth et al.'s SNR |mean| / sd of each entry, averaged over the entries that vary."""
    sd = draws.std(0)
    varies = sd > 0
    return float((draws.mean(0).abs()[varies] / sd[varies]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-epochs", type=count_or_zero, default=5, help="VAE training before the measurement")
    parser.add_argument("--subset", type=positive_int, help="train on this many points only (smoke tests)")
    parser.add_argument("--batch", type=positive_int, default=16, help="test points in the fixed minibatch")
    parser.add_argument("--repeats", type=positive_int, default=200, help="R, gradients drawn per K and estimator")
    parser.add_argument("--seed", type=seed_value, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/images/gradient-snr.png"))
    args = parser.parse_args()
    if args.repeats < 2:
        parser.error(f"--repeats {args.repeats}: a signal-to-noise ratio needs the spread of two draws or more.")
    formats = FigureCanvasBase.get_supported_filetypes()
    if args.out.suffix[1:].lower() not in formats:
        parser.error(f"--out {args.out}: give a file name ending in one of .{', .'.join(sorted(formats))}")

    pyro.set_rng_seed(args.seed)
    data = pv.load_dataset("mnist", binarize="dynamic", seed=args.seed)
    if args.subset:
        try:
            data = data.quick_subset(args.subset)
        except pv.DataError as err:
            parser.error(str(err))
    if args.batch > len(data.test):
        parser.error(f"--batch {args.batch} exceeds the {len(data.test)} test points; give at most that.")
    model = pv.VAE(data.x_shape, z_dim=50, hidden=(200, 200), activation="tanh")
    # the output bias started at random, as when RESULTS's figure was measured
    pv.fit(model, data, epochs=args.train_epochs, batch_size=100, output_bias="random", seed=args.seed, progress=False)
    x = data.test.x[: args.batch]

    snr = {}
    for gradient in ("standard", "dreg"):
        for k in KS:
            draws = gradient_draws(model, x, k, gradient, args.repeats)
            snr[gradient, k] = {part: mean_snr(values) for part, values in draws.items()}
    lines = ["| estimator | part | " + " | ".join(f"K = {k}" for k in KS) + " |", "|---" * (len(KS) + 2) + "|"]
    for gradient in ("standard", "dreg"):
        for part in ("encoder", "decoder"):
            values = " | ".join(f"{snr[gradient, k][part]:.3f}" for k in KS)
            lines.append(f"| {gradient} | {part} | {values} |")
    print("\n".join(lines))

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharex=True)
    for ax, part in zip(axes, ("encoder", "decoder"), strict=True):
        for gradient, style in (("standard", "o-"), ("dreg", "s-")):
            ax.plot(KS, [snr[gradient, k][part] for k in KS], style, label="IWAE" if gradient == "standard" else "DReG")
        ax.set(xscale="log", yscale="log", xlabel="K", title=f"{part} (q)" if part == "encoder" else f"{part} (p)")
    axes[0].set_ylabel("mean SNR of the gradient's entries")
    axes[0].legend()
    fig.suptitle(f"Burda et al.'s 1-layer model after {args.train_epochs} VAE epochs; R = {args.repeats}", fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
