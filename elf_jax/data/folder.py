"""`folder:PATH`: a researcher's own images, one subfolder per class (the layout of
torchvision's `ImageFolder` and the reference's Tiny ImageNet code).

    PATH/train/<class>/*.png|jpg|...   and   PATH/test/<class>/...  (or PATH/val/<class>/...)
    PATH/<class>/...                   one folder: a seeded, class-balanced split, 80% train

`folder:PATH@HxW` resizes every image to H x W (bilinear, Pillow); without it every image
must have the size of the first. Classes are the sorted subfolder names (label c is the c-th,
as ImageFolder numbers them); images are grayscale (1 channel) when every file is, RGB
otherwise. The mean/std are computed once from the train split's [0, 1] pixels. A split is
identified by its content (the decoded arrays are what the teacher's and distillation's
resume checks hash), so an edited folder is never resumed as the old one. Decoded splits are
kept for the process (keyed by every file's path, size and mtime).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from elf_jax.data.registry import DatasetInfo, split_size

PREFIX = "folder:"
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLIT_SEED = 0
TRAIN_FRACTION = 0.8


def is_folder(name: str) -> bool:
    return name.startswith(PREFIX)


def _parse(name: str) -> tuple[Path, tuple[int, int] | None]:
    path, size = split_size(name[len(PREFIX):], name)
    return Path(path).expanduser().absolute(), size


def _class_files(root: Path, name: str) -> dict[str, list[Path]]:
    if not root.is_dir():
        raise ValueError(f"dataset {name!r}: {root} is not a directory of class subfolders")
    classes = sorted(d for d in root.iterdir() if d.is_dir())
    files = {d.name: sorted(f for f in d.iterdir() if f.suffix.lower() in EXTENSIONS)
             for d in classes}
    empty = [c for c, fs in files.items() if not fs]
    if not files or empty:
        raise ValueError(f"dataset {name!r}: {root} needs one subfolder per class holding "
                         f"images ({', '.join(EXTENSIONS)})"
                         + (f"; empty: {', '.join(empty[:5])}" if empty else "; found none"))
    return files


def _layout(name: str) -> dict[str, dict[str, list[Path]]]:
    """{split: {class: files}}: the train/ and test/ (or val/) subfolders, else one folder."""
    root, _ = _parse(name)
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        out = {"train": _class_files(root / "train", name), "test": _class_files(test_dir, name)}
        if list(out["train"]) != list(out["test"]):
            raise ValueError(f"dataset {name!r}: train/ and {test_dir.name}/ have other class "
                             f"folders ({sorted(set(out['train']) ^ set(out['test']))[:5]})")
        return out
    files = _class_files(root, name)
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = {}, {}
    for c, fs in files.items():
        order = rng.permutation(len(fs))
        k = max(1, int(round(TRAIN_FRACTION * len(fs)))) if len(fs) > 1 else 1
        train[c] = [fs[i] for i in sorted(order[:k])]
        test[c] = [fs[i] for i in sorted(order[k:])]
    return {"train": train, "test": test}


def _signature(name: str) -> tuple:
    """What a decoded split depends on: every file's path, size and modification time."""
    return tuple((split, c, str(f), f.stat().st_size, f.stat().st_mtime_ns)
                 for split, by_class in _layout(name).items()
                 for c, fs in by_class.items() for f in fs)


@functools.lru_cache(maxsize=4)
def _decoded(name: str, signature: tuple) -> dict:
    """{"train"/"test": (uint8 [N, H, W, C], int32 [N]), "classes", "channels"}."""
    from PIL import Image

    _, size = _parse(name)
    layout = _layout(name)
    classes = list(layout["train"])
    items = {s: [(k, f) for k, c in enumerate(classes) for f in layout[s].get(c, [])]
             for s in ("train", "test")}

    def read(f, mode=None, wh=None):  # header only without `mode`; else the pixels
        try:
            with Image.open(f) as im:
                if mode is None:
                    return im.mode, im.size
                im = im.convert(mode)
                if im.size != wh and size is not None:
                    im = im.resize(wh, Image.BILINEAR)
                return np.asarray(im, np.uint8).reshape(im.size[1], im.size[0], -1)
        except (OSError, ValueError) as e:  # not an image, truncated, unknown format
            raise ValueError(f"dataset {name!r}: {f} is not a readable image ({e}); remove "
                             "or replace it") from None

    def header(f):
        return read(f)

    first = items["train"][0][1]
    gray = all(header(f)[0] in ("1", "L", "I", "I;16", "F")
               for s in items.values() for _, f in s)
    mode, wh = ("L" if gray else "RGB"), ((size[1], size[0]) if size else header(first)[1])
    out = {"classes": tuple(classes), "channels": 1 if gray else 3}
    for split, files in items.items():
        arrays = []
        for _, f in files:
            a = read(f, mode, wh)
            if a.shape[:2] != (wh[1], wh[0]):  # only without a size to resize to
                raise ValueError(
                    f"dataset {name!r}: {f} is {a.shape[1]}x{a.shape[0]} but {first} is "
                    f"{wh[0]}x{wh[1]} (W x H): give a size to resize all to, e.g. "
                    f"{PREFIX}{_parse(name)[0]}@{wh[1]}x{wh[0]}")
            arrays.append(a)
        out[split] = (np.stack(arrays) if arrays else
                      np.zeros((0, wh[1], wh[0], out["channels"]), np.uint8),
                      np.asarray([k for k, _ in files], np.int32))
    return out


def _load(name: str) -> dict:
    return _decoded(name, _signature(name))


def folder_info(name: str) -> DatasetInfo:
    """The DatasetInfo of `folder:PATH[@HxW]` (decodes the folder once per process)."""
    data = _load(name)
    x, _ = data["train"]
    pixels = x.reshape(-1, x.shape[-1]).astype(np.float64) / 255.0
    std = np.maximum(pixels.std(0), 1e-6)  # a constant channel: no division by zero
    return DatasetInfo(
        name=name, image_shape=tuple(int(v) for v in x.shape[1:]),
        num_classes=len(data["classes"]), mean=tuple(float(v) for v in pixels.mean(0)),
        std=tuple(float(v) for v in std), source="folder", class_names=data["classes"],
        num_examples={s: len(data[s][1]) for s in ("train", "test")})


def load_folder(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [0, 1] NHWC images, int32 labels) of one split."""
    data = _load(name)
    if split not in ("train", "test"):
        raise ValueError(f"dataset {name!r} has splits 'train' and 'test', got {split!r}")
    x, y = data[split]
    if len(y) == 0:
        raise ValueError(f"dataset {name!r}: its {split} split is empty (a class with one "
                         "image goes to train; give more images or train/ and test/ folders)")
    return x.astype(np.float32) / np.float32(255.0), y.copy()
