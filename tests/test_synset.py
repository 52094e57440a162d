"""Tests for elf_jax.synset."""
import json
import types

import jax
import numpy as np
import pytest

from elf_jax import checkpoint
from elf_jax.hashing import fingerprint
from elf_jax.synset import (SyntheticSet, from_npz, load_synset, random_real_subset,
                            save_synset, to_npz)

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _set(soft=False, lr=None, n_per=2, k=3):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(n_per * k, 8, 8, 1)).astype(np.float32)
    labels = np.repeat(np.arange(k), n_per).astype(np.int32)
    if soft:
        labels = np.eye(k, dtype=np.float32)[labels] * 0.9 + 0.1 / k
    meta = {"method": "dm", "dataset": "mnist5k", "arch": "ConvNet", "iteration": 10}
    return SyntheticSet(images, labels, lr=lr, metadata=meta, num_classes=k)


def test_fields_and_defaults():
    s = _set()
    assert s.images.dtype == np.float32 and s.labels.dtype == np.int32
    assert s.num_classes == 3 and s.ipc == 2 and len(s) == 6 and not s.soft
    m = s.metadata
    assert m["method"] == "dm" and m["zca"] is False and m["num_classes"] == 3
    assert set(["method", "dataset", "ipc", "arch", "zca", "iteration"]) <= set(m)
    soft = _set(soft=True, lr=0.01)
    assert soft.soft and soft.num_classes == 3 and soft.lr == pytest.approx(0.01)
    np.testing.assert_array_equal(soft.hard_labels(), _set().labels)
    # jax inputs are accepted and moved to host
    s2 = SyntheticSet(jax.numpy.asarray(s.images), jax.numpy.asarray(s.labels),
                      lr=jax.numpy.float32(0.02), num_classes=3)
    assert isinstance(s2.images, np.ndarray) and s2.lr == pytest.approx(0.02)


def test_validation_errors():
    s = _set()
    bad = s.images.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN/Inf"):
        SyntheticSet(bad, s.labels)
    with pytest.raises(ValueError, match="learned lr is nan"):
        SyntheticSet(s.images, s.labels, lr=float("nan"))
    with pytest.raises(ValueError, match="positive"):
        SyntheticSet(s.images, s.labels, lr=-1.0)
    with pytest.raises(ValueError, match=r"\[0, 2\] for 3 classes, found range \[0, 3\]"):
        SyntheticSet(s.images, np.array([0, 1, 2, 3, 0, 1]), num_classes=3)
    with pytest.raises(ValueError, match="found range"):
        SyntheticSet(s.images, np.array([0, 1, 2, -1, 0, 1]))
    with pytest.raises(ValueError, match="NHWC"):
        SyntheticSet(s.images[0], s.labels)
    with pytest.raises(ValueError, match="6 images but 5 labels"):
        SyntheticSet(s.images, s.labels[:5])
    with pytest.raises(ValueError, match="soft labels have 3 classes"):
        SyntheticSet(s.images, np.ones((6, 3), np.float32), num_classes=10)
    with pytest.raises(ValueError, match="integers"):
        SyntheticSet(s.images, s.labels + 0.5)


def test_content_hash():
    a, b = _set(), _set()
    assert a.content_hash() == b.content_hash() and len(a.content_hash()) == 64
    imgs = a.images.copy()
    imgs[0, 0, 0, 0] += 1e-3
    assert SyntheticSet(imgs, a.labels).content_hash() != a.content_hash()
    lab = a.labels.copy()
    lab[0], lab[-1] = lab[-1], lab[0]
    assert SyntheticSet(a.images, lab).content_hash() != a.content_hash()
    # lr and metadata do not change the content hash
    assert a.replace(lr=0.5, metadata={"iteration": 99}).content_hash() == a.content_hash()


@pytest.mark.parametrize("soft,lr", [(False, None), (True, 0.03)])
def test_orbax_roundtrip(tmp_path, soft, lr):
    s = _set(soft=soft, lr=lr)
    save_synset(tmp_path / "syn", s)
    r = load_synset(tmp_path / "syn", expect={"method": "dm", "ipc": 2})
    np.testing.assert_array_equal(r.images, s.images)
    np.testing.assert_array_equal(r.labels, s.labels)
    assert r.lr == s.lr and r.metadata == s.metadata
    assert r.content_hash() == s.content_hash()
    with pytest.raises(ValueError, match=r"another method \(saved vs asked\): 'dm' vs 'mtt'"):
        load_synset(tmp_path / "syn", expect={"method": "mtt"})


def test_orbax_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_synset(tmp_path / "missing")
    checkpoint.save_tree(tmp_path / "other", {"x": np.ones(2)}, {"kind": "bank"})
    with pytest.raises(ValueError, match="not a synthetic set"):
        load_synset(tmp_path / "other")
    # content that does not match its stored hash is refused
    s = _set()
    meta = json.loads((save_synset(tmp_path / "syn", s) / "metadata" / "metadata").read_text())
    meta["content_hash"] = "0" * 64
    (tmp_path / "syn" / "metadata" / "metadata").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="corrupt"):
        load_synset(tmp_path / "syn")


