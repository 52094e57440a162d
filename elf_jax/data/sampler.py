"""Class-indexed sampling and the grain input pipeline.

* `ClassIndex(dataset)`: the whole split on the device; `sample_class(key, c, n)` draws n
  distinct images of class c uniformly (the reference: `np.random.permutation(
  indices_class[c])[:n]`). Jittable: `c` may be traced, `n` is static; `sample_class(
  index.arrays, key, c, n)` is the same draw as a pure function (distillation steps).
* `StreamedClassIndex(split)`: the same draws for a `StreamedSplit` (the same jittable
  `class_indices` on the same table, so the same key gives the same rows), whose images are
  read on the host (`split.read`) and mapped into the split's space on the device: only the
  labels are in memory, never the images. `class_index(dataset)` picks one of the two.
* `take_rows(dataset, indices)`: float32 host rows of either kind of split.
* `StreamingClassSampler`: class samples of a TFDS split by name with a numpy Generator
  (reads only the drawn records; optional ZCA).
* `make_loader(...)`: a grain `DataLoader` of normalized batches, sharded by process.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

import jax
import jax.numpy as jnp

from elf_jax.data.dataset import ArrayDataset
from elf_jax.data.stream import StreamedSplit, is_streamed


class ClassArrays(NamedTuple):
    """The arrays of a `ClassIndex`: a pytree, so jitted code can take it as an argument."""

    images: jax.Array  # [M, H, W, C]
    table: jax.Array  # [K, width] int32: row c holds the indices of class c, then padding
    counts: jax.Array  # [K] int32


class ClassTable(NamedTuple):
    """The arrays of a `StreamedClassIndex`: `ClassArrays` without the images (the
    `class_indices` draws need only these)."""

    table: jax.Array  # [K, width] int32
    counts: jax.Array  # [K] int32


def class_table(labels: np.ndarray, num_classes: int):
    """``(table [K, width] int32, counts [K])``: row c holds the indices of class c in
    dataset order, padded with its first index (width = the largest class)."""
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes)
    width = max(1, int(counts.max()) if counts.size else 1)
    table = np.zeros((num_classes, width), np.int32)
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        table[c, :len(idx)] = idx
        if len(idx):
            table[c, len(idx):] = idx[0]
    return table, counts


def class_indices(a, key, c, n: int):
    """Dataset indices of n distinct random images of class c; jittable (c may be traced,
    n static and at most the class count). ``a``: `ClassArrays` or `ClassTable`."""
    width = a.table.shape[1]
    u = jax.random.uniform(key, (width,))
    u = jnp.where(jnp.arange(width) < a.counts[c], u, 2.0)  # padding slots lose
    _, pos = jax.lax.top_k(-u, n)  # n smallest uniforms = a uniform n-subset, random order
    return a.table[c, pos]


def all_class_indices(a, key, n: int):
    """[K, n]: `class_indices` of every class, one key per class (``split(key, K)``)."""
    k = a.table.shape[0]
    return jax.vmap(lambda kk, c: class_indices(a, kk, c, n))(jax.random.split(key, k),
                                                              jnp.arange(k))


def sample_class(a: ClassArrays, key, c, n: int):
    """[n, H, W, C]: the images `class_indices` draws."""
    return a.images[class_indices(a, key, c, n)]


def sample_all_classes(a: ClassArrays, key, n: int):
    """[K, n, H, W, C]: n images of every class, one key per class."""
    return a.images[all_class_indices(a, key, n)]


_indices_jit = jax.jit(class_indices, static_argnames=("n",))
_all_indices_jit = jax.jit(all_class_indices, static_argnames=("n",))
_take_jit = jax.jit(lambda images, idx: images[idx])


class _TableIndex:
    """What both indexes share: the class table of the labels, the checks of ``n``, the
    index draws and the image draws (the rows of the drawn indices, ``images_at``)."""

    def __init__(self, labels, num_classes: int):
        table, counts = class_table(labels, num_classes)
        self.num_classes = num_classes
        self.counts = counts
        self.indices = [table[c, :counts[c]] for c in range(num_classes)]
        self.labels = np.asarray(labels)
        self._table = ClassTable(jnp.asarray(table), jnp.asarray(counts, jnp.int32))

    def _check(self, n: int, c=None):
        n = int(n)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if isinstance(c, (int, np.integer)):
            if not 0 <= c < self.num_classes:
                raise ValueError(f"class {c} out of range [0, {self.num_classes})")
            if n > self.counts[c]:
                raise ValueError(f"class {c} has {self.counts[c]} images, cannot draw {n} "
                                 "without replacement")
        elif n > self.counts.min():
            raise ValueError(f"n={n} exceeds the smallest class ({self.counts.min()} images); "
                             "pass a Python int class to check that class only")
        return n

    def sample_class_indices(self, key, c, n: int):
        """Dataset indices of the images `sample_class(key, c, n)` returns."""
        n = self._check(n, c)
        return _indices_jit(self._table, key, c, n)

    def sample_all_classes_indices(self, key, n: int):
        """[num_classes, n]: the dataset indices `sample_all_classes(key, n)` returns."""
        n = self._check(n)
        return _all_indices_jit(self._table, key, n)

    def sample_class(self, key, c, n: int):
        """n distinct images of class c, [n, H, W, C] (uniform without replacement)."""
        return self.images_at(self.sample_class_indices(key, c, n))

    def sample_all_classes(self, key, n: int):
        """[num_classes, n, H, W, C]: n distinct images per class (independent keys)."""
        return self.images_at(self.sample_all_classes_indices(key, n))


class ClassIndex(_TableIndex):
    """Per-class index of an in-memory dataset for fast class-conditional sampling.

    `arrays.images` are kept as a device array; `arrays.table[c, :counts[c]]` are the indices
    of class c. The methods check `n`; the module functions of `arrays` are their jittable
    form for code that draws inside jit.
    """

    def __init__(self, dataset: ArrayDataset, *, device_put: bool = True):
        if is_streamed(dataset):
            raise ValueError(f"{dataset.name} {dataset.split} is streamed: index it with "
                             "StreamedClassIndex (or class_index(dataset))")
        super().__init__(dataset.labels, dataset.num_classes)
        self.images = jnp.asarray(dataset.images) if device_put else dataset.images
        self.arrays = ClassArrays(self.images, self._table.table, self._table.counts)

    def images_at(self, indices):
        """Device ``indices.shape + image_shape``: the images of rows ``indices``."""
        return _take_jit(self.images, indices)


#: Rows a `StreamedClassIndex` reads per slice (64x64x3: 50 MB of uint8).
READ_ROWS = 4096


class StreamedClassIndex(_TableIndex):
    """`ClassIndex` of a `StreamedSplit`: the same methods and the same draws for the same
    key (the same `class_indices` on the same table), the drawn rows read with
    ``split.read`` and mapped with ``split.to_space`` on the device, so the images equal
    `ClassIndex`'s on the in-memory split bit for bit. `arrays` is a `ClassTable` (no
    images); `sample_*` synchronise with the host (the indices decide what is read), so
    they cannot run inside jit: draw with them, then pass the images in.
    """

    def __init__(self, split: StreamedSplit):
        if not is_streamed(split):
            raise ValueError(f"StreamedClassIndex takes a StreamedSplit, got "
                             f"{type(split).__name__}: use ClassIndex (or class_index)")
        super().__init__(split.labels, split.num_classes)
        self.split = split
        self.arrays = self._table

    def images_at(self, indices):
        """Device float32 ``indices.shape + image_shape``: the rows ``indices`` in the
        split's space."""
        idx = np.asarray(indices)
        flat = idx.reshape(-1)
        # read and moved in slices: the host holds one slice of uint8 rows at a time (a DM
        # draw on ImageNet-1k is 1000 x 256 rows: 3 GB of uint8)
        parts = [self.split.to_space(jnp.asarray(self.split.read(flat[s: s + READ_ROWS])))
                 for s in range(0, max(flat.size, 1), READ_ROWS)]
        x = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
        return x.reshape(idx.shape + tuple(self.split.image_shape))


