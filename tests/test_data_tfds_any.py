"""`tfds:NAME[@HxW]`: any TFDS image-classification dataset by name (elf_jax.data.tfds_any),
on a tiny dataset built here (no network, no TensorFlow)."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import _tfds_fixtures as fx  # noqa: E402

from elf_jax.data import load, open_split, resolve_info  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds_any")


def _rows(a):
    """TFDS shuffles record order: rows compared as a sorted list."""
    return sorted(r.tobytes() for r in np.asarray(a).reshape(len(a), -1))


def _resized(images, size):
    return np.stack([np.asarray(Image.fromarray(a).resize((size[1], size[0]), Image.BILINEAR))
                     for a in images])


def test_any_tfds_dataset_by_name_with_features_and_train_statistics(data_dir):
    info = resolve_info("tfds:elf_test_tiny", data_dir=data_dir)  # prepared here, locally
    assert info.image_shape == fx.SHAPE and info.num_classes == fx.NUM_CLASSES
    train_u8, train_y = fx.expected_split("train")
    px = train_u8.reshape(-1, 3).astype(np.float64) / 255
    np.testing.assert_allclose(info.mean, px.mean(0), rtol=1e-9)
    np.testing.assert_allclose(info.std, px.std(0), rtol=1e-6)
    assert list((data_dir / "elf_jax_cache" / "stats").glob("*.json"))  # computed once
    d = load("tfds:elf_test_tiny", "train", data_dir=data_dir, normalize=False, cache=False)
    got = np.round(d.images * 255).astype(np.uint8)
    assert _rows(got) == _rows(train_u8)
    key = {r.tobytes(): int(lab) for r, lab in zip(train_u8.reshape(len(train_u8), -1), train_y)}
    assert all(key[r.tobytes()] == int(lab) for r, lab in zip(got.reshape(len(got), -1), d.labels))


def test_a_size_resizes_every_image_in_memory_and_streamed(data_dir):
    name = "tfds:elf_test_tiny@12x10"
    info = resolve_info(name, data_dir=data_dir)
    assert info.image_shape == (12, 10, 3)
    want = _resized(fx.expected_split("test")[0], (12, 10))
    mem = load(name, "test", data_dir=data_dir, normalize=False, cache=False)
    got = np.round(mem.images * 255).astype(np.uint8)
    assert got.shape == (16, 12, 10, 3) and _rows(got) == _rows(want)
    streamed = open_split(name, "test", mode="stream", data_dir=data_dir)
    # the same records decoded by the same host code (Pillow), no compiled program: exact
    np.testing.assert_array_equal(streamed.read(np.arange(len(streamed))), got)  # same order


def test_unknown_or_unusable_tfds_names_are_one_clear_error(data_dir):
    with pytest.raises(ValueError, match="TFDS has no dataset 'no_such_dataset_xyz'"):
        resolve_info("tfds:no_such_dataset_xyz", data_dir=data_dir)
    with pytest.raises(ValueError, match="give a TFDS name"):
        resolve_info("tfds:", data_dir=data_dir)


def test_elf_jax_all_runs_on_a_tfds_name(data_dir, tmp_path):
    """Through the CLI in a child process, which knows no builder class for it: TFDS reads
    the dataset this module prepared from its files in data_dir."""
    import json
    import os
    import subprocess

    resolve_info("tfds:elf_test_tiny", data_dir=data_dir)  # prepared (the other tests may not run)
    dataset = "tfds:elf_test_tiny@16x16"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "elf_jax.cli", "all", "--workdir", str(tmp_path / "wd"),
         "--config", str(root / "configs" / "demo_mnist5k.py"), f"--config.dataset={dataset}",
         f"--config.data_dir={data_dir}", "--config.synset.source=real_random",
         "--config.synset.ipc=2", "--config.teacher.epochs=1", "--config.teacher.feature_epoch=1",
         "--config.eval.pool=('ConvNet',)", "--config.eval.epochs=1", "--config.eval.repeats=1"],
        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "wd" / "results.json").read_text())
    assert results["dataset"] == dataset and len(results["results"]["ConvNet"]["task"]["accs"]) == 1
    assert results["budget"]["synset_bytes"] == 2 * fx.NUM_CLASSES * 16 * 16 * 3 * 4
    recorded = results["provenance"]["dataset"]  # the statistics computed from train
    assert recorded["mean"] == list(resolve_info(dataset, data_dir=data_dir).mean)
