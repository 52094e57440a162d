"""Tiny TFDS datasets built locally (no network, no TensorFlow) for the data tests."""


import numpy as np
import tensorflow_datasets as tfds

from elf_jax.data import registry

NUM_CLASSES = 4
SHAPE = (8, 8, 3)
SPLIT_SIZES = {"train": 48, "test": 16}


def example_image(split: str, i: int) -> np.ndarray:
    rng = np.random.default_rng(1000 * (split == "test") + i)
    return rng.integers(0, 256, SHAPE, dtype=np.uint8)


def example_label(i: int) -> int:
    return i % NUM_CLASSES


def image_builder(class_name: str, shape, num_classes: int, sizes: dict, image, label):
    """A TFDS builder of numpy images ``image(split, i)`` labelled ``label(i)``, ``sizes``
    ``{split: count}``; TFDS names the dataset after ``class_name`` (ElfTestTiny ->
    elf_test_tiny) and registers it. Preparing needs no TensorFlow."""
    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=shape),
                "label": tfds.features.ClassLabel(num_classes=num_classes)}),
            supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(s, n) for s, n in sizes.items()}

    def _generate_examples(self, split, n):
        for i in range(n):
            yield i, {"image": image(split, i), "label": label(i)}

    return type(class_name, (tfds.core.GeneratorBasedBuilder,),
                {"VERSION": tfds.core.Version("1.0.0"), "_info": _info,
                 "_split_generators": _split_generators,
                 "_generate_examples": _generate_examples, "__module__": __name__})


ElfTestTiny = image_builder("ElfTestTiny", SHAPE, NUM_CLASSES, SPLIT_SIZES, example_image,
                            example_label)
# 16 train images per class: enough for a BatchNorm net's 16-per-class statistics (DC/DSA)
ElfTestTinyBn = image_builder("ElfTestTinyBn", SHAPE, NUM_CLASSES,
                              {"train": 16 * NUM_CLASSES, "test": 16}, example_image,
                              example_label)


TEST_INFO = registry.DatasetInfo(
    "elf_test_tiny", SHAPE, NUM_CLASSES, (0.5, 0.4, 0.3), (0.25, 0.2, 0.15), source="tfds",
    tfds_name="elf_test_tiny", prepare_hint="(test dataset)")


BN_INFO = registry.DatasetInfo(
    "elf_test_tiny_bn", SHAPE, NUM_CLASSES, (0.5, 0.4, 0.3), (0.25, 0.2, 0.15), source="tfds",
    tfds_name="elf_test_tiny_bn", prepare_hint="(test dataset)")


def register(monkeypatch, info=TEST_INFO):
    reg = dict(registry.REGISTRY)
    reg[info.name] = info
    monkeypatch.setattr(registry, "REGISTRY", reg)
    return info


def expected_split(split):
    n = SPLIT_SIZES[split]
    return (np.stack([example_image(split, i) for i in range(n)]),
            np.asarray([example_label(i) for i in range(n)], np.int32))
