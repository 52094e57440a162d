"""Real data that does not fit in host memory: a split read from its array_record files
on demand, and the one choice between that and the in-memory `ArrayDataset`.

* `open_split(name, split, mode="auto")`: the in-memory `ArrayDataset` (`load`) when the
  split's float32 images take at most `stream_above_gb` (default `STREAM_ABOVE_GB`), a
  `StreamedSplit` otherwise; `mode="memory"` / `"stream"` force one. MNIST, CIFAR-10/100
  (<= 0.6 GB) stay in memory; Tiny ImageNet (4.9 GB) and ImageNet-64 (63 GB) stream.
* `StreamedSplit`: the labels in memory (int32, read once and cached), the images read as
  uint8 rows (`read(indices)`, in the order asked, decoded on `workers` threads) and put in
  the split's normalized space on the device (`to_space`), never a float copy of the split.
  The training engine (`elf_jax.train.runner.fit`) reads its minibatches from it, the
  distillation methods their class samples (`StreamedClassIndex`), the test passes their
  batches; each process reads only the rows of its own devices.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import os
import threading
from typing import Optional

import numpy as np

from elf_jax.hashing import fingerprint
from elf_jax.data.registry import DatasetInfo

__all__ = ["DATA_MODES", "STREAM_ABOVE_GB", "StreamedSplit", "open_split", "float32_gb",
           "is_streamed", "images_of"]

DATA_MODES = ("auto", "memory", "stream")
#: Float32 size (GB) of a split's images above which `open_split(mode="auto")` streams it:
#: small enough that an in-memory split (which `elf-jax all` holds once per stage that
#: needs it, plus its device copy) stays well inside a workstation's memory.
STREAM_ABOVE_GB = 2.0
#: Records hashed (with the labels and the file sizes) into a streamed split's fingerprint:
#: hashing every image of ImageNet on each run would cost minutes.
FINGERPRINT_RECORDS = 64


def float32_gb(info: DatasetInfo, num_examples: int) -> float:
    """GB (1e9 bytes) of `num_examples` images of `info` as float32."""
    return num_examples * int(np.prod(info.image_shape)) * 4 / 1e9


def is_streamed(dataset) -> bool:
    """Whether `dataset` is read on demand (a `StreamedSplit`) rather than held in memory."""
    return isinstance(dataset, StreamedSplit)


def split_hash(dataset) -> str:
    """A split's identity for resume checks (16 hex digits): its float32 images and int32
    labels in memory, or a streamed split's `fingerprint` (labels, files, sampled records:
    hashing all of ImageNet would take minutes). The two differ for one split, so a run is
    resumed only from the kind of split it started on."""
    if is_streamed(dataset):
        return fingerprint("streamed", dataset.fingerprint)[:16]
    return fingerprint(np.asarray(dataset.images, np.float32),
                       np.asarray(dataset.labels).astype(np.int32))[:16]


def images_of(dataset):
    """What the engine and the test passes take as a split's images: the in-memory array, or
    the streamed split itself (read while they run)."""
    return dataset if is_streamed(dataset) else dataset.images


@dataclasses.dataclass(frozen=True, eq=False)
class StreamedSplit:
    """One split of a TFDS dataset read from its array_record files on demand.

    Has the metadata of an `ArrayDataset` (name, num_classes, mean, std, image_shape,
    class_names, split, normalized, zca=None, labels) but no `images`: `read(indices)` gives
    uint8 rows and `to_space(u8)` (numpy or jax) maps them into the normalized space, the
    same float32 operations as `load`, so a streamed run equals the in-memory one.
    """

    info: DatasetInfo
    split: str
    labels: np.ndarray
    data_dir: Optional[str] = None
    manual_dir: Optional[str] = None
    normalized: bool = True
    workers: int = 4
    #: the file's rows this split is (`labels` are theirs): a held-out part of a split or the
    #: rest of it (elf_jax.data.validation); None: every row in file order
    rows: Optional[np.ndarray] = None
    #: what the rows are for when they are a part of the split ("validation"); the file's
    #: split name (`split`) stays the one its records are read from
    part: str = ""

    zca = None

    @property
    def role(self) -> str:
        """The name of what these rows are: `part`, else the split's name."""
        return self.part or self.split

    def __post_init__(self):
        if self.labels.dtype != np.int32 or self.labels.ndim != 1:
            raise ValueError(f"StreamedSplit labels must be int32 [N], got {self.labels.dtype} "
                             f"{self.labels.shape}")
        if self.rows is not None and (self.rows.ndim != 1 or len(self.rows) != len(self.labels)):
            raise ValueError(f"StreamedSplit rows must be [N] like its labels, got "
                             f"{self.rows.shape} for {self.labels.shape}")
        object.__setattr__(self, "_local", threading.local())

    # ---------------------------------------------------------------- ArrayDataset-like
    name = property(lambda self: self.info.name)
    num_classes = property(lambda self: self.info.num_classes)
    mean = property(lambda self: tuple(float(v) for v in self.info.mean))
    std = property(lambda self: tuple(float(v) for v in self.info.std))
    image_shape = property(lambda self: tuple(self.info.image_shape))
    class_names = property(lambda self: self.info.class_names)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def images(self):
        raise AttributeError(
            f"{self.name} {self.split} is streamed ({len(self):,} images, "
            f"{float32_gb(self.info, len(self)):.1f} GB as float32): its images are not in "
            "memory; read rows with .read(indices) and .to_space(), or open it with "
            "mode='memory' (config data_mode=memory) if it fits")

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    # ---------------------------------------------------------------- reading
    def _source(self):
        """This thread's array_record reader (readers are not shared between threads)."""
        src = getattr(self._local, "src", None)
        if src is None:
            from elf_jax.data import tfds_source

            src = tfds_source.open_source(self.info, self.split, self.data_dir, download=False,
                                          manual_dir=self.manual_dir, raw=True)
            self._local.src = src
        return src

    def _read_sorted(self, idx: np.ndarray) -> np.ndarray:
        from elf_jax.data import tfds_source

        recs = self._source().__getitems__([int(i) for i in idx])
        u8, _ = tfds_source.decode_records(recs, self.image_shape[-1], size=self.info.resize)
        if u8.shape[1:] != self.image_shape:
            raise ValueError(f"{self.name}: records have image shape {u8.shape[1:]}, the "
                             f"registry says {self.image_shape}")
        return u8

    def read(self, indices) -> np.ndarray:
        """uint8 ``[n, H, W, C]``: the images of rows ``indices`` in that order (read in file
        order, decoded on up to ``workers`` threads)."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row indices must be in [0, {len(self)}), got "
                             f"[{idx.min()}, {idx.max()}]")
        out = np.empty((idx.size,) + self.image_shape, np.uint8)
        if not idx.size:
            return out
        if self.rows is not None:
            idx = self.rows[idx]
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        parts = np.array_split(np.arange(idx.size), max(1, min(self.workers, idx.size // 16)))
        if len(parts) == 1:
            out[order] = self._read_sorted(sorted_idx)
            return out
        pool = _pool(self.workers)
        for part, u8 in zip(parts, pool.map(lambda p: self._read_sorted(sorted_idx[p]), parts)):
            out[order[part]] = u8
        return out

    @functools.cached_property
    def _lut(self) -> np.ndarray:
        """float32 ``[256, C]``: every uint8 value of every channel in this split's space,
        computed with `load`'s numpy operations (on the device XLA would turn ``/ 255`` into
        a multiplication by its rounded reciprocal and differ in the last bit)."""
        c = self.image_shape[-1]
        x = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (256, c))
        x = x.astype(np.float32) / np.float32(255.0)
        if self.normalized:
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x, np.float32)

    def to_space(self, u8):
        """uint8 images -> this split's space (``/255``, then ``(x - mean) / std`` when
        normalized), bit-identical to `load`: numpy in, numpy out; a jax array in, a jax
        array out (on its device; one table lookup)."""
        from elf_jax.data.dataset import _xp

        xp = _xp(u8)
        lut = xp.asarray(self._lut)
        return lut[u8.astype(xp.int32), xp.arange(lut.shape[1])]

    def from_unit(self, x01):
        """Images with pixels in [0, 1] -> this split's space (as `ArrayDataset.from_unit`)."""
        from elf_jax.data.dataset import _xp

        xp = _xp(x01)
        if not self.normalized:
            return x01
        return (x01 - xp.asarray(self.mean, x01.dtype)) / xp.asarray(self.std, x01.dtype)

    def to_unit(self, x):
        """Inverse of `from_unit`."""
        from elf_jax.data.dataset import _xp

        xp = _xp(x)
        if not self.normalized:
            return x
        return x * xp.asarray(self.std, x.dtype) + xp.asarray(self.mean, x.dtype)

    def check(self, images, what: str = "images") -> None:
        from elf_jax.data.dataset import check_images

        check_images(images, self.image_shape, what=what)

    def subset(self, indices):
        """The rows ``indices`` as an in-memory `ArrayDataset` (a small sample)."""
        from elf_jax.data.dataset import ArrayDataset

        idx = np.asarray(indices)
        return ArrayDataset(
            images=np.ascontiguousarray(self.to_space(self.read(idx)), np.float32),
            labels=self.labels[idx], num_classes=self.num_classes, name=self.name,
            mean=self.mean, std=self.std, image_shape=self.image_shape,
            class_names=self.class_names, split=self.split, normalized=self.normalized)

    @functools.cached_property
    def fingerprint(self) -> str:
        """What identifies the split without reading it all: the dataset, its split, the
        labels, the array_record file sizes and `FINGERPRINT_RECORDS` evenly spaced raw
        records. A re-prepared or edited dataset changes it."""
        h = hashlib.sha256()
        h.update(f"{self.info.name}|{self.info.tfds_name}|{self.split}|{self.normalized}|"
                 f"{self.image_shape}|{len(self)}".encode())
        h.update(self.labels.tobytes())
        if self.rows is not None:
            h.update(b"rows" + np.asarray(self.rows, np.int64).tobytes())
        for size in _file_sizes(self):
            h.update(str(size).encode())
        n = len(self)
        rows = np.unique(np.linspace(0, n - 1, min(n, FINGERPRINT_RECORDS)).astype(np.int64))
        if self.rows is not None:
            rows = self.rows[rows]
        for rec in self._source().__getitems__([int(i) for i in rows]):
            h.update(hashlib.sha256(rec).digest())
        return h.hexdigest()


