"""The embedded MNIST, binarisation, user data, and the errors bad data gets."""

import numpy as np
import pytest
import torch

import pyro_vae as pv
from pyro_vae.data import EVALUATION_BINARIZATION_SEED, binarize, binarize_once, dataset_from_spec


def test_embedded_mnist_is_complete(mnist):
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (50_000, 10_000, 10_000)
    assert mnist.x_shape == (1, 28, 28)
    all_train = torch.cat([mnist.train.y, mnist.val.y])
    assert all_train.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert 0 <= mnist.train.x.min() and mnist.train.x.max() <= 1 and len(mnist.train.x.unique()) > 2
    assert set(mnist.test.x.unique().tolist()) == {0.0, 1.0}
    assert mnist.test.y.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_test_set_binarisation_does_not_depend_on_the_run_seed(mnist):
    other = pv.load_dataset("mnist", binarize="fixed", seed=7)
    assert torch.equal(mnist.test.x, other.test.x)


def test_dynamic_batches_are_resampled(small_mnist):
    torch.manual_seed(0)
    first = next(small_mnist.batches(64, shuffle=False))
    second = next(small_mnist.batches(64, shuffle=False))
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(first, second)
    # 64 x 784 independent draws: the standard error of their mean is at most 0.0023, so 0.01 is 4.4 of them
    assert abs(float(first.mean() - small_mnist.train.x[:64].mean())) < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_dynamic_binarisation_draws_each_pixel_with_its_intensity(dtype):
    torch.manual_seed(0)
    p = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=dtype)
    draws = torch.stack([binarize(p) for _ in range(20000)])
    assert set(draws.unique().tolist()) <= {0.0, 1.0} and draws.dtype == p.dtype
    # 20,000 draws: the standard error of a frequency is at most 0.0035; 5 of them is 0.018
    assert torch.allclose(draws.double().mean(0), p.double(), atol=0.018)
    assert draws[:, 0].sum() == 0 and draws[:, 4].sum() == 20000  # 0 and 1 are exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dynamic_binarisation_draws_what_torch_bernoulli_draws(dtype):
    """From one generator state, the images of torch.bernoulli, to the pixel: one uniform a pixel, as before
    2026-12-06 (16 bits a pixel since then, until M2 from 100 labels was found stuck under them: docs/data.md)."""
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1), dtype=dtype)
    torch.manual_seed(5)
    ours = binarize(x)
    torch.manual_seed(5)
    assert torch.equal(ours, torch.bernoulli(x))


def test_dynamic_binarisation_resolves_probabilities_below_2_to_the_minus_16():
    """The 16-bit draws never turned on a pixel of intensity below 2^-17; a float32 uniform resolves 2^-24."""
    torch.manual_seed(0)
    n = 2_000_000
    # intensity 0.49 / 2^16: 14.95 ones expected (Poisson sd 3.9), so 2 to 40 is more than 3.3 sd either side
    assert 2 <= binarize(torch.full((n,), 0.49 / 2**16)).sum() <= 40
    # 1/2: the standard error of the frequency is 0.00035
    assert abs(float(binarize(torch.full((n,), 0.5)).mean()) - 0.5) < 0.002


def test_binarised_evaluation_splits_keep_the_intensities_they_were_binarised_from():
    x, y = torch.rand(60, 4), torch.arange(60) % 3
    for mode in ("dynamic", "fixed"):
        data = pv.make_dataset(x, y, binarize=mode, seed=1)
        for split in (data.val, data.test):
            assert torch.equal(split.x, binarize_once(split.intensities, EVALUATION_BINARIZATION_SEED))
            assert (split.intensities[:, None] == x).all(-1).any(-1).all()  # each a row of the data as given
            assert split.unbinarised is split.intensities
        assert data.train.intensities is None  # a classifier's training reads binarised batches
        smaller = data.subset(val=3, test=2).to("cpu")
        assert torch.equal(smaller.val.intensities, data.val.intensities[:3]) and len(smaller.test.intensities) == 2
    as_given = pv.make_dataset(x, y, binarize="none")
    assert as_given.val.intensities is None and as_given.val.unbinarised is as_given.val.x


def test_fixed_binarisation_is_seeded():
    """The same seed gives the same 0/1 draws, another seed other ones; the batches are those draws, fixed."""
    x = torch.rand(50, 4)
    a, b = (pv.make_dataset(x, binarize="fixed", seed=1) for _ in range(2))
    c = pv.make_dataset(x, binarize="fixed", seed=2)
    assert set(a.train.x.unique().tolist()) <= {0.0, 1.0}
    torch.manual_seed(0)
    assert torch.equal(next(a.batches(10, shuffle=False)), a.train.x[:10])
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.val.x, b.val.x)
    assert not torch.equal(a.train.x, c.train.x)  # 40 x 4 independent draws agreeing: chance below 1e-40