@pytest.mark.parametrize("soft,lr", [(False, None), (True, 0.03)])
def test_npz_roundtrip(tmp_path, soft, lr):
    s = _set(soft=soft, lr=lr)
    p = to_npz(tmp_path / "syn.npz", s)
    r = from_npz(p)
    np.testing.assert_array_equal(r.images, s.images)
    np.testing.assert_array_equal(r.labels, s.labels)
    assert r.lr == s.lr and r.metadata == s.metadata
    with pytest.raises(FileNotFoundError):
        from_npz(tmp_path / "nope.npz")
    np.savez(tmp_path / "bad.npz", x=np.ones(2))
    with pytest.raises(ValueError, match="needs 'images'"):
        from_npz(tmp_path / "bad.npz")


def _fake_dataset(per_class=(5, 6, 4)):
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(per_class)]).astype(np.int32)
    rng = np.random.default_rng(1)
    labels = rng.permutation(labels)
    images = rng.normal(size=(labels.size, 4, 4, 1)).astype(np.float32)
    return types.SimpleNamespace(images=images, labels=labels, num_classes=len(per_class),
                                 name="toy")


def test_random_real_subset():
    ds = _fake_dataset()
    s = random_real_subset(jax.random.key(0), ds, 3)
    assert len(s) == 9 and s.ipc == 3 and s.num_classes == 3
    np.testing.assert_array_equal(s.labels, np.repeat(np.arange(3), 3))
    assert s.metadata["method"] == "real_random" and s.metadata["dataset"] == "toy"
    # every picked image is a real image of the right class, no duplicates
    for img, lab in zip(s.images, s.labels):
        match = np.flatnonzero((ds.images == img).all(axis=(1, 2, 3)))
        assert match.size == 1 and ds.labels[match[0]] == lab
    assert len({im.tobytes() for im in s.images}) == 9
    # deterministic per key, different across keys
    s2 = random_real_subset(jax.random.key(0), ds, 3)
    assert s2.content_hash() == s.content_hash()
    assert random_real_subset(jax.random.key(1), ds, 3).content_hash() != s.content_hash()
    legacy = random_real_subset(jax.random.PRNGKey(0), ds, 3)  # raw uint32 keys work too
    assert legacy.content_hash() == s.content_hash() and legacy.metadata["seed_key"] == [0, 0]
    with pytest.raises(ValueError, match="class 2 .* only 4 images but ipc=5"):
        random_real_subset(jax.random.key(0), ds, 5)


def test_random_real_subset_mnist5k():
    data = pytest.importorskip("elf_jax.data")
    if not hasattr(data, "load"):
        pytest.skip("elf_jax.data.load not available yet")
    ds = data.load("mnist5k", "train")
    s = random_real_subset(jax.random.key(0), ds, 10)
    assert len(s) == 10 * ds.num_classes and s.image_shape == tuple(ds.images.shape[1:])
    assert s.metadata["dataset"] == ds.name


def _flip_image_byte(data: bytes) -> bytes:
    """The npz bytes with one byte of the stored images changed (the zip stays readable)."""
    i = data.index(b"images.npy") + 200  # inside the member's array data
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]


def test_npz_damaged_files_are_one_line_errors(tmp_path):
    """Truncated, random, corrupted or pickled .npz files: a ValueError saying the file is
    not a valid npz (never numpy's advice to allow pickles, never a BadZipFile)."""
    good = to_npz(tmp_path / "good.npz", _set()).read_bytes()
    np.save(tmp_path / "array.npy", np.ones(3))
    cases = {"truncated": good[: len(good) // 2], "random": np.random.default_rng(0).bytes(900),
             "bitflip": _flip_image_byte(good), "npy": (tmp_path / "array.npy").read_bytes()}
    for name, data in cases.items():
        (tmp_path / f"{name}.npz").write_bytes(data)
        with pytest.raises(ValueError, match="not a valid .npz archive") as e:
            from_npz(tmp_path / f"{name}.npz")
        assert "allow_pickle" not in str(e.value) and "\n" not in str(e.value)
    np.savez(tmp_path / "objects.npz", images=np.array([{}], object), labels=np.zeros(1))
    with pytest.raises(ValueError, match="holds Python objects") as e:
        from_npz(tmp_path / "objects.npz")
    assert "allow_pickle" not in str(e.value)


def test_damage_is_corruption_not_divergence(tmp_path):
    """NaN in a file whose content hash does not match = corrupt; NaN in a file that matches
    its hash = the distillation diverged; unreadable arrays = corrupt."""
    s = _set()
    meta = json.loads(str(np.load(to_npz(tmp_path / "s.npz", s))["metadata_json"]))
    nan_images = s.images.copy()
    nan_images[0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "flipped.npz", images=nan_images, labels=s.labels,
             metadata_json=json.dumps(meta))
    with pytest.raises(ValueError, match=r"flipped.npz is corrupt \(content hash mismatch"):
        from_npz(tmp_path / "flipped.npz")
    meta["content_hash"] = fingerprint(nan_images, s.labels)
    np.savez(tmp_path / "nan.npz", images=nan_images, labels=s.labels,
             metadata_json=json.dumps(meta))
    with pytest.raises(ValueError, match="diverged"):
        from_npz(tmp_path / "nan.npz")
    save_synset(tmp_path / "syn", s)
    for f in (tmp_path / "syn" / "tree").rglob("d/*"):  # the array chunks
        f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(ValueError, match=r"syn is corrupt \(unreadable: .*re-run `elf-jax distill`"):
        load_synset(tmp_path / "syn")
