"""Per-dataset facts: image shape, classes, mean/std, where the data comes from.

Mean/std follow the reference code (DC/DSA `utils.get_dataset`; MTT/ELF `utils.py`):

* mnist [0.1307]/[0.3081], fashion_mnist [0.2861]/[0.3530],
* svhn [0.4377, 0.4438, 0.4728]/[0.1980, 0.2010, 0.1970],
* cifar10 [0.4914, 0.4822, 0.4465]/[0.2023, 0.1994, 0.2010],
* cifar100 [0.5071, 0.4866, 0.4409]/[0.2673, 0.2564, 0.2762] (DC/DSA/DM). NOTE: MTT's and
  ELF's `utils.py` use the CIFAR-10 values for CIFAR-100; ask for them with
  `load(..., stats="mtt")`.
* tiny_imagenet and the ImageNet family [0.485, 0.456, 0.406]/[0.229, 0.224, 0.225].

ImageNet 10-class subsets use MTT's `Config` class lists: indices into the 1000 ImageNet
classes in sorted-WordNet-id order (the order of TFDS `imagenet2012` and torchvision
`ImageFolder`). Label c of a subset is the c-th index of its list, as in MTT.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Optional

MNIST_STATS = ((0.1307,), (0.3081,))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))

# MTT `utils.Config` (indices into sorted-wnid ImageNet-1k classes).
IMAGENET_SUBSETS: dict[str, tuple[int, ...]] = {
    "imagenette": (0, 217, 482, 491, 497, 566, 569, 571, 574, 701),
    "imagewoof": (193, 182, 258, 162, 155, 167, 159, 273, 207, 229),
    "imagemeow": (281, 282, 283, 284, 285, 291, 292, 290, 289, 287),
    "imagesquawk": (84, 130, 88, 144, 145, 22, 96, 9, 100, 89),
    "imagefruit": (953, 954, 949, 950, 951, 957, 952, 945, 943, 948),
    "imageyellow": (309, 986, 954, 951, 987, 779, 599, 291, 72, 11),
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What is known about a dataset without loading it.

    `source`: "embedded" (shipped in this package, offline), "folder" (a folder of the
    user's images, `elf_jax.data.folder`), "tfds" (a TFDS catalog
    dataset, downloaded and prepared to array_record), "manual" (an elf_jax TFDS builder
    that reads files the user downloaded into the manual dir).
    `tfds_name`: name (with config) of the TFDS dataset read for this entry.
    `splits`: our split name -> the TFDS split name.
    """

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    tfds_name: Optional[str] = None
    splits: tuple[tuple[str, str], ...] = (("train", "train"), ("test", "test"))
    class_names: Optional[tuple[str, ...]] = None
    prepare_hint: str = ""
    num_examples: Optional[dict] = None
    resize: Optional[tuple[int, int]] = None  # (H, W) every decoded image is resized to

    def tfds_split(self, split: str) -> str:
        mapping = dict(self.splits)
        base = split.split("[", 1)[0]
        if base not in mapping:
            raise ValueError(
                f"dataset {self.name!r} has no split {split!r}; known splits: "
                f"{sorted(mapping)}")
        return mapping[base] + split[len(base):]


_CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                  "ship", "truck")

_TINY_HINT = (
    "Download http://cs231n.stanford.edu/tiny-imagenet-200.zip and put the zip file (or "
    "its extracted folder `tiny-imagenet-200/`) into the manual dir "
    "`<data_dir>/downloads/manual/` (or pass manual_dir=...), then call "
    "elf_jax.data.load('tiny_imagenet', 'train', data_dir=<data_dir>) again. Preparing "
    "needs no TensorFlow.")


def _subset_hint(res: int) -> str:
    if res == 64:
        return (
            "Built from TFDS `imagenet_resized/64x64` (prepare it first with file_format="
            "'array_record'; it downloads the Downsampled-ImageNet archives, which needs "
            "network) or from an ImageNet folder in ImageFolder layout (`train/<wnid>/*."
            "JPEG`, `val/<wnid>/*.JPEG`) placed at `<data_dir>/downloads/manual/imagenet/`.")
    return (
        "Built from an ImageNet folder in ImageFolder layout (`train/<wnid>/*.JPEG`, "
        "`val/<wnid>/*.JPEG`, as MTT's torchvision ImageNet reads it) placed at "
        "`<data_dir>/downloads/manual/imagenet/`, or from a prepared TFDS `imagenet2012` "
        "(file_format='array_record'; its archives go to the TFDS manual dir).")


