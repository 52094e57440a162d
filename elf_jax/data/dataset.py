"""`ArrayDataset` (an in-memory split) and input checks."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from elf_jax.data.zca import ZCA


def check_images(images, image_shape=None, *, what: str = "images") -> None:
    """Raise ValueError unless `images` is a float NHWC batch of normalized images.

    Catches the usual mistakes: NCHW instead of NHWC, a single image without batch axis,
    integer (raw 0..255) pixels, NaN/Inf, values far outside the normalized range.
    """
    shape = tuple(np.shape(images))
    if len(shape) != 4:
        raise ValueError(
            f"{what} must be a batch [N, H, W, C] (NHWC), got shape {shape}"
            + ("; add a batch axis (x[None])" if len(shape) == 3 else ""))
    if image_shape is not None and shape[1:] != tuple(image_shape):
        h, w, c = image_shape
        hint = ""
        if shape[1:] == (c, h, w):
            hint = " (looks like NCHW: transpose with x.transpose(0, 2, 3, 1))"
        raise ValueError(f"{what} have shape {shape}, expected [N, {h}, {w}, {c}]{hint}")
    dtype = np.dtype(getattr(images, "dtype", np.asarray(images).dtype))
    if not np.issubdtype(dtype, np.floating) and dtype.name != "bfloat16":
        raise ValueError(
            f"{what} have dtype {dtype}; expected float images in normalized space (divide "
            "uint8 pixels by 255 and apply the dataset's mean/std, e.g. "
            "dataset.from_unit(x / 255.0))")
    a = np.asarray(images, np.float32)
    if a.size:
        if not np.isfinite(a).all():
            raise ValueError(f"{what} contain NaN or Inf")
        m = float(np.abs(a).max())
        if m > 50.0:
            raise ValueError(
                f"{what} reach |x| = {m:.1f}; normalized images are O(1) (raw 0..255 pixels? "
                "use dataset.from_unit(x / 255.0))")


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
    """One split of a dataset in memory.

    images: float32 [N, H, W, C] in normalized space: ((x01 - mean) / std) when `normalized`,
    then ZCA when `zca` is set (x01 = pixels in [0, 1]). labels: int32 [N].
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    mean: tuple
    std: tuple
    image_shape: tuple
    class_names: Optional[tuple] = None
    split: Optional[str] = None
    normalized: bool = True
    zca: Optional[ZCA] = None

    def __post_init__(self):
        x, y = self.images, self.labels
        if not isinstance(x, np.ndarray) or x.dtype != np.float32:
            raise ValueError(f"ArrayDataset images must be a float32 numpy array, got "
                             f"{type(x).__name__} {getattr(x, 'dtype', None)}")
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.image_shape):
            raise ValueError(f"ArrayDataset images have shape {x.shape}, expected "
                             f"[N, {', '.join(map(str, self.image_shape))}]")
        if not isinstance(y, np.ndarray) or y.dtype != np.int32 or y.shape != (x.shape[0],):
            raise ValueError(f"ArrayDataset labels must be int32 [{x.shape[0]}], got "
                             f"{getattr(y, 'dtype', None)} {getattr(y, 'shape', None)}")
        if y.size and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}), got "
                             f"[{y.min()}, {y.max()}]")
        c = self.image_shape[-1]
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(f"mean/std need {c} channels, got {self.mean}, {self.std}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def from_unit(self, x01):
        """Map images with pixels in [0, 1] into this dataset's space (normalize, then ZCA)."""
        xp = _xp(x01)
        x = x01
        if self.normalized:
            x = (x - xp.asarray(self.mean, x.dtype)) / xp.asarray(self.std, x.dtype)
        if self.zca is not None:
            x = self.zca.apply(x)
        return x

    def to_unit(self, x):
        """Inverse of `from_unit`: images of this dataset's space -> pixels ~[0, 1] (for saving
        and visualizing; not clipped)."""
        xp = _xp(x)
        if self.zca is not None:
            x = self.zca.invert(x)
        if self.normalized:
            x = x * xp.asarray(self.std, x.dtype) + xp.asarray(self.mean, x.dtype)
        return x

    def check(self, images, what: str = "images") -> None:
        check_images(images, self.image_shape, what=what)

    @property
    def role(self) -> Optional[str]:
        """The name of what these rows are ("train", "validation", "test")."""
        return self.split

    def subset(self, indices) -> "ArrayDataset":
        idx = np.asarray(indices)
        return dataclasses.replace(self, images=self.images[idx], labels=self.labels[idx])


def _xp(x):
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np
    import jax.numpy as jnp

    return jnp
