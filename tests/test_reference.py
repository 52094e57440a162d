"""Reference reproduction options (issue 13): normalization records of synthetic sets and
their conversion on import, config plumbing of ghost BatchNorm (``bn_chunks``).

CIFAR-100 data are not available offline, but importing a set needs only the dataset
registry (shapes, classes, mean/std), so the CIFAR-100 import path runs here on tiny
fabricated images."""

from __future__ import annotations

import numpy as np
import pytest

from elf_jax import pipeline
from elf_jax.config import base_config, check_config
from elf_jax.data import dataset_info
from elf_jax.data.dataset import ArrayDataset
from elf_jax.synset import (SyntheticSet, conform_normalization, from_npz, load_synset,
                            normalization_record, random_real_subset, save_synset, to_npz)

pytestmark = pytest.mark.numerics  # rounding-sensitive: make test-avx2 reruns it

C100_DC = dataset_info("cifar100")  # true CIFAR-100 statistics (our default, DC/DSA/DM)
C100_MTT = dataset_info("cifar100", stats="mtt")  # CIFAR-10's (MTT/ELF utils.py)


def _images(n=6, c=3, s=4, seed=0):
    return np.random.default_rng(seed).standard_normal((n, s, s, c)).astype(np.float32)


def _set(n=6, c=3, **meta):
    return SyntheticSet(_images(n, c), np.arange(n) % 3, metadata=meta, num_classes=3)


def _record(info, zca=False):
    return normalization_record(info.mean, info.std, zca)


def test_sets_made_from_data_record_their_space_and_keep_it_on_disk(tmp_path):
    ds = ArrayDataset(images=_images(12), labels=(np.arange(12) % 3).astype(np.int32),
                      num_classes=3, name="toy", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
                      image_shape=(4, 4, 3))
    s = random_real_subset(np.array([0, 1], np.uint32), ds, 2)
    want = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "zca": False}
    assert s.metadata["normalization"] == want
    assert load_synset(save_synset(tmp_path / "d", s)).metadata["normalization"] == want
    assert from_npz(to_npz(tmp_path / "s.npz", s)).metadata["normalization"] == want
    raw = ArrayDataset(images=_images(12), labels=ds.labels, num_classes=3, name="toy",
                       mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), image_shape=(4, 4, 3),
                       normalized=False)
    assert random_real_subset(np.array([0, 1], np.uint32), raw, 2).metadata["normalization"] == \
        {"mean": [0.0] * 3, "std": [1.0] * 3, "zca": False}


def test_mtt_cifar100_set_converted_into_dc_space():
    s = _set(normalization=_record(C100_MTT))
    logs = []
    out = conform_normalization(s, _record(C100_DC), where="set X", log=logs.append)
    x01 = s.images * np.asarray(C100_MTT.std) + np.asarray(C100_MTT.mean)
    np.testing.assert_allclose(out.images, (x01 - np.asarray(C100_DC.mean)) / np.asarray(C100_DC.std),
                               rtol=1e-6, atol=1e-6)
    # the same pixels: back in [0, 1] space they agree
    np.testing.assert_allclose(out.images * np.asarray(C100_DC.std) + np.asarray(C100_DC.mean),
                               x01, rtol=1e-5, atol=1e-6)
    assert out.metadata["normalization"] == _record(C100_DC)
    assert out.metadata["normalization_from"] == _record(C100_MTT)
    assert len(logs) == 1 and "renormalized from mean [0.4914" in logs[0] and "0.5071" in logs[0]
    same = conform_normalization(out, _record(C100_DC), log=logs.append)
    np.testing.assert_array_equal(same.images, out.images)
    assert len(logs) == 1  # nothing to say