def test_user_arrays_from_npz(tmp_path):
    x = (np.random.default_rng(0).random((100, 3, 8, 8)) * 255).astype(np.uint8)
    np.savez(tmp_path / "mine.npz", x=x, y=np.arange(100) % 3)
    data = pv.load_dataset(str(tmp_path / "mine.npz"), binarize="none", val_size=10)
    assert data.x_shape == (3, 8, 8) and (len(data.train), len(data.val), len(data.test)) == (80, 10, 10)
    assert data.train.x.dtype == torch.float32
    pixels = torch.cat([data.train.x, data.val.x, data.test.x]) * 255  # uint8 pixels are scaled by 1 / 255
    assert torch.allclose(pixels, pixels.round(), atol=1e-4) and pixels.round().max() == x.max()


def test_a_data_file_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    """So that a run resumed, evaluated or compared from another folder finds it."""
    np.save(tmp_path / "mine.npy", np.zeros((30, 4), dtype=np.float32))
    monkeypatch.chdir(tmp_path)
    data = pv.load_dataset("mine.npy", binarize="none", val_size=5)
    assert data.name == "mine" and data.spec["name"] == str(tmp_path / "mine.npy")
    monkeypatch.chdir("/")
    assert len(pv.data.dataset_from_spec(data.spec).train) == 22


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"y": np.arange(99)}, r"'y' of .*mine.npz have shape \(99,\) for 100 data points"),
        ({"y": np.arange(100) + 0.5}, "'y' of .*mine.npz are not all whole numbers"),
        ({"y": np.full(100, np.nan)}, "not all whole numbers"),
        ({"x_test": np.zeros((10, 4)), "y_test": np.arange(9)}, r"'y_test' of .*have shape \(9,\) for 10 data points"),
        ({"y_test": np.arange(10)}, "has 'y_test' but no 'x_test'"),
    ],
    ids=["a label short", "fractions", "NaN", "a test label short", "test labels without test points"],
)
def test_bad_labels_in_a_file_are_refused_when_it_is_loaded(tmp_path, arrays, message):
    """Before, labels of 2.7 became 2, and a test split's labels were checked by nothing until a figure failed."""
    np.savez(tmp_path / "mine.npz", x=np.zeros((100, 4)), **arrays)
    with pytest.raises(pv.DataError, match=message):
        pv.load_dataset(str(tmp_path / "mine.npz"), binarize="none", val_size=10)


def test_bad_labels_of_tensors_are_refused_by_make_dataset():
    x = torch.zeros(50, 4)
    with pytest.raises(pv.DataError, match="labels y are not all whole numbers"):
        pv.make_dataset(x, torch.full((50,), 2.7))
    with pytest.raises(pv.DataError, match=r"labels y_test have shape \(4,\) for 5 data points"):
        pv.make_dataset(x, torch.zeros(50), x_test=torch.zeros(5, 4), y_test=torch.zeros(4))
    with pytest.raises(pv.DataError, match="y_test was given without x_test"):
        pv.make_dataset(x, torch.zeros(50), y_test=torch.zeros(4))
    assert pv.make_dataset(x, torch.full((50,), 2.0)).train.y.dtype == torch.int64  # whole floats are fine


def test_batches_cover_the_data_once():
    data = pv.make_dataset(torch.arange(375.0).unsqueeze(-1) / 375, val_size=25, test_size=50)  # distinct points
    batches = list(data.batches(128))
    assert [len(b) for b in batches] == [128, 128, 44]
    assert torch.equal(torch.cat(batches).sort(0).values, data.train.x.sort(0).values)  # each point once


# ------------------------------------------------------------- bad input


def test_grayscale_with_bernoulli_says_to_binarise(mnist):
    vae = pv.VAE((1, 28, 28), 2, hidden=(8,))
    with pytest.raises(pv.DataError, match="binarise"):
        vae.check_data(mnist.train.x[:100])


def test_nan_and_inf_are_refused():
    vae = pv.VAE((4,), 2, likelihood=pv.likelihoods.Gaussian(), hidden=(8,))
    x = torch.zeros(5, 4)
    x[3, 1] = float("nan")
    with pytest.raises(pv.DataError, match=r"1 NaN .* data point 3"):
        vae.check_data(x)
    x[3, 1] = float("inf")
    with pytest.raises(pv.DataError, match=r"holds 0 NaN and 1 infinite values \(the first in data point 3\)"):
        vae.check_data(x)
    with pytest.raises(pv.DataError, match="holds 40 NaN and 0 infinite values"):
        pv.make_dataset(torch.full((10, 4), float("nan")))


