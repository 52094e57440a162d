"""`tfds:NAME[/CONFIG][@HxW]`: any TFDS image-classification dataset, not only the registered
ones (e.g. `tfds:oxford_flowers102@64x64`, `tfds:stl10`).

Its image shape and class count come from the builder's features (`image`, `label`); a
dataset whose images vary in size needs `@HxW` (every image resized, bilinear, when
decoded). The test split is TFDS's `test`, else its `validation`. The mean/std are computed
once from the train split's [0, 1] pixels (at the size used) and kept in
`<data_dir>/elf_jax_cache/stats/` keyed by the dataset's version, so a run reads them in
milliseconds after the first. It is read as every TFDS dataset here: prepared once as
array_record (network needed for a catalog dataset), in memory or streamed by size.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Optional

import numpy as np

from elf_jax.data.registry import DatasetInfo, split_size

PREFIX = "tfds:"


def is_tfds_any(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def _parse(name: str) -> tuple[str, Optional[tuple[int, int]]]:
    tfds_name, size = split_size(name[len(PREFIX):], name)
    if not tfds_name:
        raise ValueError(f"dataset {name!r}: give a TFDS name, e.g. tfds:oxford_flowers102@64x64")
    return tfds_name, size


def _shape_and_splits(name: str, data_dir: str):
    """(image shape, class names, splits) from the TFDS builder of `name`."""
    from elf_jax.data import tfds_source

    tfds_name, size = _parse(name)
    probe = DatasetInfo(name, (1, 1, 1), 1, (0.0,), (1.0,), source="tfds", tfds_name=tfds_name)
    try:
        tfds_source.get_builder(probe, data_dir)
    except Exception as e:  # noqa: BLE001 - TFDS raises its own kinds for unknown names
        msg = " ".join(str(e).split())[:200]
        raise ValueError(f"dataset {name!r}: TFDS has no dataset {tfds_name!r} ({msg})") from None
    builder = tfds_source.ensure_prepared(probe, data_dir)  # its splits are known once prepared
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise ValueError(f"dataset {name!r}: an image-classification dataset needs features "
                         f"'image' and 'label'; {tfds_name} has {sorted(features.keys())}")
    h, w, c = features["image"].shape
    if size is None and (h is None or w is None):
        raise ValueError(f"dataset {name!r}: its images vary in size; give one to resize them "
                         f"to, e.g. {PREFIX}{tfds_name}@64x64")
    available = set(builder.info.splits.keys())
    test = next((s for s in ("test", "validation") if s in available), None)
    if "train" not in available or test is None:
        raise ValueError(f"dataset {name!r}: needs a train split and a test or validation "
                         f"split; {tfds_name} has {sorted(available)}")
    shape = (size[0], size[1], int(c or 3)) if size else (int(h), int(w), int(c or 3))
    return (shape, tuple(features["label"].names), (("train", "train"), ("test", test)),
            str(builder.info.version))


@functools.lru_cache(maxsize=8)
def tfds_any_info(name: str, data_dir: Optional[str] = None) -> DatasetInfo:
    """The DatasetInfo of `tfds:NAME[/CONFIG][@HxW]` (prepares the dataset if it is not, and
    computes its train statistics once; see the module docstring)."""
    from elf_jax.data import tfds_source

    data_dir = tfds_source.default_data_dir(data_dir)
    tfds_name, size = _parse(name)
    shape, classes, splits, version = _shape_and_splits(name, data_dir)
    info = DatasetInfo(name, shape, len(classes), (0.0,) * shape[-1], (1.0,) * shape[-1],
                       source="tfds", tfds_name=tfds_name, splits=splits, class_names=classes,
                       resize=size, prepare_hint=f"`tfds build {tfds_name} --file_format="
                       "array_record --data_dir=<data_dir>` on a machine with network")
    mean, std = _train_stats(info, data_dir, version)
    return dataclasses.replace(info, mean=mean, std=std)


def _train_stats(info: DatasetInfo, data_dir: str, version: str) -> tuple[tuple, tuple]:
    """Per-channel mean/std of the train split's [0, 1] pixels, cached on disk."""
    from elf_jax.data import tfds_source

    key = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{info.name}_{version}")
    path = Path(data_dir) / "elf_jax_cache" / "stats" / f"{key}.json"
    if path.exists():
        stored = json.loads(path.read_text())
        return tuple(stored["mean"]), tuple(stored["std"])
    n, chunks = tfds_source.decoded_chunks(info, "train", data_dir)
    c = info.image_shape[-1]
    total, total_sq, count = np.zeros(c), np.zeros(c), 0
    for _, x, _ in chunks:
        px = x.reshape(-1, c).astype(np.float64) / 255.0
        total, total_sq, count = total + px.sum(0), total_sq + (px ** 2).sum(0), count + len(px)
    mean = total / count
    std = np.maximum(np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0)), 1e-6)
    out = (tuple(float(v) for v in mean), tuple(float(v) for v in std))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"mean": out[0], "std": out[1], "images": n}))
    except OSError:
        pass  # read-only data dir: computed again next time
    return out
