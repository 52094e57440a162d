"""Datasets, normalization, ZCA, class-indexed sampling and grain input pipelines.

    from elf_jax.data import load, ClassIndex
    train = load("mnist5k", "train")            # offline, 4,000 real MNIST images
    idx = ClassIndex(train)
    x = idx.sample_class(jax.random.key(0), 3, 64)

`open_split(name, split)` is `load` for splits of any size: in memory when they fit
(`stream_above_gb`), else a `StreamedSplit` read from its files on demand (`class_index`
samples either kind). See `list_datasets()`; `dataset_info(name)` gives shapes/classes/mean/std without loading.
"""

from elf_jax.data.api import load, resolve_info
from elf_jax.data.dataset import ArrayDataset, check_images
from elf_jax.data.registry import (IMAGENET_SUBSETS, DatasetInfo, canonical_name, dataset_info,
                                   list_datasets)
from elf_jax.data.stream import StreamedSplit, is_streamed, open_split
from elf_jax.data.zca import ZCA, fit_zca, zca_for

__all__ = [
    "load", "open_split", "StreamedSplit", "is_streamed", "resolve_info", "ArrayDataset",
    "check_images", "DatasetInfo", "dataset_info", "list_datasets", "canonical_name", "IMAGENET_SUBSETS", "ZCA", "fit_zca", "zca_for",
    "ClassIndex", "StreamedClassIndex", "class_index", "StreamingClassSampler", "make_loader",
    "DatasetNotPreparedError",
]


def __getattr__(name):  # lazy: keeps `import elf_jax.data` free of jax/tfds/grain imports
    if name in ("ClassIndex", "StreamedClassIndex", "class_index", "StreamingClassSampler",
                "make_loader"):
        from elf_jax.data import sampler

        return getattr(sampler, name)
    if name == "DatasetNotPreparedError":
        from elf_jax.data.tfds_source import DatasetNotPreparedError

        return DatasetNotPreparedError
    raise AttributeError(f"module 'elf_jax.data' has no attribute {name!r}")
