"""A local stand-in for ImageNet-64 (TFDS, array_record, built offline): 64x64x3 images of
`NUM_CLASSES` classes, each a class colour plus noise (learnable, PNG-incompressible), in
two sizes: `small` (the warm-up) and `large` (several times a test's memory budget)."""

import numpy as np

from _tfds_fixtures import image_builder
from elf_jax.data import registry

SHAPE = (64, 64, 3)
NUM_CLASSES = 10
# the small one has every batch shape of the large (teacher: 64 and the last 36 of the 484 and
# 8,100 images the validation split leaves of 534 and 9,000; test: 500), so the large run
# compiles no step anew (only the few small programs that depend on a split's size: its
# permutation, its class indices)
SIZES = {"small": {"train": 534, "test": 1000}, "large": {"train": 9000, "test": 1000}}
_COLOURS = np.random.default_rng(7).integers(40, 216, (NUM_CLASSES, 3))


def image(split: str, i: int) -> np.ndarray:
    rng = np.random.default_rng((split == "test", i))
    noise = rng.integers(-40, 41, SHAPE)
    return np.clip(_COLOURS[i % NUM_CLASSES] + noise, 0, 255).astype(np.uint8)


# TFDS names a builder after its class (ElfStandinLarge -> elf_standin_large)
BUILDERS = {size: image_builder(f"ElfStandin{size.capitalize()}", SHAPE, NUM_CLASSES, sizes,
                                image, lambda i: i % NUM_CLASSES)
            for size, sizes in SIZES.items()}
INFOS = {size: registry.DatasetInfo(
    f"elf_standin_{size}", SHAPE, NUM_CLASSES, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
    source="tfds", tfds_name=f"elf_standin_{size}", prepare_hint="(test dataset)")
    for size in SIZES}


def register() -> None:
    """Adds the stand-ins to the dataset registry of this process."""
    registry.REGISTRY = {**registry.REGISTRY, **{i.name: i for i in INFOS.values()}}
