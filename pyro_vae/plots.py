"""Matplotlib figures of a trained VAE: reconstructions, prior samples,
learning curves and the latent space; for the semi-supervised M2, the
class-conditional samples and the style-transfer grid.

Each model lists the figures that apply to it (``model.figures``, names of
:data:`FIGURES`); :func:`save_figures` draws those. Image figures need data
shaped like images, ``(channels, height, width)`` with 1 or 3 channels, and
are skipped for other data.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .data import Dataset  # noqa: E402
from .models import VAE  # noqa: E402
from .runs.files import atomic_write_bytes  # noqa: E402


def is_image_shape(x_shape) -> bool:
    return len(x_shape) == 3 and x_shape[0] in (1, 3)


def _show_grid(ax, images: torch.Tensor, nrow: int) -> None:
    from torchvision.utils import make_grid  # imported when drawn: importing torchvision slows start-up

    grid = make_grid(images.detach().cpu().clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)
    ax.imshow(grid.permute(1, 2, 0).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()


def _save(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` (its format from the suffix) as every file of a run: whole, or not at all."""
    image = io.BytesIO()
    fig.savefig(image, format=path.suffix.lstrip("."), dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, image.getvalue())
    return path


def plot_reconstructions(vae: VAE, x: torch.Tensor, path: Path, n: int = 16) -> Path:
    """Top row: data; bottom row: the means of p(x | z) at z = loc(x)."""
    x = x[:n]
    fig, ax = plt.subplots(figsize=(n * 0.6, 1.5))
    _show_grid(ax, torch.cat([x, vae.reconstruct(x)]), nrow=len(x))
    ax.set_title("data (top) and reconstructions (bottom)", fontsize=9)
    return _save(fig, path)


def plot_samples(vae: VAE, path: Path, n: int = 64) -> Path:
    """Means of p(x | z) for z drawn from the prior."""
    fig, ax = plt.subplots(figsize=(6, 6))
    _show_grid(ax, vae.sample(n), nrow=int(n**0.5))
    ax.set_title(f"samples: mean of p(x|z), z ~ {vae.prior.name} prior", fontsize=9)
    return _save(fig, path)


def plot_samples_side_by_side(vaes: dict[str, VAE], path: Path, n: int = 36, seed: int = 0) -> Path:
    """One panel of prior samples per model, e.g. to compare priors; each panel is drawn with the same seed."""
    fig, axes = plt.subplots(1, len(vaes), figsize=(3.2 * len(vaes), 3.5), squeeze=False)
    for ax, (label, vae) in zip(axes[0], vaes.items(), strict=True):
        torch.manual_seed(seed)
        _show_grid(ax, vae.sample(n), nrow=int(n**0.5))
        ax.set_title(label, fontsize=9)
    return _save(fig, path)


def plot_learning_curves(history: list[dict], path: Path) -> Path:
    """Training objective and validation ELBO per epoch, in nats per data point."""
    fig, ax = plt.subplots(figsize=(6, 4))
    trained = [row for row in history if "train_objective" in row]
    ax.plot([r["epoch"] for r in trained], [r["train_objective"] for r in trained], label="training objective")
    ax.plot([r["epoch"] for r in history], [r["val_elbo"] for r in history], marker="o", ms=3, label="validation ELBO")
    if len(history) > 2:  # the untrained epoch 0 would flatten the rest of the curve
        low = min(min(r["val_elbo"] for r in history[1:]), min((r["train_objective"] for r in trained), default=0))
        high = max(max(r["val_elbo"] for r in history), max((r["train_objective"] for r in trained), default=low))
        ax.set_ylim(low - 0.1 * (high - low + 1), high + 0.1 * (high - low + 1))
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per data point")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


@torch.no_grad()
def plot_latent_space(vae: VAE, x: torch.Tensor, y: torch.Tensor | None, path: Path) -> Path:
    """The posterior means E_q[z | x] (``latent_means``), coloured by label; projected by PCA when z_dim > 2."""
    loc = vae.latent_means(x).cpu()
    if vae.z_dim > 2:
        centred = loc - loc.mean(0)
        _, s, v = torch.linalg.svd(centred, full_matrices=False)  # min(points, z_dim) components
        points = torch.cat([centred @ v[:2].T, torch.zeros(len(loc), max(0, 2 - len(v)))], 1)  # zeros: no 2nd PC
        variance = (s**2).sum()
        explained = (s[:2] ** 2).sum() / variance if variance > 0 else torch.tensor(1.0)  # the points coincide
        labels = ("PC 1", "PC 2")
        title = f"latent means, PCA of {vae.z_dim} dims ({100 * float(explained):.0f}% of variance)"
    else:
        points = loc if vae.z_dim == 2 else torch.cat([loc, torch.zeros_like(loc)], 1)
        labels, title = ("z1", "z2"), "latent means"
    fig, ax = plt.subplots(figsize=(6, 5))
    if y is None:
        ax.scatter(points[:, 0], points[:, 1], s=3, alpha=0.7)
    else:
        colours = y.cpu().numpy()
        scatter = ax.scatter(points[:, 0], points[:, 1], c=colours, cmap="tab10", s=3, alpha=0.7)
        fig.colorbar(scatter, ax=ax, ticks=sorted(set(colours.tolist())), label="label")
    ax.set(xlabel=labels[0], ylabel=labels[1], title=title)
    return _save(fig, path)