def class_index(dataset):
    """The class index of ``dataset``: `StreamedClassIndex` for a `StreamedSplit`,
    `ClassIndex` (images on the device) for an in-memory split."""
    return StreamedClassIndex(dataset) if is_streamed(dataset) else ClassIndex(dataset)


def take_rows(dataset, indices) -> np.ndarray:
    """Host float32 ``[n, H, W, C]``: rows ``indices`` of an in-memory split (its images)
    or of a `StreamedSplit` (only those rows read), in the split's space."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    if is_streamed(dataset):
        return np.ascontiguousarray(dataset.to_space(dataset.read(idx)), np.float32)
    return np.ascontiguousarray(np.asarray(dataset.images, np.float32)[idx])


class StreamingClassSampler:
    """Per-class sampling from array_record files without loading the split.

    Labels are read once (cached as .npy under `<data_dir>/elf_jax_cache/labels`); each call
    reads and decodes only the drawn records. Returns numpy float32 images normalized like
    `load` (mean/std, then `zca` if given).
    """

    def __init__(self, name: str, split: str = "train", *, data_dir=None, normalize=True,
                 zca=None, stats: str = "dc", download: bool = False, manual_dir=None):
        from elf_jax.data import tfds_source
        from elf_jax.data.api import resolve_info

        self.info = resolve_info(name, stats=stats, data_dir=data_dir)
        if self.info.source in ("embedded", "folder"):
            raise ValueError(f"{self.info.name} is in memory: use ClassIndex(load(...))")
        self._ts = tfds_source
        self.source = tfds_source.open_source(self.info, split, data_dir, download=download,
                                              manual_dir=manual_dir, raw=True)
        labels = tfds_source.read_labels(self.info, split, data_dir, manual_dir=manual_dir)
        self.num_classes = self.info.num_classes
        self.indices = [np.flatnonzero(labels == c) for c in range(self.num_classes)]
        self.counts = np.asarray([len(i) for i in self.indices])
        self.normalize = normalize
        self.zca = zca
        self._lmap = tfds_source.label_map_for(self.info)

    def _to_space(self, u8):
        x = u8.astype(np.float32) / np.float32(255.0)
        if self.normalize:
            x = (x - np.asarray(self.info.mean, np.float32)) / np.asarray(self.info.std,
                                                                         np.float32)
        if self.zca is not None:
            x = self.zca.apply(x)
        return x

    def sample_class(self, rng: np.random.Generator, c: int, n: int) -> np.ndarray:
        if not 0 <= c < self.num_classes:
            raise ValueError(f"class {c} out of range [0, {self.num_classes})")
        if n > self.counts[c]:
            raise ValueError(f"class {c} has {self.counts[c]} images, cannot draw {n}")
        idx = np.sort(rng.choice(self.indices[c], size=n, replace=False))
        recs = self.source.__getitems__([int(i) for i in idx])
        u8, _ = self._ts.decode_records(recs, self.info.image_shape[-1], self._lmap,
                                        self.info.resize)
        return self._to_space(u8)

    def sample_all_classes(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.stack([self.sample_class(rng, c, n) for c in range(self.num_classes)])


# ---------------------------------------------------------------------------- grain loader


class _ArraySource:
    """grain RandomAccessDataSource over in-memory [0,1] float images (embedded datasets)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