def test_zca_and_channel_mismatches_are_refused_naming_both():
    zs = _set(normalization=normalization_record([0.0] * 3, [1.0] * 3, zca=True))
    with pytest.raises(ValueError, match=r"mean \[0, 0, 0\] std \[1, 1, 1\], ZCA \(the set\) vs "
                                         r"mean \[0.5071.*\(this run\).*ZCA"):
        conform_normalization(zs, _record(C100_DC), where="set Z", log=lambda m: None)
    with pytest.raises(ValueError, match="ZCA"):
        conform_normalization(_set(normalization=_record(C100_DC)), _record(C100_DC, zca=True),
                              log=lambda m: None)
    mn = _set(c=1, normalization=normalization_record([0.1307], [0.3081]))
    with pytest.raises(ValueError, match="channel counts differ"):
        conform_normalization(mn, _record(C100_DC), log=lambda m: None)


def test_old_set_without_record_still_loads_and_says_so(tmp_path):
    old = _set()
    assert "normalization" not in old.metadata
    s = load_synset(save_synset(tmp_path / "old", old))
    logs = []
    out = conform_normalization(s, _record(C100_DC), where="old set", log=logs.append)
    np.testing.assert_array_equal(out.images, s.images)
    assert len(logs) == 1 and "records no normalization" in logs[0] and "0.5071" in logs[0]
    out = conform_normalization(s, _record(C100_DC), assumed=_record(C100_MTT), log=logs.append)
    assert not np.allclose(out.images, s.images)  # assumed in mtt space: converted


def _cifar100_import_config(tmp_path, path, **synset):
    c = base_config()
    c.dataset = "cifar100"
    c.synset.source = "import"
    c.synset.path = str(path)
    for k, v in synset.items():
        c.synset[k] = v
    return c


def _stage_import(config, workdir):
    logs = []
    pipeline.set_logger(logs.append)
    try:
        return pipeline.stage_synset(pipeline.Run(config, workdir)), logs
    finally:
        pipeline.set_logger(print)


def test_reference_pt_cifar100_set_imported_into_dc_run(tmp_path):
    torch = pytest.importorskip("torch")
    ref = tmp_path / "ref"
    ref.mkdir()
    x = np.random.default_rng(1).standard_normal((100, 3, 32, 32)).astype(np.float32)
    torch.save(torch.from_numpy(x), ref / "images_best.pt")
    torch.save(torch.arange(100), ref / "labels_best.pt")  # one image of every class
    s, logs = _stage_import(_cifar100_import_config(tmp_path, ref), tmp_path / "wd")
    want = (x.transpose(0, 2, 3, 1) * np.asarray(C100_MTT.std) + np.asarray(C100_MTT.mean)
            - np.asarray(C100_DC.mean)) / np.asarray(C100_DC.std)
    np.testing.assert_allclose(s.images, want, rtol=1e-5, atol=1e-5)
    assert s.num_classes == 100 and s.metadata["normalization"] == _record(C100_DC)
    text = "\n".join(logs)
    assert "records no normalization" in text and "reference .pt set" in text
    assert "renormalized from mean [0.4914" in text
    # named as already in the run's space: no conversion
    s2, _ = _stage_import(_cifar100_import_config(tmp_path, ref, import_stats="dc"),
                          tmp_path / "wd2")
    np.testing.assert_allclose(s2.images, x.transpose(0, 2, 3, 1), rtol=0, atol=0)
    # a run in the reference's mtt space takes the file as it is
    c = _cifar100_import_config(tmp_path, ref)
    c.stats = "mtt"
    s3, _ = _stage_import(c, tmp_path / "wd3")
    np.testing.assert_array_equal(s3.images, x.transpose(0, 2, 3, 1))


def test_npz_record_wins_and_zca_run_refuses(tmp_path):
    path = to_npz(tmp_path / "s.npz", SyntheticSet(_images(100, s=32), np.arange(100),
                                                   metadata={"normalization": _record(C100_MTT)},
                                                   num_classes=100))
    s, logs = _stage_import(_cifar100_import_config(tmp_path, path), tmp_path / "wd")
    assert s.metadata["normalization"] == _record(C100_DC) and "renormalized" in "\n".join(logs)
    c = _cifar100_import_config(tmp_path, path)
    c.zca = True
    with pytest.raises(ValueError, match=r"the imported set .*s\.npz cannot be used.*ZCA"):
        _stage_import(c, tmp_path / "wd2")


