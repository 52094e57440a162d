"""A local stand-in for ImageNet-64 (TFDS, array_record, built offline): 64x64x3 images of
`NUM_CLASSES` classes, each a class colour plus noise (learnable, PNG-incompressible), in
two sizes: `small` (the warm-up) and `large` (several times a test's memory budget)."""

import numpy as np
import tensorflow_datasets as tfds

from elf_jax.data import registry

SHAPE = (64, 64, 3)
NUM_CLASSES = 10
# the small one has every batch shape of the large (teacher: 64 and the last 40; test: 500),
# so the large run compiles nothing new
SIZES = {"small": {"train": 552, "test": 1000}, "large": {"train": 9000, "test": 1000}}
_COLOURS = np.random.default_rng(7).integers(40, 216, (NUM_CLASSES, 3))


def image(split: str, i: int) -> np.ndarray:
    rng = np.random.default_rng((split == "test", i))
    noise = rng.integers(-40, 41, SHAPE)
    return np.clip(_COLOURS[i % NUM_CLASSES] + noise, 0, 255).astype(np.uint8)


def _builder(size: str):
    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=SHAPE),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES)}),
            supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(s, n) for s, n in SIZES[size].items()}

    def _generate_examples(self, split, n):
        for i in range(n):
            yield i, {"image": image(split, i), "label": i % NUM_CLASSES}

    # TFDS names a builder after its class (ElfStandinLarge -> elf_standin_large)
    return type(f"ElfStandin{size.capitalize()}", (tfds.core.GeneratorBasedBuilder,),
                {"VERSION": tfds.core.Version("1.0.0"), "_info": _info,
                 "_split_generators": _split_generators,
                 "_generate_examples": _generate_examples, "__module__": __name__})


BUILDERS = {size: _builder(size) for size in SIZES}  # TFDS registers them by class name
INFOS = {size: registry.DatasetInfo(
    f"elf_standin_{size}", SHAPE, NUM_CLASSES, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
    source="tfds", tfds_name=f"elf_standin_{size}", prepare_hint="(test dataset)")
    for size in SIZES}


def register() -> None:
    """Adds the stand-ins to the dataset registry of this process."""
    registry.REGISTRY = {**registry.REGISTRY, **{i.name: i for i in INFOS.values()}}
