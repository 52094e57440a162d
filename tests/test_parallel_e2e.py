"""configs/imagenet64_shard_map.py end to end through the one CLI and pipeline
(`elf-jax all --config ... --workdir ...`) on a tiny locally built 64x64 stand-in dataset
(TFDS builder, array_record, no network), parallel="shard_map" over 8 simulated devices
(mesh runs=2 x data=4), the real splits streamed from their files (`data_mode=stream`, as
the config runs ImageNet): real-random synthetic set, teacher, feature bank, then the ELF
evaluation data parallel with the bank in bfloat16 sharded over the devices and two repeats
side by side; then `elf-jax evaluate` again reuses the finished runs.
Each command runs in a subprocess (the 8-device flag must precede JAX's start; the stand-in
dataset is registered in that process, which then runs the CLI in-process)."""

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))
from test_parallel import run_case  # noqa: E402

# 36 train images: the validation split holds 4 out (one per class), 32 train
SHAPE, K, SIZES = (64, 64, 3), 4, {"train": 36, "test": 16}

# what the real config cannot take from --config.* flags (new keys): a width-8 teacher
STANDIN_CONFIG = f'''
import runpy

def get_config():
    c = runpy.run_path({str(ROOT / "configs" / "imagenet64_shard_map.py")!r})["get_config"]()
    c.teacher.override_arch = "ConvNetD4"
    c.teacher.model_kwargs = {{"width": 8}}
    return c
'''


def test_imagenet64_shard_map_config_end_to_end(tmp_path):
    res = run_case("e2e", str(tmp_path), "all", script=HERE)
    assert res["mesh"] == [2, 4] and res["devices"] == 8
    assert res["bank_shape"] == [8, 4, 4, 8]
    r = res["results"]["ConvNetD4"]["front_rear_task"]
    assert len(r["accs"]) == 2 and all(0.0 <= a <= 1.0 for a in r["accs"])
    assert np.all(np.isfinite(r["final_train_loss"]))
    assert r["strategy"] == "sequential (mesh runs=2 x data=4)"
    assert "memory estimate per device (mesh runs=2 x data=4" in res["log"]
    assert "feature bank (bfloat16)" in res["log"]
    for split in ("train", "test"):  # streamed on the mesh, not loaded
        assert f"[data] elf_test_imnet64 {split}: streamed" in res["log"], res["log"]
    assert (tmp_path / "run" / "results.md").stat().st_size > 0
    assert r["resumed_from"] is None
    # `elf-jax evaluate` again: the finished runs resume at their last epoch, same results
    again = run_case("e2e", str(tmp_path), "evaluate", script=HERE)
    a = again["results"]["ConvNetD4"]["front_rear_task"]
    assert a["resumed_from"] == 2 and a["accs"] == r["accs"]


def _cli(*args) -> str:
    """`elf-jax <args>` in this process; returns what it printed."""
    import contextlib
    import io

    from elf_jax import cli

    buf = io.StringIO()
    sys.argv = ["elf-jax", *args]
    with contextlib.redirect_stdout(buf):
        try:
            cli.run()
        except SystemExit as e:
            if e.code not in (None, 0):
                raise AssertionError(f"elf-jax {args[0]} exited with {e.code}:\n{buf.getvalue()}")
    return buf.getvalue()


def _e2e(tmp, command):
    import json

    import jax
    import tensorflow_datasets as tfds

    from elf_jax.data import registry
    from elf_jax.elf.bank import load_bank

    class ElfTestImnet64(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=SHAPE),
                "label": tfds.features.ClassLabel(num_classes=K)}), supervised_keys=("image", "label"))

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(s, n) for s, n in SIZES.items()}

        def _generate_examples(self, split, n):
            for i in range(n):
                rng = np.random.default_rng(1000 * (split == "test") + i)
                img = rng.integers(0, 120, SHAPE, dtype=np.uint8)
                img[..., i % 3] += np.uint8(60 * (1 + (i % K) // 3))  # a class signal
                yield i, {"image": img, "label": i % K}

    info = registry.DatasetInfo("elf_test_imnet64", SHAPE, K, (0.485, 0.456, 0.406),
                                (0.229, 0.224, 0.225), source="tfds", tfds_name="elf_test_imnet64",
                                prepare_hint="(test dataset)")
    registry.REGISTRY = {**registry.REGISTRY, info.name: info}

    tmp = Path(tmp)
    config = tmp / "standin_config.py"
    config.write_text(STANDIN_CONFIG)
    wd = str(tmp / "run")
    flags = [
        "--config", str(config), "--workdir", wd,
        "--config.dataset=elf_test_imnet64", f"--config.data_dir={tmp / 'data'}",
        "--config.dtype=float32", "--config.data_mode=stream",
        "--config.parallel.runs=2",
        "--config.synset.source=real_random", "--config.synset.ipc=2",
        "--config.teacher.epochs=2", "--config.teacher.feature_epoch=1",
        "--config.teacher.batch_size=16", "--config.bank.batch_size=8",
        "--config.eval.pool=('ConvNetD4',)", "--config.eval.width=8",
        "--config.eval.modes=('front_rear_task',)", "--config.eval.repeats=2",
        "--config.eval.epochs=1", "--config.eval.batch_size=8",
    ]
    log = _cli(command, *flags)
    results = json.loads((tmp / "run" / "results.json").read_text())
    bank = load_bank(tmp / "run" / "banks" / "ConvNetD4")
    return {"results": results["results"], "mesh": results["parallel"]["mesh"],
            "devices": jax.device_count(), "bank_shape": list(bank.features.shape), "log": log}

if __name__ == "__main__":
    import json

    print("RESULT " + json.dumps(_e2e(sys.argv[2], sys.argv[3])), flush=True)