class _RawTfdsSource:
    """Wraps a raw (undecoded) TFDS data source; pickles cheaply for grain workers."""

    def __init__(self, info, split, data_dir, manual_dir):
        self.info, self.split, self.data_dir, self.manual_dir = info, split, data_dir, manual_dir
        self._src = None

    def _open(self):
        if self._src is None:
            from elf_jax.data import tfds_source

            self._src = tfds_source.open_source(self.info, self.split, self.data_dir,
                                                download=False, manual_dir=self.manual_dir,
                                                raw=True)
        return self._src

    def __len__(self):
        return len(self._open())

    def __getitem__(self, i):
        return self._open()[int(i)]

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_src"] = None
        return d


def _make_ops(info, normalize, zca, channels, lmap, batch_size, drop_remainder, raw_tfds):
    import grain.python as grain

    mean = np.asarray(info.mean, np.float32)
    std = np.asarray(info.std, np.float32)

    class Decode(grain.MapTransform):
        def map(self, rec):
            from elf_jax.data import tfds_source

            data, lab = tfds_source.parse_record(rec)
            img = tfds_source.decode_image(data, channels, info.resize)
            if lmap is not None:
                lab = int(lmap[lab])
            return {"image": img, "label": np.int32(lab)}

    class ToSpace(grain.MapTransform):
        def map(self, batch):
            x = batch["image"]
            x = x.astype(np.float32) / np.float32(255.0) if x.dtype == np.uint8 else x
            if normalize:
                x = (x - mean) / std
            if zca is not None:
                x = zca.apply(x)
            return {"image": x.astype(np.float32), "label": batch["label"].astype(np.int32)}

    ops = [Decode()] if raw_tfds else []
    ops += [grain.Batch(batch_size=batch_size, drop_remainder=drop_remainder), ToSpace()]
    return ops