def test_finite_values_whose_sum_overflows_are_accepted_and_opposite_infinities_refused():
    """The check sums first (a NaN or an infinity makes the sum non-finite) and looks value by value only when
    the sum is not finite: large finite values whose sum overflows pass, inf and -inf (a NaN sum) do not."""
    vae = pv.VAE((4,), 2, likelihood=pv.likelihoods.Gaussian(), hidden=(8,))
    huge = torch.full((10, 4), 3e38)
    assert not torch.isfinite(huge.sum())
    vae.check_data(huge)
    x = torch.zeros(5, 4)
    x[1, 0], x[2, 2] = float("inf"), -float("inf")
    with pytest.raises(pv.DataError, match=r"0 NaN and 2 infinite values \(the first in data point 1\)"):
        vae.check_data(x)


def test_wrong_shape_is_refused():
    vae = pv.VAE((1, 28, 28), 2, hidden=(8,))
    with pytest.raises(pv.DataError, match=r"expects \(1, 28, 28\)"):
        vae.check_data(torch.zeros(3, 784))


def test_empty_data_is_refused():
    with pytest.raises(pv.DataError, match="empty"):
        pv.make_dataset(torch.zeros(0, 4))
    with pytest.raises(pv.DataError, match="empty"):
        pv.VAE((4,), 2, hidden=(8,)).check_data(torch.zeros(0, 4))


def test_binarising_data_outside_unit_interval_is_refused():
    with pytest.raises(pv.DataError, match=r"\[0, 1\]"):
        pv.make_dataset(torch.randn(20, 4), binarize="dynamic")


def test_fit_refuses_bad_data_before_training():
    data = pv.make_dataset(torch.rand(40, 1, 28, 28), binarize="none", val_size=5, test_size=5)
    vae = pv.VAE((1, 28, 28), 2, hidden=(8,))
    before = [p.detach().clone() for p in vae.parameters()]
    with pytest.raises(pv.DataError, match="binarise"):
        pv.fit(vae, data, epochs=1, progress=False)
    assert all(torch.equal(b, p) for b, p in zip(before, vae.parameters(), strict=True))


def test_too_few_points_for_a_test_split_name_the_fixes_of_python_and_the_command_line(tmp_path):
    np.save(tmp_path / "five.npy", np.random.default_rng(0).random((5, 4), dtype=np.float32))
    with pytest.raises(pv.DataError, match="Cannot hold 0 of 5 data points out; choose a test_size between 1 and 4, "
                       "or a fraction below 1; from the command line, give more points, or the test points as "
                       "'x_test' in an .npz file"):  # fmt: skip
        pv.load_dataset(str(tmp_path / "five.npy"), binarize="none", val_size=1)


def test_unknown_data_set_name():
    with pytest.raises(pv.DataError, match="Unknown data set"):
        pv.load_dataset("cifar-1000")


def test_torchvision_sets_never_download_unasked(tmp_path):
    with pytest.raises(pv.DataError, match="download"):
        pv.load_dataset("fashion-mnist", data_dir=str(tmp_path))


@pytest.mark.parametrize("n, held_out", [(200, 40), (3, 1)])
def test_a_quick_subset_keeps_a_fifth_for_validation_and_test_and_at_least_one(small_mnist, n, held_out):
    data = small_mnist.quick_subset(n)
    assert (len(data.train), len(data.val), len(data.test)) == (n, held_out, held_out)
    assert torch.equal(data.train.x, small_mnist.train.x[:n])


def test_a_subset_of_a_subset_rebuilds_from_its_spec_as_it_is(small_mnist):
    """Each call used to record only its own sizes: ``small_mnist.subset(train=200)`` rebuilt with 10,000
    validation and test points where it held 500 (runs evaluated and resumed on other points than they had)."""
    data = small_mnist.subset(train=200, test=1000)
    assert data.spec["subset"] == {"train": 200, "val": 500, "test": 500}
    rebuilt = dataset_from_spec(data.spec)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(rebuilt, split).x, getattr(data, split).x), split


@pytest.mark.parametrize("bad", [-5, 0, 2.5])
def test_a_subset_of_no_points_or_of_all_but_some_is_refused(small_mnist, bad):
    """x[:-5] keeps all but the last five: a negative size once gave nearly the whole split."""
    with pytest.raises(ValueError, match=f"subset: test must be a whole number >= 1 .*; got {bad!r}"):
        small_mnist.subset(test=bad)
    with pytest.raises(pv.DataError, match=f"--subset {bad!r}: give a whole number of training points >= 1"):
        small_mnist.quick_subset(bad)
