"""Embedded offline datasets (mnist5k, digits), registry and input checks."""

import numpy as np
import pytest

from elf_jax.data import check_images, dataset_info, list_datasets, load
from elf_jax.data.registry import IMAGENET_SUBSETS


@pytest.fixture(scope="module")
def mnist_train():
    return load("mnist5k", "train")


def test_mnist5k_shapes_balance_and_stats(mnist_train):
    d = mnist_train
    assert d.images.shape == (4000, 28, 28, 1) and d.images.dtype == np.float32
    assert d.labels.dtype == np.int32 and d.num_classes == 10
    assert np.all(d.class_counts() == 400)
    assert d.mean == (0.1307,) and d.std == (0.3081,) and d.image_shape == (28, 28, 1)
    # MNIST stats applied: real MNIST pixels -> roughly zero mean, unit std
    assert abs(float(d.images.mean())) < 0.1 and 0.9 < float(d.images.std()) < 1.1
    unit = d.to_unit(d.images)
    assert unit.min() >= -1e-5 and unit.max() <= 1 + 1e-5
    t = load("mnist5k", "test")
    assert t.images.shape == (1000, 28, 28, 1) and np.all(t.class_counts() == 100)


def test_mnist5k_split_is_deterministic_and_disjoint(mnist_train):
    again = load("mnist5k", "train")
    np.testing.assert_array_equal(again.images, mnist_train.images)
    np.testing.assert_array_equal(again.labels, mnist_train.labels)
    test = load("mnist5k", "test", normalize=False)
    train = load("mnist5k", "train", normalize=False)
    allx = np.concatenate([train.images, test.images]).reshape(5000, -1)
    # 5000 distinct real images in total: no image in both splits
    assert len({r.tobytes() for r in allx}) == len(np.unique(allx, axis=0))
    tr = {r.tobytes() for r in train.images.reshape(4000, -1)}
    assert not any(r.tobytes() in tr for r in test.images.reshape(1000, -1))


@pytest.mark.parametrize("size", [8, 16, 32])
def test_digits_sizes(size):
    d = load("digits", "train", image_size=size)
    t = load("digits", "test", image_size=size)
    assert d.images.shape == (1438, size, size, 1) and t.images.shape == (359, size, size, 1)
    assert np.all(np.abs(d.class_counts() - d.class_counts().mean()) < 10)
    # own mean/std computed from train at that size
    assert abs(float(d.images.mean())) < 1e-4 and abs(float(d.images.std()) - 1) < 1e-3
    assert dataset_info("digits").image_shape == (8, 8, 1)


def test_digits_bad_size():
    with pytest.raises(ValueError, match="image_size"):
        load("digits", "train", image_size=12)
    with pytest.raises(ValueError, match="only supported for 'digits'"):
        load("mnist5k", "train", image_size=32)


def test_unknown_dataset_lists_known():
    with pytest.raises(ValueError) as e:
        load("cifar11", "train")
    msg = str(e.value)
    assert "cifar10" in msg and "mnist5k" in msg and "Did you mean" in msg
    with pytest.raises(ValueError, match="split"):
        load("mnist5k", "validation")


def test_registry_reference_stats():
    assert dataset_info("cifar10").mean == (0.4914, 0.4822, 0.4465)
    assert dataset_info("cifar10").std == (0.2023, 0.1994, 0.2010)
    assert dataset_info("cifar100").mean == (0.5071, 0.4866, 0.4409)
    assert dataset_info("cifar100", stats="mtt").mean == (0.4914, 0.4822, 0.4465)
    assert dataset_info("svhn").std == (0.1980, 0.2010, 0.1970)
    assert dataset_info("fashion_mnist").mean == (0.2861,)
    ti = dataset_info("tiny_imagenet")
    assert ti.image_shape == (64, 64, 3) and ti.num_classes == 200
    assert ti.mean == (0.485, 0.456, 0.406) and ti.tfds_split("test") == "validation"
    assert dataset_info("imagenette").image_shape == (128, 128, 3)
    assert dataset_info("imagewoof_64").image_shape == (64, 64, 3)
    assert dataset_info("imagenet64").num_classes == 1000
    assert IMAGENET_SUBSETS["imagenette"] == (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)
    assert all(len(set(v)) == 10 for v in IMAGENET_SUBSETS.values())
    names = list_datasets()
    for n in ("mnist", "svhn", "cifar100", "tiny_imagenet", "imagesquawk", "imagemeow_64",
              "imagenet_resized/64x64", "mnist5k", "digits"):
        assert n in names


def test_check_images_errors(mnist_train):
    x = mnist_train.images[:4]
    mnist_train.check(x)
    with pytest.raises(ValueError, match="NCHW"):
        check_images(x.transpose(0, 3, 1, 2), (28, 28, 1))
    with pytest.raises(ValueError, match="batch"):
        check_images(x[0], (28, 28, 1))
    with pytest.raises(ValueError, match="dtype"):
        check_images((x * 255).astype(np.uint8), (28, 28, 1))
    with pytest.raises(ValueError, match="raw 0..255"):
        check_images(x * 0 + 200.0, (28, 28, 1))
    with pytest.raises(ValueError, match="NaN"):
        check_images(np.full_like(x, np.nan), (28, 28, 1))
    with pytest.raises(ValueError, match=r"expected \[N, 32, 32, 3\]"):
        check_images(x, (32, 32, 3))
