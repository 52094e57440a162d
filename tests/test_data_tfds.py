"""TFDS pipeline without network or TensorFlow: tiny datasets prepared locally (array_record)
and read through the real `load`, `make_loader`, `StreamingClassSampler`; manual-dir
builders (tiny_imagenet, ImageNet subsets) on fake downloads; in-memory ClassIndex."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _tfds_fixtures as fx  # noqa: E402

from elf_jax.data import ClassIndex, StreamingClassSampler, load, make_loader, registry  # noqa: E402
from elf_jax.data.tfds_source import DatasetNotPreparedError  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture
def tiny(monkeypatch, data_dir):
    return fx.register(monkeypatch)


def _rows(a):
    return sorted(r.tobytes() for r in np.asarray(a).reshape(len(a), -1))


def test_prepare_and_load_without_tensorflow(tiny, data_dir):
    d = load("elf_test_tiny", "train", data_dir=data_dir, normalize=False, cache=False)
    x, y = fx.expected_split("train")
    assert d.images.shape == (48, 8, 8, 3) and d.images.dtype == np.float32
    assert d.labels.dtype == np.int32 and d.num_classes == fx.NUM_CLASSES
    got = np.rint(d.images * 255).astype(np.uint8)
    # TFDS shuffles record order: compare (image, label) pairs as sets
    assert _rows(got) == _rows(x)
    key = {r.tobytes(): int(l) for r, l in zip(x.reshape(48, -1), y)}
    assert all(key[r.tobytes()] == int(l) for r, l in zip(got.reshape(48, -1), d.labels))
    assert "tensorflow" not in sys.modules
    assert (data_dir / "elf_test_tiny" / "1.0.0").is_dir()
    assert any("array_record" in p.name for p in (data_dir / "elf_test_tiny" / "1.0.0").iterdir())


def test_normalized_load_and_array_cache(tiny, data_dir):
    raw = load("elf_test_tiny", "test", data_dir=data_dir, normalize=False, cache=False)
    d1 = load("elf_test_tiny", "test", data_dir=data_dir)  # writes the npz cache
    d2 = load("elf_test_tiny", "test", data_dir=data_dir)  # reads it
    np.testing.assert_allclose(d1.images, (raw.images - np.float32([0.5, 0.4, 0.3]))
                               / np.float32([0.25, 0.2, 0.15]), atol=1e-5)
    np.testing.assert_array_equal(d1.images, d2.images)
    np.testing.assert_array_equal(d1.labels, d2.labels)
    assert list((data_dir / "elf_jax_cache" / "arrays").glob("elf_test_tiny_test.npz"))
    sl = load("elf_test_tiny", "train[:10]", data_dir=data_dir, cache=False)
    assert len(sl) == 10


def test_not_prepared_error(tiny, tmp_path):
    with pytest.raises(DatasetNotPreparedError, match="not prepared"):
        load("elf_test_tiny", "train", data_dir=tmp_path / "empty", download=False)
    with pytest.raises(DatasetNotPreparedError, match="tfds build cifar10"):
        load("cifar10", "train", data_dir=tmp_path / "empty", download=False)


def test_download_offline_fails_fast_with_one_line(tiny, tmp_path, monkeypatch, capsys):
    """A dataset that must be downloaded into an empty data_dir, the network unreachable: said
    up front, then one error naming the data_dir and what to do, without TFDS's retries."""
    import tensorflow_datasets as tfds

    from elf_jax.data import tfds_source

    def no_download(*a, **k):
        raise AssertionError("download_and_prepare must not start")

    monkeypatch.setattr(tfds_source, "reachable", lambda hosts: False)  # never the network
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    empty = tmp_path / "empty"
    with pytest.raises(DatasetNotPreparedError) as e:
        load("mnist", "train", data_dir=empty)
    msg = str(e.value)
    assert f"not prepared in {empty}" in msg and "tfds build mnist" in msg
    assert "--config.data_dir" in msg and "\n" not in msg
    assert f"mnist is not in {empty}; downloading it (needs network)" in capsys.readouterr().err


