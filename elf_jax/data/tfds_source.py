"""TFDS datasets read through `array_record` data sources: no TensorFlow needed to READ.

* Catalog datasets (mnist, fashion_mnist, svhn_cropped, cifar10, cifar100,
  imagenet_resized/64x64) are prepared with `file_format="array_record"`.
* `elf_tiny_imagenet` and `elf_imagenet_subset/<subset>_<res>` are our own
  `GeneratorBasedBuilder`s that read files the user downloaded (manual dir) and need no
  TensorFlow to prepare either.

Preparing a TFDS catalog dataset normally calls `tf.image.encode_png` for images given as
numpy arrays. When TensorFlow is not installed we encode those PNGs with Pillow instead
(lossless, so the decoded pixels are identical); anything else in a builder that needs
TensorFlow raises an error that says to `pip install elf_jax[prepare]`.

A dataset missing from the data dir is announced on stderr before TFDS starts; one that must
be downloaded is refused within seconds when its download hosts cannot be reached (TFDS
itself would retry for minutes), unless a proxy is configured.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import socket
import sys
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import urlparse

import numpy as np

from elf_jax.data.registry import IMAGENET_SUBSETS, DatasetInfo

PREPARE_EXTRA = "pip install 'elf_jax[prepare]'"


class DatasetNotPreparedError(FileNotFoundError):
    """The dataset is not on disk (in array_record form) and could not be prepared."""


def _tfds():
    import tensorflow_datasets as tfds

    return tfds


def default_data_dir(data_dir=None) -> str:
    if data_dir is not None:
        return os.fspath(data_dir)
    return os.environ.get("ELF_JAX_DATA_DIR") or os.environ.get("TFDS_DATA_DIR") or os.path.join(
        os.path.expanduser("~"), "tensorflow_datasets")


def _tf_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        return False


# ---------------------------------------------------------------------------- encoding


def png_bytes(image: np.ndarray) -> bytes:
    """Encode an HxWxC (C in 1, 3, 4) or HxW uint8 array as PNG with Pillow."""
    from PIL import Image

    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes, channels: int, size=None) -> np.ndarray:
    """Encoded bytes -> uint8 [H, W, channels]; `size` (H, W): resized to it (bilinear), as
    a `tfds:NAME@HxW` dataset asks."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BILINEAR)
        a = np.asarray(im, dtype=np.uint8)
    return a[..., None] if channels == 1 else a


@contextlib.contextmanager
def pil_image_encoding():
    """Within this context TFDS encodes numpy images with Pillow when TensorFlow is absent."""
    if _tf_available():
        yield
        return
    from tensorflow_datasets.core.features import image_feature

    enc = image_feature._ImageEncoder
    original = enc._encode_image

    def _encode_image(self, np_image):
        image_feature._validate_np_array(np_image, shape=self.shape, dtype=self.np_dtype)
        from PIL import Image

        a = np.asarray(np_image)
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        buf = io.BytesIO()
        fmt = "JPEG" if self.encoding_format == "jpeg" else "PNG"
        Image.fromarray(a).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        return buf.getvalue()

    enc._encode_image = _encode_image
    try:
        yield
    finally:
        enc._encode_image = original


# ---------------------------------------------------------------------------- labels