@functools.lru_cache(maxsize=4)
def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                 thread_name_prefix="elf-jax-read")


def _file_sizes(split: StreamedSplit) -> list:
    from elf_jax.data import tfds_source

    builder = tfds_source.ensure_prepared(split.info, split.data_dir, download=False,
                                          manual_dir=split.manual_dir)
    files = sorted(p for p in builder.data_path.iterdir() if "array_record" in p.name)
    return [f"{p.name}:{os.path.getsize(os.fspath(p))}" for p in files]


def open_split(name: str, split: str = "train", *, mode: str = "auto",
               stream_above_gb: float = STREAM_ABOVE_GB, data_dir=None, zca: bool = False,
               stats: str = "dc", image_size=None, download: bool = True, manual_dir=None,
               workers: int = 4, **load_kw):
    """One split of `name`: in memory (`load`, an `ArrayDataset`) or streamed (a
    `StreamedSplit`).

    Args:
      mode: ``auto`` streams a TFDS split whose float32 images exceed `stream_above_gb`;
        ``memory`` always loads; ``stream`` always streams (TFDS datasets; the embedded ones
        are in memory by nature and refuse it).
      zca: ZCA needs the whole split to fit the whitening: a streamed split refuses it.
      workers: decoding threads of a streamed split.
      Other arguments as `elf_jax.data.load`.
    """
    from elf_jax.data.api import load, resolve_info

    if mode not in DATA_MODES:
        raise ValueError(f"data mode {mode!r}: choose one of {DATA_MODES}")
    info = resolve_info(name, stats=stats, image_size=image_size, data_dir=data_dir)
    streamable = info.source not in ("embedded", "folder")
    if mode == "stream" and not streamable:
        what = "embedded in the package" if info.source == "embedded" else "a folder of images"
        raise ValueError(f"{info.name} is {what} (read into memory): use data mode 'auto' or "
                         "'memory' for it")
    labels = None
    if mode == "auto" and streamable:
        from elf_jax.data import tfds_source

        labels = tfds_source.read_labels(info, split, data_dir, download=download,
                                         manual_dir=manual_dir)
        mode = "memory" if float32_gb(info, len(labels)) <= float(stream_above_gb) else "stream"
    if mode != "stream":
        return load(name, split, data_dir=data_dir, zca=zca, stats=stats, image_size=image_size,
                    download=download, manual_dir=manual_dir, **load_kw)
    if zca:
        raise ValueError(
            f"{info.name} {split} is streamed, and ZCA whitening needs the whole split in "
            "memory to fit: set zca=False, or data mode 'memory' if it fits")
    if labels is None:
        from elf_jax.data import tfds_source

        tfds_source.ensure_prepared(info, data_dir, download=download, manual_dir=manual_dir)
        labels = tfds_source.read_labels(info, split, data_dir, manual_dir=manual_dir)
    normalize = load_kw.pop("normalize", None)
    unknown = set(load_kw) - {"cache", "limit", "zca_eps", "zca_cache_dir"}
    if unknown or load_kw.get("limit") is not None:
        raise ValueError(f"open_split: {sorted(unknown) or ['limit']} not supported for a "
                         "streamed split")
    return StreamedSplit(info=info, split=split, labels=np.asarray(labels, np.int32),
                         data_dir=data_dir, manual_dir=manual_dir,
                         normalized=True if normalize is None else bool(normalize),
                         workers=int(workers))
