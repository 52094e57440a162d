"""ZCA whitening as the reference computes it (kornia `ZCAWhitening(eps=0.1)`).

kornia: flatten every image to a row of X [N, D]; mu = mean over rows; cov = (X-mu)^T (X-mu)
/ (N-1) (unbiased); U, S = SVD(cov); T = U diag(1/sqrt(S+eps)) U^T; T_inv = U diag(sqrt(S+eps))
U^T; whiten(x) = (x - mu) T, unwhiten(z) = z T_inv + mu. We flatten NHWC instead of kornia's
NCHW; ZCA commutes with permuting the flattened coordinates, so the result is the same
transform. The reference fits ZCA on the *un-normalized* [0, 1] train images (MTT/ELF
`get_dataset` uses `ToTensor()` only when `--zca`), then applies it to train, test and (in
`distill.py`) the images used to initialize the synthetic set.

We fit in float64 (covariance accumulated in chunks) with `eigh` (cov is symmetric PSD, so
eigh equals the SVD); the stored matrices are float32.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Optional

import numpy as np

DEFAULT_EPS = 0.1


@dataclasses.dataclass(frozen=True, eq=False)
class ZCA:
    """A fitted ZCA transform for images of shape `image_shape` (H, W, C)."""

    mean: np.ndarray  # [D] float32
    transform: np.ndarray  # [D, D] float32, symmetric
    inverse_transform: np.ndarray  # [D, D] float32
    eps: float
    image_shape: tuple
    name: str = ""

    def _check(self, x):
        if tuple(x.shape[1:]) != tuple(self.image_shape):
            raise ValueError(
                f"ZCA was fitted on images of shape {tuple(self.image_shape)} (H, W, C), got "
                f"a batch of shape {tuple(x.shape)}; expected [N, "
                f"{', '.join(map(str, self.image_shape))}]")

    def apply(self, x):
        """Whiten a batch [N, H, W, C]; numpy in -> numpy out, jax in -> jax out."""
        self._check(x)
        xp = _xp(x)
        n = x.shape[0]
        flat = x.reshape(n, -1) - xp.asarray(self.mean, dtype=x.dtype)
        return (flat @ xp.asarray(self.transform, dtype=x.dtype)).reshape(x.shape)

    __call__ = apply

    def invert(self, z):
        """Inverse of `apply` (maps whitened images back to the space ZCA was fitted in)."""
        self._check(z)
        xp = _xp(z)
        n = z.shape[0]
        flat = z.reshape(n, -1) @ xp.asarray(self.inverse_transform, dtype=z.dtype)
        return (flat + xp.asarray(self.mean, dtype=z.dtype)).reshape(z.shape)

    def save(self, path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
        np.savez(tmp, mean=self.mean, transform=self.transform,
                 inverse_transform=self.inverse_transform, eps=np.float64(self.eps),
                 image_shape=np.asarray(self.image_shape, np.int64), name=np.str_(self.name))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "ZCA":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no ZCA file at {path}")
        with np.load(path) as z:
            return cls(mean=z["mean"], transform=z["transform"],
                       inverse_transform=z["inverse_transform"], eps=float(z["eps"]),
                       image_shape=tuple(int(v) for v in z["image_shape"]),
                       name=str(z["name"]))


def _xp(x):
    if isinstance(x, np.ndarray):
        return np
    import jax.numpy as jnp

    return jnp


def fit_zca(images, eps: float = DEFAULT_EPS, *, name: str = "", chunk: int = 4096) -> ZCA:
    """Fit ZCA on `images` [N, H, W, C] (kornia ZCAWhitening, unbiased covariance)."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"fit_zca expects images [N, H, W, C], got shape {images.shape}")
    n = images.shape[0]
    if n < 2:
        raise ValueError("fit_zca needs at least 2 images")
    flat = images.reshape(n, -1)
    d = flat.shape[1]
    mean = flat.mean(axis=0, dtype=np.float64)
    cov = np.zeros((d, d), np.float64)
    for i in range(0, n, chunk):
        c = flat[i:i + chunk].astype(np.float64) - mean
        cov += c.T @ c
    cov /= float(n - 1)
    s, u = np.linalg.eigh(cov)
    s = np.clip(s, 0.0, None)  # tiny negative round-off on a PSD matrix
    t = (u * (1.0 / np.sqrt(s + eps))) @ u.T
    t_inv = (u * np.sqrt(s + eps)) @ u.T
    return ZCA(mean=mean.astype(np.float32), transform=t.astype(np.float32),
               inverse_transform=t_inv.astype(np.float32), eps=float(eps),
               image_shape=tuple(images.shape[1:]), name=name)


def fingerprint(images) -> str:
    """Short content hash of an image array (shape + a strided sample of the bytes)."""
    a = np.ascontiguousarray(images)
    h = hashlib.sha1(str((a.shape, str(a.dtype))).encode())
    flat = a.reshape(-1)
    step = max(1, flat.size // 1_000_000)
    h.update(np.ascontiguousarray(flat[::step]).tobytes())
    return h.hexdigest()[:12]


def default_cache_dir(data_dir=None) -> Path:
    if data_dir is not None:
        return Path(data_dir) / "elf_jax_cache" / "zca"
    env = os.environ.get("ELF_JAX_CACHE")
    if env:
        return Path(env) / "zca"
    return Path.home() / ".cache" / "elf_jax" / "zca"


def zca_for(name: str, train_images, *, eps: float = DEFAULT_EPS, cache_dir=None,
            data_dir=None, tag: str = "") -> ZCA:
    """ZCA fitted on `train_images`, loaded from / saved to an npz cache keyed by the dataset
    name, `tag` (e.g. the normalization), eps and a fingerprint of the train images."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(data_dir)
    safe = name.replace("/", "_")
    key = f"{safe}{'_' + tag if tag else ''}_eps{eps:g}_{fingerprint(train_images)}.npz"
    path = cache_dir / key
    if path.exists():
        try:
            z = ZCA.load(path)
            if tuple(z.image_shape) == tuple(np.shape(train_images)[1:]) and z.eps == eps:
                return z
        except Exception:  # corrupt cache: refit and overwrite
            pass
    z = fit_zca(train_images, eps, name=name)
    try:
        z.save(path)
    except OSError:
        pass  # read-only cache dir: still usable in memory
    return z


def load_zca_cached(path) -> Optional[ZCA]:
    return ZCA.load(path) if Path(path).exists() else None