def test_reachable_and_download_hosts(tiny, tmp_path, monkeypatch):
    import socket

    from elf_jax.data import tfds_source

    for var in tfds_source._PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        here = [("127.0.0.1", srv.getsockname()[1])]
        assert not tfds_source.reachable(here, timeout=1)  # not listening yet
        srv.listen()
        assert tfds_source.reachable(here, timeout=1)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert tfds_source.reachable(here, timeout=1)  # the proxy decides
    assert tfds_source.download_hosts(tfds_source.get_builder(fx.TEST_INFO, tmp_path)) == []
    mnist = tfds_source.get_builder(registry.dataset_info("mnist"), tmp_path)
    assert tfds_source.download_hosts(mnist) == [("storage.googleapis.com", 443)]


def test_grain_loader_epoch_sharding_determinism(tiny, data_dir):
    seen = []
    for shard in range(2):
        loader = make_loader("elf_test_tiny", "train", 8, seed=3, shard_index=shard,
                             shard_count=2, data_dir=data_dir, normalize=False)
        batches = list(loader)
        assert len(batches) == 3
        for b in batches:
            assert b["image"].shape == (8, 8, 8, 3) and b["image"].dtype == np.float32
            assert b["label"].shape == (8,) and b["label"].dtype == np.int32
        seen.append(np.concatenate([b["image"] for b in batches]))
    allx = np.rint(np.concatenate(seen) * 255).astype(np.uint8)
    assert _rows(allx) == _rows(fx.expected_split("train")[0])  # shards disjoint, cover all
    a = [b["label"] for b in make_loader("elf_test_tiny", "train", 8, seed=3, shard_index=0,
                                         shard_count=2, data_dir=data_dir)]
    b = [b["label"] for b in make_loader("elf_test_tiny", "train", 8, seed=3, shard_index=0,
                                         shard_count=2, data_dir=data_dir)]
    c = [b["label"] for b in make_loader("elf_test_tiny", "train", 8, seed=4, shard_index=0,
                                         shard_count=2, data_dir=data_dir)]
    np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
    assert not np.array_equal(np.concatenate(a), np.concatenate(c))


def test_grain_loader_embedded_and_normalized():
    loader = make_loader("mnist5k", "test", 100, seed=0, shard_index=0, shard_count=1,
                         num_epochs=1)
    batches = list(loader)
    assert len(batches) == 10
    labels = np.concatenate([b["label"] for b in batches])
    assert np.all(np.bincount(labels) == 100)
    x = np.concatenate([b["image"] for b in batches])
    ref = load("mnist5k", "test")
    assert _rows(x) == _rows(ref.images)
    with pytest.raises(ValueError, match="shard_index"):
        make_loader("mnist5k", "test", 10, shard_index=2, shard_count=2)


def test_streaming_class_sampler(tiny, data_dir):
    # download=True prepares the local builder here if this xdist worker has not yet (the
    # sampler's default reads prepared data only; the test must not rely on test order)
    s = StreamingClassSampler("elf_test_tiny", "train", data_dir=data_dir, normalize=False,
                              download=True)
    assert list(s.counts) == [12] * 4
    x = s.sample_class(np.random.default_rng(0), 2, 5)
    assert x.shape == (5, 8, 8, 3) and x.dtype == np.float32
    full = load("elf_test_tiny", "train", data_dir=data_dir, normalize=False)
    cls2 = set(_rows(np.rint(full.images[full.labels == 2] * 255).astype(np.uint8)))
    got = _rows(np.rint(x * 255).astype(np.uint8))
    assert set(got) <= cls2 and len(set(got)) == 5
    assert s.sample_all_classes(np.random.default_rng(1), 3).shape == (4, 3, 8, 8, 3)
    with pytest.raises(ValueError, match="cannot draw"):
        s.sample_class(np.random.default_rng(0), 0, 13)