def _build_registry() -> dict[str, DatasetInfo]:
    r: dict[str, DatasetInfo] = {}

    def add(info: DatasetInfo):
        r[info.name] = info

    add(DatasetInfo("mnist5k", (28, 28, 1), 10, *MNIST_STATS, source="embedded",
                    class_names=tuple(str(i) for i in range(10)),
                    num_examples={"train": 4000, "test": 1000}))
    add(DatasetInfo("digits", (8, 8, 1), 10, (0.0,), (1.0,), source="embedded",
                    class_names=tuple(str(i) for i in range(10)),
                    prepare_hint="mean/std are computed from the train split at load time"))
    tfds_hint = ("Prepare it once with network access: elf_jax.data.load(name, split, "
                 "data_dir=...) downloads it, or `tfds build {tfds} --file_format="
                 "array_record --data_dir=<data_dir>`; then copy <data_dir> to this machine.")
    add(DatasetInfo("mnist", (28, 28, 1), 10, *MNIST_STATS, source="tfds", tfds_name="mnist",
                    class_names=tuple(str(i) for i in range(10)),
                    prepare_hint=tfds_hint.format(tfds="mnist")))
    add(DatasetInfo("fashion_mnist", (28, 28, 1), 10, (0.2861,), (0.3530,), source="tfds",
                    tfds_name="fashion_mnist",
                    prepare_hint=tfds_hint.format(tfds="fashion_mnist")))
    add(DatasetInfo("svhn", (32, 32, 3), 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                    source="tfds", tfds_name="svhn_cropped",
                    class_names=tuple(str(i) for i in range(10)),
                    prepare_hint=tfds_hint.format(tfds="svhn_cropped")))
    add(DatasetInfo("cifar10", (32, 32, 3), 10, *CIFAR10_STATS, source="tfds",
                    tfds_name="cifar10", class_names=_CIFAR10_NAMES,
                    prepare_hint=tfds_hint.format(tfds="cifar10")))
    add(DatasetInfo("cifar100", (32, 32, 3), 100, (0.5071, 0.4866, 0.4409),
                    (0.2673, 0.2564, 0.2762), source="tfds", tfds_name="cifar100",
                    prepare_hint=tfds_hint.format(tfds="cifar100")))
    add(DatasetInfo("tiny_imagenet", (64, 64, 3), 200, *IMAGENET_STATS, source="manual",
                    tfds_name="elf_tiny_imagenet",
                    splits=(("train", "train"), ("test", "validation"),
                            ("validation", "validation")),
                    prepare_hint=_TINY_HINT))
    add(DatasetInfo("imagenet_resized/64x64", (64, 64, 3), 1000, *IMAGENET_STATS,
                    source="tfds", tfds_name="imagenet_resized/64x64",
                    splits=(("train", "train"), ("test", "validation"),
                            ("validation", "validation")),
                    prepare_hint=tfds_hint.format(tfds="imagenet_resized/64x64")
                    + " Labels are remapped to sorted-wnid (imagenet2012) order."))
    for subset in IMAGENET_SUBSETS:
        for res in (128, 64):
            name = subset if res == 128 else f"{subset}_64"
            add(DatasetInfo(name, (res, res, 3), 10, *IMAGENET_STATS, source="manual",
                            tfds_name=f"elf_imagenet_subset/{subset}_{res}",
                            splits=(("train", "train"), ("test", "validation"),
                                    ("validation", "validation")),
                            prepare_hint=_subset_hint(res)))
    return r


REGISTRY: dict[str, DatasetInfo] = _build_registry()

ALIASES = {
    "mnist_5k": "mnist5k",
    "fashionmnist": "fashion_mnist",
    "svhn_cropped": "svhn",
    "tiny": "tiny_imagenet",
    "tinyimagenet": "tiny_imagenet",
    "imagenet64": "imagenet_resized/64x64",
    "imagenet_resized": "imagenet_resized/64x64",
}
for _s in IMAGENET_SUBSETS:
    ALIASES[f"{_s}_128"] = _s


_SIZE_SUFFIX = re.compile(r"@(\d+)x(\d+)$")


def split_size(spec: str, name: str) -> tuple[str, Optional[tuple[int, int]]]:
    """`base@HxW` -> (base, (H, W)); `base` -> (base, None): the size suffix of the
    `folder:` and `tfds:` dataset names (`name`: the whole name, for the error)."""
    m = _SIZE_SUFFIX.search(spec)
    if m is None:
        return spec, None
    size = (int(m.group(1)), int(m.group(2)))
    if min(size) < 1:
        raise ValueError(f"dataset {name!r}: the size after @ must be HxW with H, W >= 1")
    return spec[: m.start()], size


def list_datasets() -> list[str]:
    """Every dataset name `load` accepts (aliases not included)."""
    return sorted(REGISTRY)


def canonical_name(name: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"dataset name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key in REGISTRY:
        return key
    known = list_datasets()
    close = difflib.get_close_matches(key, known + sorted(ALIASES), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown dataset {name!r}.{hint} Known datasets: {', '.join(known)}")


def dataset_info(name: str, *, stats: str = "dc") -> DatasetInfo:
    """Image shape, classes, mean/std of `name` without loading it.

    `stats="mtt"` returns the mean/std MTT/ELF's utils.py uses (differs only for cifar100,
    where MTT reuses CIFAR-10's values).
    """
    info = REGISTRY[canonical_name(name)]
    if stats not in ("dc", "mtt"):
        raise ValueError(f"stats must be 'dc' or 'mtt', got {stats!r}")
    if stats == "mtt" and info.name == "cifar100":
        info = dataclasses.replace(info, mean=CIFAR10_STATS[0], std=CIFAR10_STATS[1])
    return info
