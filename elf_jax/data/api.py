"""`load(name, split)`: one split of a dataset, in memory, normalized (and ZCA-whitened)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

import numpy as np

from elf_jax.data import embedded, folder, tfds_any
from elf_jax.data.dataset import ArrayDataset
from elf_jax.data.registry import DatasetInfo, dataset_info
from elf_jax.data.zca import DEFAULT_EPS, zca_for


def resolve_info(name: str, *, stats: str = "dc", image_size=None, data_dir=None) -> DatasetInfo:
    """What is known of dataset `name` (registered, `folder:PATH`, `tfds:NAME`) without
    loading it. `data_dir`: where a `tfds:` dataset is prepared (its statistics are computed
    from it once)."""
    if folder.is_folder(name) or tfds_any.is_tfds_any(name):
        if image_size is not None:
            raise ValueError(f"image_size: give the size in the name, {name}@HxW")
        if folder.is_folder(name):  # a researcher's own images (elf_jax.data.folder)
            return folder.folder_info(name)
        return tfds_any.tfds_any_info(name, None if data_dir is None else str(data_dir))
    info = dataset_info(name, stats=stats)
    if info.name == "digits":
        s = embedded._check_digits_size(image_size)
        mean, std = embedded.digits_stats(s)
        info = dataclasses.replace(info, image_shape=(s, s, 1), mean=mean, std=std)
    elif image_size is not None and image_size != info.image_shape[0]:
        raise ValueError(f"image_size={image_size} is only supported for 'digits'; "
                         f"{info.name} is {info.image_shape[0]}px")
    return info


def _array_cache_path(info: DatasetInfo, split: str, data_dir) -> Path:
    from elf_jax.data.tfds_source import default_data_dir

    return Path(default_data_dir(data_dir)) / "elf_jax_cache" / "arrays" / (
        f"{info.name.replace('/', '_')}_{split}.npz")


def load_unit(info: DatasetInfo, split: str, *, data_dir=None, download: bool = True,
              manual_dir=None, limit: Optional[int] = None, cache: bool = True):
    """Images in [0, 1] (float32 NHWC) and int32 labels, before normalization."""
    if info.source == "folder":
        x, y = folder.load_folder(info.name, split)
        return (x[:limit], y[:limit]) if limit is not None else (x, y)
    if info.source == "embedded":
        if info.name == "mnist5k":
            x, y = embedded.load_mnist5k(split)
        else:
            x, y = embedded.load_digits(split, info.image_shape[0])
        if limit is not None:
            x, y = x[:limit], y[:limit]
        return x, y
    from elf_jax.data import tfds_source

    info.tfds_split(split)  # validate the split name early
    path = _array_cache_path(info, split, data_dir)
    if cache and limit is None and path.exists():
        with np.load(path) as z:
            u8, y = z["images"], z["labels"]
    else:
        u8, y = tfds_source.read_split(info, split, data_dir, download=download,
                                       manual_dir=manual_dir, limit=limit)
        if cache and limit is None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
                np.savez(tmp, images=u8, labels=y)
                os.replace(tmp, path)
            except OSError:
                pass
    return u8.astype(np.float32) / np.float32(255.0), y.astype(np.int32)


def load(name: str, split: str = "train", *, data_dir=None, zca: bool = False,
         normalize: Optional[bool] = None, download: bool = True, manual_dir=None,
         stats: str = "dc", image_size: Optional[int] = None, limit: Optional[int] = None,
         cache: bool = True, zca_eps: float = DEFAULT_EPS, zca_cache_dir=None) -> ArrayDataset:
    """Load one split of dataset `name` into memory.

    Args:
      name: see `list_datasets()`; embedded `mnist5k` and `digits` work offline.
      split: "train" or "test" (TFDS slicing like "train[:10%]" is accepted for TFDS data).
      data_dir: TFDS data dir (default $ELF_JAX_DATA_DIR, $TFDS_DATA_DIR or
        ~/tensorflow_datasets). Caches (decoded arrays, ZCA) live under
        `<data_dir>/elf_jax_cache/`.
      zca: whiten with ZCA fitted on the train split (kornia ZCAWhitening, eps `zca_eps`),
        cached on disk. The fitted transform is `dataset.zca` (apply it to synthetic images;
        `dataset.to_unit` inverts it).
      normalize: apply (x - mean) / std to the [0, 1] pixels. Default: True without ZCA and
        False with ZCA, as the reference (with `--zca` it fits ZCA on [0, 1] images).
      download: allow downloading/preparing a missing TFDS dataset.
      manual_dir: where manually downloaded files are (tiny_imagenet, ImageNet subsets).
      stats: "dc" (default) or "mtt" mean/std (differ only for cifar100).
      image_size: digits only: 8 (default), 16 or 32.
      limit: keep only the first `limit` examples (quick experiments).
      cache: keep decoded uint8 arrays of TFDS splits as npz for fast reloads.
    """
    if normalize is None:
        normalize = not zca
    info = resolve_info(name, stats=stats, image_size=image_size, data_dir=data_dir)
    kw = dict(data_dir=data_dir, download=download, manual_dir=manual_dir, cache=cache)
    x, y = load_unit(info, split, limit=limit, **kw)
    mean = np.asarray(info.mean, np.float32)
    std = np.asarray(info.std, np.float32)
    if normalize:
        x = (x - mean) / std
    zobj = None
    if zca:
        if split == "train" and limit is None:
            xt = x
        else:
            xt, _ = load_unit(info, "train", **kw)
            if normalize:
                xt = (xt - mean) / std
        zobj = zca_for(info.name, xt, eps=zca_eps, cache_dir=zca_cache_dir,
                       data_dir=data_dir if info.source not in ("embedded", "folder") else None,
                       tag=("norm" if normalize else "unit") + f"_{info.image_shape[0]}px"
                       + (f"_{stats}" if normalize else ""))
        x = zobj.apply(x)
    return ArrayDataset(
        images=np.ascontiguousarray(x, dtype=np.float32), labels=y, num_classes=info.num_classes,
        name=info.name, mean=tuple(float(v) for v in info.mean),
        std=tuple(float(v) for v in info.std), image_shape=tuple(info.image_shape),
        class_names=info.class_names, split=split, normalized=bool(normalize), zca=zobj)
