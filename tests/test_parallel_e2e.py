"""configs/imagenet64_shard_map.py end to end on a tiny locally built 64x64 stand-in dataset
(TFDS builder, array_record, no network), parallel="shard_map" over 8 simulated devices
(mesh runs=2 x data=4): real-random synthetic set, data-parallel teacher, feature bank in
bfloat16 sharded over the devices, ELF evaluation of two repeats side by side.
Runs in a subprocess (the 8-device flag must precede JAX's start)."""

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from test_parallel import run_case  # noqa: E402

SHAPE, K, SIZES = (64, 64, 3), 4, {"train": 32, "test": 16}


def test_imagenet64_shard_map_config_end_to_end(tmp_path):
    res = run_case("e2e", str(tmp_path), script=HERE)
    assert res["mesh"] == [2, 4] and res["devices"] == 8
    assert res["bank_shape"] == [8, 4, 4, 8]
    r = res["results"]["ConvNetD4"]["front_rear_task"]
    assert len(r["accs"]) == 2 and all(0.0 <= a <= 1.0 for a in r["accs"])
    assert np.all(np.isfinite(r["train_loss"]))
    assert "memory estimate per device (mesh runs=2 x data=4" in res["log"]
    assert "feature bank (bfloat16)" in res["log"]


def _e2e(data_dir):
    import json  # noqa: F401
    import runpy

    import jax
    import tensorflow_datasets as tfds

    from elf_jax.data import registry
    from elf_jax.parallel.pipeline import run_elf

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

    cfg = runpy.run_path(str(HERE.parent.parent / "configs" / "imagenet64_shard_map.py"))["get_config"]()
    cfg.dataset = "elf_test_imnet64"
    cfg.data_dir = data_dir
    cfg.dtype = "float32"
    cfg.parallel.runs = 2
    cfg.synset.source = "real_random"
    cfg.synset.ipc = 2
    cfg.teacher.width = 8
    cfg.teacher.epochs = 2
    cfg.teacher.feature_epoch = 1
    cfg.teacher.batch_size = 16
    cfg.bank.batch_size = 8
    cfg.eval.pool = ("ConvNetD4",)
    cfg.eval.width = 8
    cfg.eval.modes = ("front_rear_task",)
    cfg.eval.repeats = 2
    cfg.eval.epochs = 1
    cfg.eval.batch_size = 8
    logs = []
    out = run_elf(cfg, log=logs.append)
    res = {a: {m: {"accs": np.asarray(v["accs"]).tolist(), "train_loss": np.asarray(v["train_loss"]).tolist()}
               for m, v in d.items()} for a, d in out["results"].items()}
    return {"results": res, "mesh": list(out["mesh"]), "bank_shape": list(out["bank_shape"]),
            "devices": jax.device_count(), "log": "\n".join(logs)}


if __name__ == "__main__":
    import json

    print("RESULT " + json.dumps(_e2e(sys.argv[2])), flush=True)