def test_config_options_checked_and_reach_the_models():
    c = base_config()
    for name in ("stats", "synset.import_stats"):
        bad = base_config()
        bad.update_from_flattened_dict({name: "imagenet"})
        with pytest.raises(ValueError, match=f"config.{name}='imagenet'"):
            check_config(bad)
    for bad_value in (0, -1):
        bad = base_config()
        bad.eval.bn_chunks = bad_value
        with pytest.raises(ValueError, match="eval.bn_chunks.*int >= 1"):
            check_config(bad)
    c.eval.bn_chunks, c.teacher.bn_chunks = 4, 2
    check_config(c)
    assert pipeline._model_overrides(c, "ResNet18BN") == {"bn_chunks": 4}
    req = pipeline.eval_request(c, None)
    assert req["bn_chunks"] == 4 and req["teacher"]["bn_chunks"] == 2
    assert "bn_chunks" not in pipeline.eval_request(base_config(), None)  # older requests
    c.parallel = {"parallel": "shard_map", "sync_bn": True}
    with pytest.raises(ValueError, match="set parallel.sync_bn=False"):
        check_config(c)


def test_reference_preset_turns_on_the_reference_behaviours():
    from elf_jax.config import reference_preset

    base = base_config()
    c = reference_preset(base)
    check_config(c)
    assert (c.eval.bn_chunks, c.teacher.bn_chunks, c.stats) == (4, 4, "mtt")
    assert (base.eval.bn_chunks, base.stats) == (1, "dc")  # the input is left alone
    assert pipeline._model_overrides(c, "VGG11BN") == {"bn_chunks": 4}
    c.dataset = "cifar100"
    assert pipeline.run_normalization(c) == _record(C100_MTT)


def test_reference_preset_on_a_mesh_keeps_four_replicas():
    """With data parallelism, chunks are per device: 4 / data of them, so that the whole
    batch is still normalized in DataParallel's 4 pieces; a data axis not dividing 4 (or left
    to the device count) is refused."""
    from elf_jax.config import reference_preset

    for n_data, chunks in ((4, 1), (2, 2), (1, 4)):
        base = base_config()
        base.parallel = {"parallel": "shard_map", "sync_bn": True, "data": n_data}
        p = reference_preset(base)
        assert p.parallel.sync_bn is False
        assert (p.eval.bn_chunks, p.teacher.bn_chunks) == (chunks, chunks)
        check_config(p)
    for n_data in (0, 3, 8):
        base = base_config()
        base.parallel = {"parallel": "shard_map", "data": n_data}
        with pytest.raises(ValueError, match="data axis must divide 4"):
            reference_preset(base)
    base = base_config()
    base.parallel = {"parallel": "none", "sync_bn": True}  # a section, no data parallelism
    assert reference_preset(base).eval.bn_chunks == 4


def test_distilled_set_records_the_space_of_its_data(tmp_path):
    from elf_jax.config import mnist5k_distill_config
    from elf_jax.distill import distill_from_config

    from elf_jax.data import load

    c = mnist5k_distill_config("dm")
    c.dataset = "digits"  # 8x8: the smallest embedded data
    c.synset.iterations, c.synset.eval_every, c.synset.batch_real, c.synset.ipc = 1, 0, 8, 1
    c.synset.model_kwargs = {"width": 8, "depth": 1}
    s = distill_from_config(c, tmp_path)
    digits = load("digits", "train")
    assert s.metadata["normalization"] == normalization_record(digits.mean, digits.std)
    assert load_synset(tmp_path / "synset_best").metadata["normalization"] == s.metadata["normalization"]
