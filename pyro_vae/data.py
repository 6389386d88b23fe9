"""Data sets as in-memory tensors: the embedded MNIST, torchvision image sets
and the user's own arrays, with the binarisation a Bernoulli likelihood needs.

Every data set becomes a :class:`Dataset` with three :class:`Split` s
(``train``, ``val``, ``test``) of float tensors shaped ``(N, *x_shape)`` plus
optional integer labels. Batches are sliced from those tensors; no per-item
PIL transform is ever run.

Binarisation (a Bernoulli likelihood is a density only for binary data):

* ``"dynamic"`` -- every training batch is resampled, ``x ~ Bernoulli(pixels)``,
  as in Burda et al. (2016);
* ``"fixed"`` -- the training set is binarised once with the seed;
* ``"none"`` -- the pixels stay in [0, 1] (use a likelihood for continuous data).

Whatever the mode, the validation and test sets are binarised once with a
fixed seed (unless the mode is ``"none"``), so evaluations stay comparable
between epochs and between runs. They keep their intensities beside
(``Split.intensities``): a classifier reads the images, not one noisy
binarisation of them.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .checks import first_line, is_whole_number, whole_number

BINARIZE_MODES = ("dynamic", "fixed", "none")
TORCHVISION_DATASETS = {"fashion-mnist": "FashionMNIST", "kmnist": "KMNIST", "mnist-torchvision": "MNIST"}
DATASET_NAMES = ("mnist", *TORCHVISION_DATASETS)

#: The seed with which validation and test sets are binarised, whatever the run's seed.
EVALUATION_BINARIZATION_SEED = 0

_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "71524e2cd1ad2968737f7f2f2ff69cbfc32df8ccddff51593f7cb2d4e0eb5b64",
    "train-labels-idx1-ubyte.gz": "fe03b8bd7915f70bf5aa08be480aa413fbd85afcaa58b35d230d335f284fd88e",
    "t10k-images-idx3-ubyte.gz": "5634745efa576a17e7d4cf5cd9d09123c75e6538e5114267c2d156edaf519341",
    "t10k-labels-idx1-ubyte.gz": "ae18e77e031ccde52407f794d123116439864147d33ac992975f85dd4dc42af6",
}


class DataError(ValueError):
    """Data that cannot be used as given; the message names the fix."""


@dataclass
class Split:
    """One split of a data set: ``x`` of shape ``(N, *x_shape)``, float32; ``y`` labels or None.

    ``intensities``: the pixel intensities in [0, 1] that ``x`` was binarised from, for the validation and
    test splits of a binarised data set (what a classifier reads, :attr:`unbinarised`); None where ``x`` is
    the data as loaded.
    """

    x: torch.Tensor
    y: torch.Tensor | None = None
    intensities: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def unbinarised(self) -> torch.Tensor:
        """The points before binarisation: ``intensities`` where ``x`` was binarised once, else ``x`` itself."""
        return self.x if self.intensities is None else self.intensities

    def to(self, device) -> Split:
        return Split(*(None if t is None else t.to(device) for t in (self.x, self.y, self.intensities)))

    def subset(self, n: int) -> Split:
        """The first ``n`` points (all of them when ``n`` is None or larger)."""
        return Split(*(None if t is None else t[:n] for t in (self.x, self.y, self.intensities)))


@dataclass
class Dataset:
    """A data set held in memory, split three ways, with its binarisation mode."""

    name: str
    train: Split
    val: Split
    test: Split
    binarize: str = "none"
    #: How to load this data set again (the arguments of :func:`load_dataset`); None for user tensors.
    spec: dict | None = None

    @property
    def x_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def to(self, device) -> Dataset:
        return replace(self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device))

    def subset(self, train: int | None = None, val: int | None = None, test: int | None = None) -> Dataset:
        """A smaller copy, for smoke tests and quick experiments: the first ``train``, ``val`` and ``test`` points of
        each split (None keeps a split whole). The spec records the subset, so the copy rebuilds as it is, a subset
        of a subset included."""
        wanted = {"train": train, "val": val, "test": test}
        for split, n in wanted.items():
            if n is not None:
                whole_number(n, f"subset: {split}", note="(None keeps the split)")
        spec = None
        if self.spec is not None:
            before = self.spec.get("subset") or {}
            wanted = {split: None if n is None else int(n) for split, n in wanted.items()}  # JSON holds Python's ints
            spec = {**self.spec, "subset": {split: _first_of(before.get(split), n) for split, n in wanted.items()}}
        return replace(
            self, train=self.train.subset(train), val=self.val.subset(val), test=self.test.subset(test), spec=spec
        )

    def quick_subset(self, n: int) -> Dataset:
        """The first ``n`` training points and ``n // 5`` (at least one) validation and test points: ``--subset N``.

        Raises :class:`DataError` when the training split holds fewer than ``n`` points.
        """
        if not is_whole_number(n) or n < 1:
            raise DataError(f"--subset {n!r}: give a whole number of training points >= 1.")
        if n > len(self.train):
            raise DataError(
                f"--subset {n} exceeds the {len(self.train)} training points of {self.name}; give at most "
                f"{len(self.train)}, or leave --subset out to train on all of them."
            )
        return self.subset(train=n, val=max(n // 5, 1), test=max(n // 5, 1))

    def batches(self, batch_size: int, *, shuffle: bool = True) -> Iterator[torch.Tensor]:
        """Training batches sliced from memory (global torch RNG); dynamically binarised when the mode says so."""
        n = len(self.train)
        order = (
            torch.randperm(n, device=self.train.x.device) if shuffle else torch.arange(n, device=self.train.x.device)
        )
        for start in range(0, n, batch_size):
            yield self.batch(order[start : start + batch_size])

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        """The training points at ``indices`` (a 1-D integer tensor), dynamically binarised when the mode says so."""
        batch = self.train.x.index_select(0, indices)  # x[indices], faster (benchmarks/RESULTS.md, "Training speed")
        return binarize(batch) if self.binarize == "dynamic" else batch


def _first_of(before: int | None, n: int | None) -> int | None:
    """How many points the first ``n`` of the first ``before`` points are (None: all of them)."""
    return n if before is None else before if n is None else min(before, n)


def check_finite_and_nonempty(x: torch.Tensor, what: str = "data") -> None:
    """Refuse empty data and data holding NaN or inf, naming the problem."""
    if x.ndim == 0 or x.shape[0] == 0:
        raise DataError(f"The {what} is empty (shape {tuple(x.shape)}): give at least one data point.")
    if not torch.is_floating_point(x):
        raise DataError(f"The {what} has dtype {x.dtype}; convert it to a floating-point tensor.")
    if torch.isfinite(x.sum()):  # one NaN or infinity makes the sum NaN or infinite, whatever the order
        return
    bad = ~torch.isfinite(x)  # the sum overflowed, or some value is not finite
    if bad.any():
        nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        first = int(bad.reshape(x.shape[0], -1).any(-1).nonzero()[0])
        raise DataError(
            f"The {what} holds {nan} NaN and {inf} infinite values (the first in data point {first}). "
            "Remove or impute them before training."
        )


def check_unit_interval(x: torch.Tensor) -> None:
    """Binarisation reads values as Bernoulli probabilities: refuse anything outside [0, 1]."""
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise DataError(
            f"Binarisation needs values in [0, 1]; the data spans [{float(x.min()):g}, {float(x.max()):g}]. "
            "Rescale it to [0, 1], or use binarize='none' (--binarize none) with a likelihood for real-valued data "
            "(gaussian)."
        )


def binarize(x: torch.Tensor) -> torch.Tensor:
    """A fresh binarisation of intensities in [0, 1]: x_bin = 1 where u < x, one uniform u per pixel.

    The distribution of ``torch.bernoulli(x)``, and on CPU its very draws: each pixel takes one uniform of
    the generator (24 random bits in float32, 53 in float64; float16 pixels are compared with float32
    uniforms), and the comparison writes into the uniforms' floats. Why not fewer random bits a pixel:
    docs/data.md, "Binarisation".
    """
    uniforms = torch.rand_like(x, dtype=torch.promote_types(x.dtype, torch.float32))
    return torch.lt(uniforms, x, out=uniforms) if uniforms.dtype == x.dtype else (uniforms < x).to(x.dtype)


def binarize_once(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Binarise pixel intensities in [0, 1] once: ``x_bin ~ Bernoulli(x)`` with a fixed seed."""
    check_unit_interval(x)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    return torch.bernoulli(x, generator=generator)


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzip-compressed IDX file (the MNIST format): big-endian header, then raw uint8."""
    raw = gzip.decompress(path.read_bytes())
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file; replace it with the original.")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != math.prod(dims):
        raise DataError(f"{path} is truncated: its header promises {dims} but the file is shorter.")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _embedded_mnist() -> tuple[Split, Split]:
    root = resources.files("pyro_vae") / "datasets" / "mnist"
    arrays = {}
    for filename, sha256 in _MNIST_FILES.items():
        path = Path(str(root / filename))
        if not path.exists():
            raise DataError(f"The embedded MNIST file {filename} is missing from {path.parent}; reinstall pyro-vae.")
        if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
            raise DataError(f"The embedded MNIST file {path} is corrupt (sha256 mismatch); reinstall pyro-vae.")
        arrays[filename] = _read_idx(path)

    def split(prefix: str) -> Split:
        images = torch.from_numpy(arrays[f"{prefix}-images-idx3-ubyte.gz"].copy())
        labels = torch.from_numpy(arrays[f"{prefix}-labels-idx1-ubyte.gz"].astype(np.int64))
        return Split(images.unsqueeze(1).float().div_(255.0), labels)

    return split("train"), split("t10k")


def _torchvision(name: str, data_dir: str | None, download: bool) -> tuple[Split, Split]:
    import torchvision

    if data_dir is None:
        raise DataError(f"Data set {name!r} is served by torchvision: give its folder with data_dir= (--data-dir).")
    cls = getattr(torchvision.datasets, TORCHVISION_DATASETS[name])
    splits = []
    for train in (True, False):
        try:
            ds = cls(root=data_dir, train=train, download=download)
        except RuntimeError as err:
            fix = (
                "The download failed: check the network, or put the data set's files there yourself."
                if download
                else "If its files moved, give their folder with data_dir= (--data-dir); else pass download=True "
                "(--download) to fetch them, which needs a network."
            )
            raise DataError(f"{name} was not found under {data_dir} ({first_line(err)}). {fix}") from err
        splits.append(Split(ds.data.unsqueeze(1).float().div_(255.0), ds.targets.long()))
    return splits[0], splits[1]


def _as_float(array) -> torch.Tensor:
    """Data as float32: uint8 is read as pixels and scaled to [0, 1]; booleans, integers and floats as numbers."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype.kind not in "buif":
        raise DataError(
            f"Data of dtype {array.dtype} cannot be modelled; give numbers (uint8 pixels, integers or floats)."
        )
    x = torch.from_numpy(np.ascontiguousarray(array))
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