def test_class_index_sampling():
    d = load("digits", "train")
    ci = ClassIndex(d)
    key = jax.random.key(0)
    x = np.asarray(ci.sample_class(key, 3, 40))
    cls3 = set(_rows(d.images[d.labels == 3]))
    assert x.shape == (40, 8, 8, 1) and set(_rows(x)) <= cls3
    idx = np.asarray(ci.sample_class_indices(key, 3, 40))
    assert len(set(idx.tolist())) == 40 and np.all(d.labels[idx] == 3)
    np.testing.assert_array_equal(d.images[idx], x)
    np.testing.assert_array_equal(x, np.asarray(ci.sample_class(key, 3, 40)))
    # jittable with a traced class
    f = jax.jit(lambda k, c: ci.sample_class(k, c, 8))
    y = np.asarray(f(key, jnp.int32(5)))
    assert set(_rows(y)) <= set(_rows(d.images[d.labels == 5]))
    # drawing the whole class returns every index once (without replacement)
    n5 = int(d.class_counts()[5])
    allc = np.asarray(ci.sample_class_indices(jax.random.key(1), 5, n5))
    assert sorted(allc.tolist()) == np.flatnonzero(d.labels == 5).tolist()
    # different keys give different draws; roughly uniform over the class
    hits = np.zeros(len(d), int)
    for i in range(200):
        hits[np.asarray(ci.sample_class_indices(jax.random.key(i), 5, 10))] += 1
    assert hits[d.labels != 5].sum() == 0
    frac = hits[d.labels == 5] / 200
    assert abs(frac.mean() - 10 / n5) < 1e-9 and frac.min() > 0
    assert ci.sample_all_classes(key, 4).shape == (10, 4, 8, 8, 1)
    with pytest.raises(ValueError, match="cannot draw"):
        ci.sample_class(key, 5, n5 + 1)


def _jpeg(path, size, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if seed % 7 == 0 else "RGB"  # some grayscale files, as in the real data
    a = rng.integers(0, 256, size[::-1] + ((3,) if mode == "RGB" else ()), dtype=np.uint8)
    Image.fromarray(a, mode).save(path, format="JPEG")


def test_tiny_imagenet_manual_builder(tmp_path):
    manual = tmp_path / "manual"
    root = manual / "tiny-imagenet-200"
    wnids = [f"n{9000000 + 7 * i:08d}" for i in range(200)]
    (root).mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")
    ann = []
    for i, w in enumerate(wnids):
        _jpeg(root / "train" / w / "images" / f"{w}_0.JPEG", (64, 64), i)
        if i < 20:
            _jpeg(root / "val" / "images" / f"val_{i}.JPEG", (64, 64), 1000 + i)
            ann.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    dd = tmp_path / "dd"
    with pytest.raises(DatasetNotPreparedError, match="tiny-imagenet-200.zip"):
        load("tiny_imagenet", "train", data_dir=dd, manual_dir=tmp_path / "nothing")
    tr = load("tiny_imagenet", "train", data_dir=dd, manual_dir=manual, cache=False)
    assert tr.images.shape == (200, 64, 64, 3) and tr.num_classes == 200
    assert sorted(tr.labels.tolist()) == list(range(200))  # sorted-wnid classes
    te = load("tiny_imagenet", "test", data_dir=dd, manual_dir=manual, cache=False)
    assert sorted(te.labels.tolist()) == list(range(20))


def test_imagenet_subset_from_image_folder(tmp_path):
    from elf_jax.data.tfds_source import imagenet_wnids

    wn = imagenet_wnids()
    manual = tmp_path / "manual"
    subset = registry.IMAGENET_SUBSETS["imagewoof"]
    for c, idx in enumerate(subset):
        for j in range(2):
            _jpeg(manual / "imagenet" / "train" / wn[idx] / f"{j}.JPEG", (90, 70), 10 * c + j)
        _jpeg(manual / "imagenet" / "val" / wn[idx] / "v.JPEG", (70, 90), 500 + c)
    tr = load("imagewoof_64", "train", data_dir=tmp_path / "dd", manual_dir=manual,
              cache=False)
    assert tr.images.shape == (20, 64, 64, 3)
    assert np.all(tr.class_counts() == 2)
    te = load("imagewoof_64", "test", data_dir=tmp_path / "dd", manual_dir=manual, cache=False)
    assert np.all(te.class_counts() == 1)