def make_loader(name: str, split: str, batch_size: int, seed: int = 0,
                shard_index: Optional[int] = None, shard_count: Optional[int] = None, *,
                data_dir=None, shuffle: bool = True, num_epochs: Optional[int] = 1,
                drop_remainder: bool = True, worker_count: int = 0, normalize=None,
                zca=None, stats: str = "dc", image_size=None, download: bool = True,
                manual_dir=None):
    """grain DataLoader over one split yielding {"image": float32 [B,H,W,C], "label": int32}.

    Records are read from array_record on demand (embedded datasets from memory), shuffled
    per epoch with `seed`, sharded: shard `shard_index` of `shard_count` (default: this JAX
    process of all processes). `zca` is a fitted `ZCA` (e.g. `load(name, zca=True).zca`);
    normalization defaults as in `load`. `num_epochs=None` repeats forever.
    """
    import grain.python as grain

    from elf_jax.data import tfds_source
    from elf_jax.data.api import resolve_info

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shard_index is None:
        shard_index = jax.process_index()
    if shard_count is None:
        shard_count = jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    if normalize is None:
        normalize = zca is None
    info = resolve_info(name, stats=stats, image_size=image_size, data_dir=data_dir)
    if info.source in ("embedded", "folder"):
        from elf_jax.data.api import load_unit

        x, y = load_unit(info, split)
        source = _ArraySource(x, y)
        raw = False
        lmap = None
    else:
        tfds_source.ensure_prepared(info, data_dir, download=download, manual_dir=manual_dir)
        info.tfds_split(split)
        source = _RawTfdsSource(info, split, data_dir, manual_dir)
        raw = True
        lmap = tfds_source.label_map_for(info)
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=grain.ShardOptions(shard_index=shard_index, shard_count=shard_count,
                                         drop_remainder=True),
        shuffle=shuffle, num_epochs=num_epochs, seed=seed)
    ops = _make_ops(info, normalize, zca, info.image_shape[-1], lmap, batch_size,
                    drop_remainder, raw)
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain workers read absl flags
            flags.FLAGS.mark_as_parsed()
    return grain.DataLoader(data_source=source, sampler=sampler, operations=ops,
                            worker_count=worker_count)
