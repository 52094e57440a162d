"""`folder:PATH`: a researcher's own images in class subfolders (elf_jax.data.folder),
written here as PNGs and JPEGs, then through the real pipeline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from elf_jax.data import load, open_split, resolve_info

ROOT = Path(__file__).resolve().parents[1]


def _write(root: Path, classes, per_class, size=(16, 16), mode="RGB", seed=0, ext=".png"):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size[0], size[1], 3) if mode == "RGB" else size
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                root / c / f"{i}{ext}")


def test_train_and_test_folders_give_sorted_classes_and_train_statistics(tmp_path):
    _write(tmp_path / "train", ["zebra", "ant", "moth"], 4)
    _write(tmp_path / "test", ["zebra", "ant", "moth"], 2, seed=1)
    name = f"folder:{tmp_path}"
    info = resolve_info(name)
    assert info.class_names == ("ant", "moth", "zebra") and info.num_classes == 3
    assert info.image_shape == (16, 16, 3) and info.num_examples == {"train": 12, "test": 6}
    raw = np.stack([np.asarray(Image.open(f), np.float64) / 255 for c in info.class_names
                    for f in sorted((tmp_path / "train" / c).iterdir())])
    np.testing.assert_allclose(info.mean, raw.reshape(-1, 3).mean(0), rtol=1e-6)
    np.testing.assert_allclose(info.std, raw.reshape(-1, 3).std(0), rtol=1e-6)
    train, test = load(name, "train"), load(name, "test")
    assert train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and len(test.labels) == 6
    # normalized with the train split's statistics, as every registered dataset
    np.testing.assert_allclose(train.images.reshape(-1, 3).mean(0), 0, atol=1e-5)


def test_one_folder_is_split_by_seed_and_sizes_are_resized_or_refused(tmp_path):
    _write(tmp_path, ["a", "b"], 5, size=(20, 12), mode="L", ext=".jpg")
    _write(tmp_path, ["b"], 1, size=(9, 9), mode="L", seed=3, ext=".jpg")  # b/0.jpg: 9x9
    with pytest.raises(ValueError, match=r"is 9x9 but .* give a size to resize .*@20x12"):
        resolve_info(f"folder:{tmp_path}")
    name = f"folder:{tmp_path}@8x8"
    info = resolve_info(name)
    assert info.image_shape == (8, 8, 1)  # every file grayscale: one channel
    train, test = load(name, "train"), load(name, "test")
    assert np.bincount(train.labels).tolist() == [4, 4] and np.bincount(test.labels).tolist() == [1, 1]
    again = load(name, "train")  # the same seeded split every time
    # host-side decoding (Pillow, numpy), no compiled program: equal by construction
    np.testing.assert_array_equal(again.images, train.images)
    with pytest.raises(ValueError, match="a folder of images .* 'memory'"):
        open_split(name, "train", mode="stream")


def test_a_corrupt_image_file_is_named(tmp_path):
    _write(tmp_path, ["a", "b"], 2)
    (tmp_path / "b" / "1.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"b/1.png is not a readable image"):
        resolve_info(f"folder:{tmp_path}")


def test_a_folder_without_class_subfolders_is_one_clear_error(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="one subfolder per class holding images.*empty: a"):
        resolve_info(f"folder:{tmp_path}")
    with pytest.raises(ValueError, match="not a directory"):
        resolve_info(f"folder:{tmp_path / 'nothing'}")


def test_the_pipeline_runs_on_a_folder(tmp_path):
    _write(tmp_path / "data" / "train", ["c0", "c1", "c2"], 6, size=(20, 20))
    _write(tmp_path / "data" / "val", ["c0", "c1", "c2"], 2, size=(20, 20), seed=1, ext=".jpg")
    dataset = f"folder:{tmp_path / 'data'}@16x16"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "elf_jax.cli", "all", "--workdir", str(tmp_path / "wd"),
         "--config", str(ROOT / "configs" / "demo_mnist5k.py"), f"--config.dataset={dataset}",
         "--config.synset.source=real_random", "--config.synset.ipc=1",
         "--config.teacher.epochs=1", "--config.teacher.feature_epoch=1",
         "--config.eval.pool=('ConvNet',)", "--config.eval.epochs=1", "--config.eval.repeats=1"],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "wd" / "results.json").read_text())
    assert results["dataset"] == dataset and set(results["results"]["ConvNet"]) == {
        "task", "front_rear_task"}
    teacher = json.loads((tmp_path / "wd" / "teachers" / "ConvNetW32" / "trajectory.json")
                         .read_text())
    # 18 images, one per class held out as the validation split
    assert teacher["num_train"] == 15 and teacher["image_shape"] == [16, 16, 3]
    # the statistics and the train split's fingerprint are recorded with the results
    recorded = results["provenance"]["dataset"]
    assert recorded["source"] == "folder" and recorded["mean"] == list(resolve_info(dataset).mean)
    assert results["provenance"]["teachers"]["ConvNetW32"]["data_hash"] == teacher["data_hash"]