NUMPY_MAGIC = b"\x93NUMPY"  # how every .npy file starts; an .npz is a zip archive of them


def load_numpy(path: Path, fix: str, error: type[Exception] = DataError) -> np.ndarray | dict[str, np.ndarray]:
    """The array of a ``.npy`` file, or the arrays of an ``.npz`` by name, read without pickle (``allow_pickle=False``).

    A file that is not one, is cut short, or holds object arrays (which only pickle can read) raises ``error``
    naming the file and ``fix``.
    """
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(len(NUMPY_MAGIC))
    if head != NUMPY_MAGIC and not zipfile.is_zipfile(path):
        raise error(f"{path} is not a NumPy .npy or .npz file (corrupt, or another kind of file); {fix}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded:
            return {key: loaded[key] for key in loaded.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise error(f"{path} could not be read as NumPy arrays without pickle ({first_line(err)}); {fix}") from err


def _from_file(path: Path) -> tuple[Split, Split | None]:
    """A ``.npy`` array of data points, or an ``.npz`` with ``x`` [``y``, ``x_test``, ``y_test``]."""
    if not path.exists():
        raise DataError(f"Data file {path} does not exist; give the path of a .npy or .npz file, or a dataset name.")
    fix = "give an array saved by numpy.save, or arrays by numpy.savez, of numbers (not objects)."
    loaded = load_numpy(path, fix)
    if isinstance(loaded, np.ndarray):
        return Split(_as_float(loaded)), None
    keys = set(loaded)
    if "x" not in keys:
        raise DataError(
            f"{path} has arrays {sorted(keys)}; it needs one named 'x' (and optionally 'y', 'x_test', 'y_test')."
        )
    if "y_test" in keys and "x_test" not in keys:
        raise DataError(f"{path} has 'y_test' but no 'x_test'; add the test points, or leave both out.")

    def split(points: str, labels: str) -> Split:
        x = _as_float(loaded[points])
        return Split(x, _labels(loaded[labels], x, f"'{labels}' of {path}") if labels in keys else None)

    return split("x", "y"), split("x_test", "y_test") if "x_test" in keys else None


def _labels(values, points: torch.Tensor, what: str) -> torch.Tensor:
    """Class labels as integers: refused, naming the fix, unless one whole number per point."""
    y = torch.as_tensor(np.asarray(values))
    if y.ndim != 1 or len(y) != len(points):
        raise DataError(
            f"The labels {what} have shape {tuple(y.shape)} for {len(points)} data points; give one integer label "
            "per point."
        )
    if (
        y.dtype == torch.bool
        or y.is_complex()
        or (y.dtype.is_floating_point and not (torch.isfinite(y).all() and torch.equal(y, y.round())))
    ):
        raise DataError(f"The labels {what} are not all whole numbers; give class indices 0, 1, 2, ...")
    return y.long()


def _split_off(split: Split, n: int, seed: int, setting: str, instead: str = "") -> tuple[Split, Split]:
    """Hold ``n`` random points (seeded) out of ``split``: returns (rest, held_out); ``setting`` names the size,
    ``instead`` the other fixes."""
    if not 0 < n < len(split):
        raise DataError(
            f"Cannot hold {n} of {len(split)} data points out; choose a {setting} between 1 and {len(split) - 1}, "
            f"or a fraction below 1{instead}."
        )
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    rest, held = order[n:], order[:n]
    pick = lambda idx: Split(split.x[idx], None if split.y is None else split.y[idx])  # noqa: E731
    return pick(rest), pick(held)


def make_dataset(
    x,
    y=None,
    *,
    x_test=None,
    y_test=None,
    name: str = "user",
    binarize: str = "none",
    val_size: int | float = 0.1,
    test_size: int | float = 0.1,
    seed: int = 0,
) -> Dataset:
    """A :class:`Dataset` from the user's own tensors or arrays.

    ``x`` has shape ``(N, *x_shape)``; uint8 arrays are read as pixels and scaled
    to [0, 1]. Without ``x_test`` a test split of ``test_size`` is held out;
    sizes below 1 are fractions.
    """
    if y_test is not None and x_test is None:
        raise DataError("y_test was given without x_test; pass the test points too, or neither.")
    x = _as_float(x)
    train = Split(x, None if y is None else _labels(y, x, "y"))
    if x_test is not None:
        x_test = _as_float(x_test)
    test = None if x_test is None else Split(x_test, None if y_test is None else _labels(y_test, x_test, "y_test"))
    return _assemble(name, train, test, binarize=binarize, val_size=val_size, test_size=test_size, seed=seed)


def _assemble(name, train: Split, test: Split | None, *, binarize, val_size, test_size, seed) -> Dataset:
    if binarize not in BINARIZE_MODES:
        raise DataError(f"Unknown binarisation {binarize!r}; choose one of {BINARIZE_MODES}.")
    check_finite_and_nonempty(train.x, "training data")
    if train.x.ndim < 2:
        raise DataError(
            f"Data must have shape (N, *x_shape) with at least one data dimension; got {tuple(train.x.shape)}."
        )
    as_count = lambda size, n: int(round(size * n)) if size < 1 else int(size)  # noqa: E731
    if test is None:
        instead = "; from the command line, give more points, or the test points as 'x_test' in an .npz file"
        train, test = _split_off(train, as_count(test_size, len(train)), seed + 1, "test_size", instead)
    elif tuple(test.x.shape[1:]) != tuple(train.x.shape[1:]):
        raise DataError(
            f"Test points have shape {tuple(test.x.shape[1:])} but training points {tuple(train.x.shape[1:])}."
        )
    check_finite_and_nonempty(test.x, "test data")
    train, val = _split_off(train, as_count(val_size, len(train)), seed, "val_size (pyro-vae train --val-size)")
    if binarize != "none":
        if binarize == "fixed":
            train = Split(binarize_once(train.x, seed), train.y)
        else:  # dynamic: resampled per batch, so only the range is checked here
            check_unit_interval(train.x)
        val = Split(binarize_once(val.x, EVALUATION_BINARIZATION_SEED), val.y, intensities=val.x)
        test = Split(binarize_once(test.x, EVALUATION_BINARIZATION_SEED), test.y, intensities=test.x)
    return Dataset(name, train, val, test, binarize)


#: The suffixes of the data files :func:`load_dataset` reads (NumPy's).
DATA_FILE_SUFFIXES = (".npy", ".npz")


def is_data_file(name: str | Path) -> bool:
    """Whether a data set's name is the path of a data file, not the name of a known data set."""
    return Path(name).suffix in DATA_FILE_SUFFIXES


def load_dataset(
    name: str = "mnist",
    *,
    binarize: str = "dynamic",
    val_size: int | float = 10_000,
    seed: int = 0,
    data_dir: str | None = None,
    download: bool = False,
) -> Dataset:
    """Load a data set into memory, split into train / validation / test.

    :param name: ``"mnist"`` (the embedded copy, no network), a torchvision set
        (``"fashion-mnist"``, ``"kmnist"``, ``"mnist-torchvision"``, read from
        ``data_dir``), or the path of a ``.npy`` / ``.npz`` file.
    :param binarize: ``"dynamic"``, ``"fixed"`` or ``"none"`` (see the module docstring).
    :param val_size: points held out of training for validation (a count, or a fraction if below 1).
    :param seed: seeds the validation split and fixed binarisation.
    :param download: let torchvision fetch a missing data set (needs a network).
    """
    path, spec_name = Path(name), name
    if name == "mnist":
        train, test = _embedded_mnist()
    elif name in TORCHVISION_DATASETS:
        train, test = _torchvision(name, data_dir, download)
    elif is_data_file(path):
        train, test = _from_file(path)
        name, spec_name = path.stem, str(path.resolve())  # a run resumed from another folder finds it
    else:
        raise DataError(f"Unknown data set {name!r}; use one of {DATASET_NAMES} or the path of a .npy/.npz file.")
    dataset = _assemble(name, train, test, binarize=binarize, val_size=val_size, test_size=0.1, seed=seed)
    data_dir = None if data_dir is None else str(Path(data_dir).resolve())
    dataset.spec = {"name": spec_name, "binarize": binarize, "val_size": val_size, "seed": seed, "data_dir": data_dir}
    return dataset


def dataset_from_spec(spec: dict) -> Dataset:
    """Load the data set that :attr:`Dataset.spec` describes (as a run's config records it)."""
    spec = dict(spec)
    subset = spec.pop("subset", None)
    dataset = load_dataset(**spec)
    return dataset.subset(**subset) if subset else dataset