def plot_manifold(vae: VAE, path: Path, n: int = 20) -> Path:
    """For z_dim = 2: decoded means over a grid of the prior's quantiles (Kingma & Welling, fig. 4).

    The quantiles of each coordinate are estimated from 10,000 prior draws, so
    the grid covers where any prior, not only N(0, I), puts its mass.
    """
    if vae.z_dim != 2:
        raise ValueError("The manifold grid needs z_dim = 2.")
    with torch.no_grad():
        draws = vae.prior.sample(10_000).cpu()
    levels = torch.linspace(0.05, 0.95, n)
    q1, q2 = torch.quantile(draws[:, 0], levels), torch.quantile(draws[:, 1], levels)
    z1, z2 = torch.meshgrid(q1, q2.flip(0), indexing="xy")
    z = torch.stack([z1.reshape(-1), z2.reshape(-1)], -1).to(next(vae.parameters()).device)
    with torch.no_grad():
        images = vae.decode(z).mean
    fig, ax = plt.subplots(figsize=(7, 7))
    _show_grid(ax, images, nrow=n)
    ax.set_title(f"decoded manifold over the {vae.prior.name} prior's quantiles", fontsize=9)
    return _save(fig, path)


@torch.no_grad()
def plot_style_transfer(ssvae, x: torch.Tensor, y: torch.Tensor | None, path: Path, n: int = 10) -> Path:
    """Kingma et al. (2014), fig. 1: each row decodes one test image's style z = loc(x, y) with every class.

    The first column is the test image itself.
    """
    x = x[:n]
    transferred = ssvae.transfer_style(x, None if y is None else y[:n])  # (n, classes, *x_shape)
    rows = torch.cat([x.unsqueeze(1), transferred], dim=1).flatten(0, 1)
    fig, ax = plt.subplots(figsize=(0.6 * (ssvae.num_classes + 1), 0.6 * len(x) + 0.4))
    _show_grid(ax, rows, nrow=ssvae.num_classes + 1)
    ax.set_title("test image, then its style decoded with y = 0, 1, 2, ...", fontsize=9)
    return _save(fig, path)


@torch.no_grad()
def plot_class_conditional_samples(ssvae, path: Path, n: int = 10) -> Path:
    """Each row: one z from the prior, decoded with every class y."""
    z = ssvae.prior.sample(n)
    classes = torch.eye(ssvae.num_classes, device=z.device)
    images = ssvae.decode(z.unsqueeze(1), classes).mean.flatten(0, 1)
    fig, ax = plt.subplots(figsize=(0.6 * ssvae.num_classes, 0.6 * n + 0.4))
    _show_grid(ax, images, nrow=ssvae.num_classes)
    ax.set_title(f"one z ~ {ssvae.prior.name} prior per row, decoded with y = 0, 1, 2, ...", fontsize=9)
    return _save(fig, path)


def plot_accuracy(history: list[dict], path: Path) -> Path:
    """Validation accuracy of the classifier q(y|x) per epoch."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["epoch"] for r in history], [100 * r["val_accuracy"] for r in history], marker="o", ms=3)
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title="classifier q(y|x)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


#: Figure name -> (file name, a function (model, test split, history, path) -> path or None, needs images).
FIGURES = {
    "learning_curves": ("learning_curves.png", lambda m, test, h, p: plot_learning_curves(h, p), False),
    "accuracy": ("accuracy.png", lambda m, test, h, p: plot_accuracy(h, p), False),
    "latent_space": ("latent_space.png", lambda m, test, h, p: plot_latent_space(m, test.x, test.y, p), False),
    "reconstructions": ("reconstructions.png", lambda m, test, h, p: plot_reconstructions(m, test.x, p), True),
    "samples": ("samples.png", lambda m, test, h, p: plot_samples(m, p), True),
    "manifold": ("manifold.png", lambda m, test, h, p: plot_manifold(m, p) if m.z_dim == 2 else None, True),
    "style_transfer": ("style_transfer.png", lambda m, test, h, p: plot_style_transfer(m, test.x, test.y, p), True),
    "class_samples": ("class_samples.png", lambda m, test, h, p: plot_class_conditional_samples(m, p), True),
}


def save_figures(model, data: Dataset, history: list[dict], folder: str | Path, num_points: int = 5000) -> list[Path]:
    """Every figure the model declares (``model.figures``) that fits its data, as PNG files in ``folder``."""
    folder = Path(folder)
    model.eval()
    test = data.test.subset(num_points)
    paths = []
    for name in model.figures:
        if name not in FIGURES:
            raise ValueError(
                f"{type(model).__name__} declares the figure {name!r}, which is not one of {sorted(FIGURES)}."
            )
        filename, draw, needs_images = FIGURES[name]
        if needs_images and not is_image_shape(model.x_shape):
            continue
        path = draw(model, test, history, folder / filename)
        if path is not None:
            paths.append(path)
    return paths
