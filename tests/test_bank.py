"""Tests for elf_jax.elf.bank (teacher feature bank)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elf_jax.elf.bank import FeatureBank, build_bank, load_bank, save_bank
from elf_jax.synset import SyntheticSet

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

WIDTH = 8


def _get_model(name, k, **kw):
    from elf_jax.models import get_model

    return get_model(name, k, **kw)


def _synset(n=10, seed=0, k=10):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, 28, 28, 1)).astype(np.float32)
    return SyntheticSet(images, np.arange(n) % k, num_classes=k,
                        metadata={"method": "real_random", "dataset": "mnist5k"})


@pytest.fixture(scope="module")
def teacher():
    net = _get_model("ConvNet", 10, width=WIDTH)
    variables = jax.jit(net.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    return net, variables


def test_default_layer_is_front(teacher):
    net, v = teacher
    s = _synset()
    bank = build_bank(net, v, s, teacher_name="ConvNet", snapshot_epoch=3, batch_size=4)
    assert bank.features.shape == (10, 4, 4, WIDTH) and bank.features.dtype == np.float32
    front = net.apply(v, jnp.asarray(s.images), False, method=net.front)
    np.testing.assert_allclose(bank.features, np.asarray(front), rtol=1e-5, atol=1e-6)
    m = bank.metadata
    assert m["teacher"] == "ConvNet" and m["snapshot_epoch"] == 3 and m["layer"] == "front"
    assert m["dataset"] == "mnist5k" and m["feature_shape"] == [4, 4, WIDTH]
    assert m["synset_hash"] == s.content_hash() and m["num_images"] == 10
    # batching does not change the result; the front equals the last block's intermediate
    one = build_bank(net, v, s, teacher_name="ConvNet", snapshot_epoch=3, batch_size=256)
    np.testing.assert_allclose(one.features, bank.features, rtol=1e-5, atol=1e-6)
    last = build_bank(net, v, s, teacher_name="ConvNet", snapshot_epoch=3, layer="block3")
    np.testing.assert_allclose(last.features, bank.features, rtol=1e-5, atol=1e-6)
    assert last.metadata["layer"] == "block3"


def test_named_layers_and_unknown(teacher):
    net, v = teacher
    s = _synset(4)
    b1 = build_bank(net, v, s, teacher_name="ConvNet", snapshot_epoch=0, layer="block1")
    assert b1.feature_shape == (16, 16, WIDTH)
    pre = build_bank(net, v, s, teacher_name="ConvNet", snapshot_epoch=0, layer="pre_logits")
    assert pre.feature_shape == (4 * 4 * WIDTH,)
    with pytest.raises(ValueError, match=r"no intermediate 'block9'.*block1"):
        build_bank(net, v, s, teacher_name="ConvNet", snapshot_epoch=0, layer="block9")


def test_batchnorm_teacher_inference_mode():
    net = _get_model("ConvNetBN", 10, width=WIDTH)
    v = jax.jit(net.init)(jax.random.key(1), jnp.zeros((1, 28, 28, 1)))
    assert "batch_stats" in v
    s = _synset(5)
    bank = build_bank(net, v, s, teacher_name="ConvNetBN", snapshot_epoch=1)
    ref = net.apply(v, jnp.asarray(s.images), False, method=net.front)
    np.testing.assert_allclose(bank.features, np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_save_load_and_mismatch(tmp_path, teacher):
    net, v = teacher
    s = _synset()
    bank = build_bank(net, v, s, teacher_name="ConvNetW8", snapshot_epoch=2)
    save_bank(tmp_path / "bank", bank)
    r = load_bank(tmp_path / "bank", expect_synset=s, expect_teacher=("ConvNetW8", 2))
    np.testing.assert_array_equal(r.features, bank.features)
    assert r.metadata == bank.metadata
    load_bank(tmp_path / "bank", expect_synset=s.content_hash(), expect_teacher="ConvNetW8")
    other = _synset(seed=1)
    both = s.content_hash()[:12] + r".*" + other.content_hash()[:12]
    with pytest.raises(ValueError, match=both):
        load_bank(tmp_path / "bank", expect_synset=other)
    with pytest.raises(ValueError, match=r"teacher='ConvNetW8'.*teacher='ConvNetW512'"):
        load_bank(tmp_path / "bank", expect_teacher="ConvNetW512")
    with pytest.raises(ValueError, match=r"snapshot_epoch=2.*snapshot_epoch=100"):
        load_bank(tmp_path / "bank", expect_teacher=("ConvNetW8", 100))
    with pytest.raises(ValueError, match="rebuild"):
        bank.check_synset(other)
    with pytest.raises(FileNotFoundError):
        load_bank(tmp_path / "missing")


def test_bank_records_teacher_weights_and_its_own_content(tmp_path, teacher):
    """A bank is tied to the teacher's WEIGHTS (not only its name and epoch), and a stored
    bank whose features changed after saving is refused as corrupt."""
    from elf_jax import checkpoint
    from elf_jax.elf.bank import teacher_hash

    net, v = teacher
    s = _synset()
    bank = build_bank(net, v, s, teacher_name="ConvNetW8", snapshot_epoch=2)
    save_bank(tmp_path / "bank", bank)
    retrained = jax.tree.map(lambda a: a + 1e-3, v)
    assert teacher_hash(retrained) != bank.metadata["teacher_hash"]
    with pytest.raises(ValueError, match="teacher_hash"):
        load_bank(tmp_path / "bank", expect_teacher={"teacher_hash": teacher_hash(retrained)})
    meta = checkpoint.read_metadata(tmp_path / "bank")  # same metadata, one value changed
    flipped = bank.features.copy()
    flipped.flat[7] = np.nextafter(flipped.flat[7], np.float32(1e9))
    checkpoint.save_tree(tmp_path / "bank", {"features": flipped},
                         {k: v_ for k, v_ in meta.items() if k not in ("format", "elf_jax_version")})
    with pytest.raises(ValueError, match="corrupt"):
        load_bank(tmp_path / "bank")


def test_bad_features():
    with pytest.raises(ValueError, match="NaN/Inf"):
        FeatureBank(np.full((2, 3), np.nan, np.float32), {})
    with pytest.raises(ValueError, match=r"\[N, \.\.\.\]"):
        FeatureBank(np.zeros(3, np.float32), {})
