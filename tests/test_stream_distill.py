"""Class-conditional sampling and the distillation methods on a streamed split (issue 14):
a tiny local TFDS dataset opened in memory and streamed gives the same draws, the same
initial sets and the same distilled sets."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _tfds_fixtures as fx  # noqa: E402

from elf_jax.data.sampler import (ClassIndex, StreamedClassIndex, class_index,  # noqa: E402
                                  take_rows)
from elf_jax.data.stream import StreamedSplit, open_split  # noqa: E402
from elf_jax.distill import common as C  # noqa: E402
from elf_jax.distill import distill  # noqa: E402
from elf_jax.distill.gradient_matching import make_gm_step  # noqa: E402
from elf_jax.models import get_model  # noqa: E402
from elf_jax.synset import random_real_subset  # noqa: E402

pytestmark = pytest.mark.numerics  # rounding-sensitive: make test-avx2 reruns it

TINY = dict(width=8, depth=1)
AUG = "crop_flip"


def _both(info, data_dir):
    """The train split of ``info`` in memory and streamed."""
    with pytest.MonkeyPatch.context() as mp:
        fx.register(mp, info)
        mem = open_split(info.name, "train", mode="memory", data_dir=data_dir)
        streamed = open_split(info.name, "train", mode="stream", data_dir=data_dir, workers=2)
    assert isinstance(streamed, StreamedSplit) and not isinstance(mem, StreamedSplit)
    np.testing.assert_array_equal(mem.labels, streamed.labels)
    return mem, streamed


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def splits(data_dir):
    return _both(fx.TEST_INFO, data_dir)


def test_streamed_class_index_draws_equal_class_index(splits):
    mem, streamed = splits
    ci, si = ClassIndex(mem), StreamedClassIndex(streamed)
    assert isinstance(class_index(mem), ClassIndex)
    assert isinstance(class_index(streamed), StreamedClassIndex)
    assert not hasattr(si.arrays, "images") and list(si.counts) == [12] * 4
    np.testing.assert_array_equal(np.asarray(si.arrays.table), np.asarray(ci.arrays.table))
    for seed, c, n in ((0, 0, 5), (1, 3, 12), (2, 1, 1)):
        key = jax.random.key(seed)
        idx = np.asarray(si.sample_class_indices(key, c, n))
        np.testing.assert_array_equal(idx, np.asarray(ci.sample_class_indices(key, c, n)))
        assert np.all(mem.labels[idx] == c) and len(set(idx.tolist())) == n
        np.testing.assert_array_equal(np.asarray(si.sample_class(key, c, n)),
                                      np.asarray(ci.sample_class(key, c, n)))
    key = jax.random.key(7)
    got, want = np.asarray(si.sample_all_classes(key, 6)), np.asarray(ci.sample_all_classes(key, 6))
    assert got.shape == (4, 6, 8, 8, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(mem.images[np.asarray(si.sample_all_classes_indices(key, 6))],
                                  want)
    with pytest.raises(ValueError, match="cannot draw"):
        si.sample_class(key, 0, 13)
    with pytest.raises(ValueError, match="StreamedClassIndex"):
        ClassIndex(streamed)
    with pytest.raises(ValueError, match="ClassIndex"):
        StreamedClassIndex(mem)


def test_initial_sets_and_real_subsets_equal(splits):
    mem, streamed = splits
    rows = [3, 40, 0, 3]
    np.testing.assert_array_equal(take_rows(streamed, rows), mem.images[rows])
    for init in ("real", "noise"):
        a = C.init_synthetic(jax.random.key(3), mem, 3, init)
        b = C.init_synthetic(jax.random.key(3), streamed, 3, init)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    assert C.real_batch_size(streamed, 100) == 12 and list(C.check_ipc(streamed, 2)) == [12] * 4
    with pytest.raises(ValueError, match="lower ipc"):
        C.check_ipc(streamed, 13)
    a, b = random_real_subset(jax.random.key(4), mem, 2), random_real_subset(
        jax.random.key(4), streamed, 2)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.metadata == b.metadata


def test_dm_streamed_equals_in_memory(splits):
    kw = dict(ipc=2, iterations=3, batch_real=8, model_kwargs=TINY, dsa_strategy=AUG,
              key=jax.random.key(5), progress=False)
    a, b = (distill("dm", d, **kw) for d in splits)
    # the same jitted step on bit-identical real batches (exact on XLA:CPU)
    np.testing.assert_allclose(a.images, b.images, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(a.labels, b.labels)
    _assert_moved(a, distill("dm", splits[1], **{**kw, "iterations": 0}))


def _assert_moved(final, initial):
    """The iterations changed the set (an equality of two unchanged sets proves nothing)."""
    assert np.abs(final.images - initial.images).max() > 1e-4


def test_dsa_batchnorm_streamed_equals_in_memory(data_dir):
    """Gradient matching reads every round's real images on the host: the matching batches
    and, for a BatchNorm net, 16 images per class for its statistics."""
    mem, streamed = _both(fx.BN_INFO, data_dir)
    kw = dict(arch="ConvNetBN", ipc=1, iterations=2, outer_loop=2, inner_loop=1,
              batch_real=8, batch_train=4, model_kwargs=TINY, dsa_strategy=AUG,
              key=jax.random.key(8), progress=False)
    a, b = distill("dsa", mem, **kw), distill("dsa", streamed, **kw)
    # exact on XLA:CPU (both host loops); elsewhere the in-memory run is one jitted step,
    # equal to the host loop up to float reassociation (as in test_distill)
    np.testing.assert_allclose(a.images, b.images, rtol=1e-4, atol=1e-5)
    _assert_moved(b, distill("dsa", streamed, **{**kw, "iterations": 0}))


def test_one_jitted_gm_step_refuses_a_streamed_pool(splits):
    net = get_model("ConvNet", 4, **TINY)
    step = make_gm_step(net, num_classes=4, ipc=1, outer_loop=1, inner_loop=0,
                        batch_real=4, host_loop=False)
    state = C.init_state({"images": np.zeros((4, 8, 8, 3), np.float32)}, step.optimizer,
                         jax.random.key(0))
    with pytest.raises(ValueError, match="host_loop=True"):
        step(state, jax.random.key(1), StreamedClassIndex(splits[1]))


def test_mtt_with_given_experts_streamed_equals_in_memory(splits):
    """MTT reads the real data only for its initial set (the experts are given here)."""
    net = get_model("ConvNet", 4, **TINY)
    x = np.zeros((1, 8, 8, 3), np.float32)
    experts = [[net.init(jax.random.key(10 + t), x)["params"] for t in range(2)]]
    kw = dict(ipc=1, iterations=2, syn_steps=2, expert_epochs=1, max_start_epoch=1,
              experts=experts, model_kwargs=TINY, dsa_strategy=AUG, key=jax.random.key(9),
              progress=False)
    a, b = (distill("mtt", d, **kw) for d in splits)
    np.testing.assert_allclose(a.images, b.images, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.lr, b.lr, rtol=1e-6)
    _assert_moved(b, distill("mtt", splits[1], **{**kw, "iterations": 0}))