@functools.lru_cache(maxsize=None)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet wnids in sorted order (TFDS imagenet2012 / ImageFolder order)."""
    import tensorflow_datasets as tfds

    root = Path(tfds.__file__).parent
    for p in (root / "datasets" / "imagenet2012" / "labels.txt",
              root / "image_classification" / "imagenet2012_labels.txt"):
        if p.exists():
            return tuple(p.read_text().split())
    raise FileNotFoundError("imagenet2012 labels.txt not found in the tensorflow_datasets package")


@functools.lru_cache(maxsize=None)
def imagenet_resized_wnids() -> tuple[str, ...]:
    """Label order of TFDS imagenet_resized (Downsampled-ImageNet order, NOT sorted)."""
    import tensorflow_datasets as tfds

    p = Path(tfds.__file__).parent / "image_classification" / "imagenet_resized_labels.txt"
    return tuple(p.read_text().split())


def imagenet_resized_to_sorted() -> np.ndarray:
    """int32 [1000]: imagenet_resized label -> sorted-wnid (imagenet2012) label."""
    sorted_idx = {w: i for i, w in enumerate(imagenet_wnids())}
    return np.asarray([sorted_idx[w] for w in imagenet_resized_wnids()], np.int32)


# ---------------------------------------------------------------------------- builders

_tfds_mod = _tfds()
# TFDS derives a builder's code path via importlib_resources for builders inside packages;
# that module is not a dependency here, and we ship no checksums file, so pin it.
from etils import epath as _epath  # noqa: E402

_CODE_PATH = _epath.Path(__file__)


def _center_resize(img, res: int):
    """Resize the short side to `res` (bilinear, antialiased) then center-crop res x res (MTT's
    `Resize(res)` + `CenterCrop(res)`)."""
    from PIL import Image

    w, h = img.size
    if (w, h) != (res, res):
        s = res / min(w, h)
        nw, nh = max(res, round(w * s)), max(res, round(h * s))
        img = img.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - res) // 2, (nh - res) // 2
        img = img.crop((left, top, left + res, top + res))
    return img


def _load_rgb_png(path_or_bytes, res: Optional[int] = None) -> bytes:
    from PIL import Image

    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(src) as im:
        im = im.convert("RGB")
        if res is not None:
            im = _center_resize(im, res)
        elif im.size != (64, 64):
            im = im.resize((64, 64), Image.BILINEAR)
        return png_bytes(np.asarray(im, np.uint8))


def _find_tiny_root(manual_dir: Path, dl_manager) -> Path:
    candidates = [manual_dir, manual_dir / "tiny-imagenet-200"]
    for c in candidates:
        if (c / "wnids.txt").exists() and (c / "train").is_dir():
            return c
    z = manual_dir / "tiny-imagenet-200.zip"
    if z.exists():
        out = Path(os.fspath(dl_manager.extract(os.fspath(z))))
        for c in (out, out / "tiny-imagenet-200"):
            if (c / "wnids.txt").exists():
                return c
    raise DatasetNotPreparedError(
        f"no tiny-imagenet-200 data in the manual dir {manual_dir}. "
        + ElfTinyImagenet.MANUAL_DOWNLOAD_INSTRUCTIONS)


class ElfTinyImagenet(_tfds_mod.core.GeneratorBasedBuilder):
    """Tiny ImageNet (200 classes, 64x64) from the user's tiny-imagenet-200 download.

    Classes are the sorted wnids (torchvision ImageFolder order, as MTT/ELF read it). Split
    `validation` is the official val set (labels from `val/val_annotations.txt`, or class
    subfolders `val/<wnid>/` as ELF's reorganized copy has); it is the test set of the
    reference. The unlabeled official test set is not used.
    """

    VERSION = _tfds_mod.core.Version("1.0.0")
    code_path = _CODE_PATH
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download http://cs231n.stanford.edu/tiny-imagenet-200.zip and place the zip file, or "
        "its extracted folder `tiny-imagenet-200/`, in the manual dir (default "
        "`<data_dir>/downloads/manual/`).")

    def _info(self):
        tfds = _tfds_mod
        return tfds.core.DatasetInfo(
            builder=self,
            description="Tiny ImageNet 200 (64x64), classes in sorted wnid order.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(64, 64, 3)),
                "label": tfds.features.ClassLabel(num_classes=200),
                "wnid": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        root = _find_tiny_root(Path(os.fspath(dl_manager.manual_dir)), dl_manager)
        wnids = sorted((root / "wnids.txt").read_text().split())
        if len(wnids) != 200:
            raise ValueError(f"{root / 'wnids.txt'} lists {len(wnids)} classes, expected 200")
        return {"train": self._generate_examples(root, wnids, "train"),
                "validation": self._generate_examples(root, wnids, "val")}

    def _generate_examples(self, root: Path, wnids, split: str):
        index = {w: i for i, w in enumerate(wnids)}
        items = []
        if split == "train":
            for w in wnids:
                d = root / "train" / w
                files = sorted((d / "images").glob("*")) if (d / "images").is_dir() else \
                    sorted(p for p in d.glob("*") if p.is_file())
                items += [(f, w) for f in files]
        else:
            ann = root / "val" / "val_annotations.txt"
            if ann.exists():
                for line in ann.read_text().splitlines():
                    parts = line.split("\t")
                    if len(parts) >= 2:
                        items.append((root / "val" / "images" / parts[0], parts[1]))
            else:
                for w in wnids:
                    d = root / "val" / w
                    sub = d / "images" if (d / "images").is_dir() else d
                    items += [(f, w) for f in sorted(sub.glob("*")) if f.is_file()]
        for f, w in items:
            if w not in index:
                raise ValueError(f"{f}: wnid {w} is not in wnids.txt")
            yield f"{w}/{f.name}", {"image": _load_rgb_png(f), "label": index[w], "wnid": w}


class ElfImagenetSubsetConfig(_tfds_mod.core.BuilderConfig):
    def __init__(self, *, subset: str, resolution: int, **kw):
        super().__init__(name=f"{subset}_{resolution}", version="1.0.0", **kw)
        self.subset = subset
        self.resolution = resolution
        self.class_indices = IMAGENET_SUBSETS[subset]


class ElfImagenetSubset(_tfds_mod.core.GeneratorBasedBuilder):
    """MTT's 10-class ImageNet subsets at 128 or 64 px.

    Sources, first found wins:
    1. an ImageNet folder in ImageFolder layout `<manual_dir>/imagenet/{train,val}/<wnid>/`
       (or `<manual_dir>/{train,val}/<wnid>/`): images resized (short side, bilinear) and
       center-cropped to the resolution, as MTT's `Resize(res)` + `CenterCrop(res)`;
    2. a prepared TFDS parent in the same data_dir (array_record): `imagenet2012` for 128 px
       (same resize + crop), `imagenet_resized/64x64` for 64 px (used as is).
    Label c is the c-th class of MTT's list for the subset.
    """

    code_path = _CODE_PATH
    BUILDER_CONFIGS = [ElfImagenetSubsetConfig(subset=s, resolution=r)
                       for s in IMAGENET_SUBSETS for r in (128, 64)]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put ImageNet-1k in ImageFolder layout (`train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`) "
        "at `<manual_dir>/imagenet/` (default manual dir: `<data_dir>/downloads/manual/`), "
        "or prepare TFDS `imagenet2012` (128 px) / `imagenet_resized/64x64` (64 px) with "
        "file_format='array_record' in the same data_dir.")

    def _info(self):
        tfds = _tfds_mod
        r = self.builder_config.resolution
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"MTT ImageNet subset {self.builder_config.subset} at {r}px.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(r, r, 3)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
        )

    def _wnids(self):
        all_w = imagenet_wnids()
        return [all_w[i] for i in self.builder_config.class_indices]

    def _split_generators(self, dl_manager):
        wnids = self._wnids()
        try:
            manual = Path(os.fspath(dl_manager.manual_dir))
        except AssertionError:
            manual = None
        if manual is not None:
            for root in (manual / "imagenet", manual):
                if (root / "train").is_dir() and all((root / "train" / w).is_dir() for w in wnids):
                    return {"train": self._from_folder(root / "train", wnids),
                            "validation": self._from_folder(root / "val", wnids)}
        parent = "imagenet2012" if self.builder_config.resolution == 128 else \
            "imagenet_resized/64x64"
        tfds = _tfds_mod
        pb = tfds.builder(parent, data_dir=os.fspath(self.data_dir_root),
                          file_format="array_record")
        if pb.is_prepared():
            return {"train": self._generate_examples("tfds", pb, wnids, "train"),
                    "validation": self._generate_examples("tfds", pb, wnids, "validation")}
        raise DatasetNotPreparedError(
            f"no ImageNet source for {self.builder_config.name}: neither an ImageFolder copy "
            f"with the classes {wnids} in the manual dir ({manual}) nor a prepared "
            f"{parent} in {self.data_dir_root}. " + self.MANUAL_DOWNLOAD_INSTRUCTIONS)

    def _generate_examples(self, kind, *args):
        return self._from_folder(*args) if kind == "folder" else self._from_tfds(*args)

    def _from_folder(self, root: Path, wnids):
        res = self.builder_config.resolution
        for c, w in enumerate(wnids):
            d = root / w
            if not d.is_dir():
                raise DatasetNotPreparedError(f"missing class folder {d}")
            for f in sorted(p for p in d.rglob("*") if p.is_file()):
                yield f"{w}/{f.name}", {"image": _load_rgb_png(f, res), "label": c}

    def _from_tfds(self, parent_builder, wnids, split):
        decode = _tfds_mod.decode
        src = parent_builder.as_data_source(
            split, deserialize_method=decode.DeserializeMethod.RAW_BYTES)
        if self.builder_config.resolution == 128:
            order = {w: i for i, w in enumerate(imagenet_wnids())}
            res = 128
        else:
            order = {w: i for i, w in enumerate(imagenet_resized_wnids())}
            res = None
        want = {order[w]: c for c, w in enumerate(wnids)}
        n = len(src)
        for start in range(0, n, 4096):
            recs = src.__getitems__(list(range(start, min(n, start + 4096))))
            for k, r in enumerate(recs):
                img, lab = parse_record(r)
                if lab in want:
                    data = _load_rgb_png(img, res) if res else img
                    yield f"{split}_{start + k}", {"image": data, "label": want[lab]}


# ---------------------------------------------------------------------------- prepare/read


def _manual_default(data_dir: str) -> str:
    return os.path.join(data_dir, "downloads", "manual")


def get_builder(info: DatasetInfo, data_dir=None):
    tfds = _tfds_mod
    data_dir = default_data_dir(data_dir)
    return tfds.builder(info.tfds_name, data_dir=data_dir, file_format="array_record")


def download_hosts(builder) -> list[tuple[str, int]]:
    """The ``(host, port)`` pairs a builder downloads from (its registered URLs); [] for
    builders that generate from local or manual files."""
    try:
        urls = [urlparse(u) for u in (builder.url_infos or {})]
    except Exception:  # noqa: BLE001 - a builder without a checksums file
        urls = []
    return sorted({(u.hostname, u.port or (80 if u.scheme == "http" else 443))
                   for u in urls if u.hostname})


_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def reachable(hosts: Sequence[tuple[str, int]], timeout: float = 5.0) -> bool:
    """Whether a TCP connection to one of ``hosts`` (``(host, port)``) opens within ``timeout``
    seconds; True when a proxy is configured (only the proxy can tell)."""
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    for host in hosts:
        try:
            socket.create_connection(host, timeout=timeout).close()
            return True
        except OSError:  # no route, refused, DNS failure, timeout
            continue
    return False


def _announce_prepare(info: DatasetInfo, builder, data_dir: str) -> None:
    """Says, before TFDS starts, that the dataset is missing and what preparing it needs; when
    it must be downloaded and the network is unreachable, fails in seconds (TFDS itself
    retries for minutes behind frozen progress bars)."""
    hosts = download_hosts(builder)
    names = ", ".join(sorted({h for h, _ in hosts}))
    if not hosts:
        print(f"[data] {info.tfds_name} is not in {data_dir}; preparing it ...",
              file=sys.stderr, flush=True)
        return
    print(f"[data] {info.tfds_name} is not in {data_dir}; downloading it (needs network) "
          f"from {names} ...", file=sys.stderr, flush=True)
    if not reachable(hosts):
        raise DatasetNotPreparedError(
            f"dataset {info.name!r} is not prepared in {data_dir} and {names} cannot be "
            f"reached (no network?): download it on a machine with network (`tfds build "
            f"{info.tfds_name} --file_format=array_record --data_dir=<dir>`, or run once online) "
            "and copy it here, or set --config.data_dir to where it is prepared")


def ensure_prepared(info: DatasetInfo, data_dir=None, *, download: bool = True,
                    manual_dir=None):
    """Return a prepared (array_record) TFDS builder for `info`, preparing it if allowed."""
    tfds = _tfds_mod
    data_dir = default_data_dir(data_dir)
    builder = get_builder(info, data_dir)
    if builder.is_prepared():
        fmt = builder.info.file_format
        fmt_name = getattr(fmt, "value", str(fmt))
        if fmt is not None and "array_record" not in str(fmt_name):
            raise DatasetNotPreparedError(
                f"{info.tfds_name} in {data_dir} is prepared as {fmt_name}, but reading "
                "without TensorFlow needs array_record. Re-prepare it into another data_dir "
                f"with file_format='array_record' (e.g. `tfds build {info.tfds_name} "
                "--file_format=array_record`) or convert it with `tfds convert_format`.")
        return builder
    where = (f"manual files go to {manual_dir or _manual_default(data_dir)}"
             if info.source == "manual" else f"data_dir is {data_dir}")
    if not download:
        raise DatasetNotPreparedError(
            f"dataset {info.name!r} ({info.tfds_name}) is not prepared in {data_dir} "
            f"({where}). {info.prepare_hint}")
    _announce_prepare(info, builder, data_dir)
    cfg = tfds.download.DownloadConfig(
        manual_dir=os.fspath(manual_dir) if manual_dir else None)
    try:
        with pil_image_encoding():
            builder.download_and_prepare(download_config=cfg, file_format="array_record")
    except DatasetNotPreparedError:
        raise
    except ImportError as e:
        if "tensorflow" in str(e).lower():
            raise ImportError(
                f"preparing {info.tfds_name} needs TensorFlow ({e}). Install the extra: "
                f"{PREPARE_EXTRA}, or prepare it on another machine and copy the "
                f"array_record files to {data_dir}. Reading needs no TensorFlow.") from e
        missing = getattr(e, "name", None) or str(e)
        raise ImportError(
            f"preparing {info.tfds_name} needs the Python module {missing!r} ({e}); install it "
            f"(pip install {str(missing).replace('_', '-')}) or {PREPARE_EXTRA}, or prepare "
            f"the dataset elsewhere and copy the array_record files to {data_dir}.") from e
    except AssertionError as e:  # TFDS: manual dir missing/empty
        raise DatasetNotPreparedError(
            f"dataset {info.name!r} needs manually downloaded files ({where}): "
            f"{info.prepare_hint}\n(TFDS said: {e})") from e
    except Exception as e:  # network and friends
        if "tensorflow" in str(e).lower() and "No module" in str(e):
            raise ImportError(
                f"preparing {info.tfds_name} needs TensorFlow: {PREPARE_EXTRA}") from e
        raise DatasetNotPreparedError(
            f"dataset {info.name!r} is not prepared in {data_dir} and preparing it failed "
            f"({type(e).__name__}: {' '.join(str(e).split())[:300]}). No network? "
            f"{info.prepare_hint}") from e
    return builder


def open_source(info: DatasetInfo, split: str, data_dir=None, *, download: bool = True,
                manual_dir=None, raw: bool = False):
    """Random-access array_record data source of one split: records decoded to numpy dicts
    by TFDS, or with `raw=True` the serialized tf.train.Example bytes (see `parse_record`)."""
    builder = ensure_prepared(info, data_dir, download=download, manual_dir=manual_dir)
    tsplit = info.tfds_split(split)
    kw = {}
    if raw:
        kw["deserialize_method"] = _tfds_mod.decode.DeserializeMethod.RAW_BYTES
    try:
        return builder.as_data_source(tsplit, **kw)
    except (KeyError, ValueError) as e:
        raise ValueError(f"dataset {info.name!r}: cannot open split {split!r} "
                         f"(TFDS split {tsplit!r}): {e}") from e


def label_map_for(info: DatasetInfo) -> Optional[np.ndarray]:
    if info.tfds_name == "imagenet_resized/64x64":
        return imagenet_resized_to_sorted()
    return None


def parse_record(raw: bytes):
    """A serialized tf.train.Example (parsed with TFDS's bundled proto, no TensorFlow) ->
    (encoded image bytes, integer label)."""
    from tensorflow_datasets.proto import tf_example_pb2

    f = tf_example_pb2.Example.FromString(raw).features.feature
    try:
        return f["image"].bytes_list.value[0], int(f["label"].int64_list.value[0])
    except (KeyError, IndexError) as e:
        raise ValueError(f"record has no image/label features (keys: {sorted(f.keys())})") from e


def parse_label(raw: bytes) -> int:
    from tensorflow_datasets.proto import tf_example_pb2

    return int(tf_example_pb2.Example.FromString(raw).features.feature["label"].int64_list.value[0])


def decode_records(recs: Sequence[bytes], channels: int, label_map=None, size=None):
    """Serialized records -> (uint8 [n,H,W,C], int32 [n]); `size`: see `decode_image`."""
    parsed = [parse_record(r) for r in recs]
    imgs = np.stack([decode_image(b, channels, size) for b, _ in parsed])
    labels = np.asarray([lab for _, lab in parsed], np.int32)
    if label_map is not None:
        labels = label_map[labels]
    return imgs, labels


def decoded_chunks(info: DatasetInfo, split: str, data_dir=None, *, download: bool = True,
                   manual_dir=None, limit: Optional[int] = None, chunk: int = 2048):
    """``(n, chunks)``: the split's first ``n`` rows (all, or ``limit``) and an iterator of
    ``(start, uint8 images, int32 labels)`` over them in file order, ``chunk`` rows at a time
    (a pass over a split that need not fit in memory, e.g. its statistics)."""
    src = open_source(info, split, data_dir, download=download, manual_dir=manual_dir,
                      raw=True)
    n = len(src) if limit is None else min(limit, len(src))
    lmap = label_map_for(info)

    def chunks():
        for s in range(0, n, chunk):
            x, y = decode_records(src.__getitems__(list(range(s, min(n, s + chunk)))),
                                  info.image_shape[-1], lmap, info.resize)
            if x.shape[1:] != tuple(info.image_shape):
                raise ValueError(f"{info.name}: records have image shape {x.shape[1:]}, "
                                 f"registry says {info.image_shape}")
            yield s, x, y

    return n, chunks()


def read_split(info: DatasetInfo, split: str, data_dir=None, *, download: bool = True,
               manual_dir=None, limit: Optional[int] = None, chunk: int = 2048):
    """Whole split in memory: (uint8 images [N,H,W,C], int32 labels [N])."""
    n, chunks = decoded_chunks(info, split, data_dir, download=download, manual_dir=manual_dir,
                               limit=limit, chunk=chunk)
    images = np.empty((n,) + tuple(info.image_shape), np.uint8)
    labels = np.empty((n,), np.int32)
    for s, x, y in chunks:
        images[s:s + len(y)] = x
        labels[s:s + len(y)] = y
    return images, labels


def read_labels(info: DatasetInfo, split: str, data_dir=None, *, download: bool = False,
                manual_dir=None, cache: bool = True) -> np.ndarray:
    """All labels of a split (cached as .npy next to the data), without decoding images."""
    data_dir = default_data_dir(data_dir)
    path = Path(data_dir) / "elf_jax_cache" / "labels" / (
        f"{info.name.replace('/', '_')}_{split}.npy")
    if cache and path.exists():
        return np.load(path)
    src = open_source(info, split, data_dir, download=download, manual_dir=manual_dir, raw=True)
    lmap = label_map_for(info)
    out = []
    n = len(src)
    for s in range(0, n, 8192):
        recs = src.__getitems__(list(range(s, min(n, s + 8192))))
        out.append(np.asarray([parse_label(r) for r in recs], np.int32))
    labels = np.concatenate(out) if out else np.zeros((0,), np.int32)
    if lmap is not None:
        labels = lmap[labels]
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, labels)
        except OSError:
            pass
    return labels
