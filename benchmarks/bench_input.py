"""Input-pipeline throughput: in-memory ClassIndex.sample_class and the grain loader.

    .venv/bin/python benchmarks/bench_input.py [--n 20000] [--batch 256] [--workers 0 2]

Builds a local CIFAR-shaped (32x32x3, 10 classes, random pixels) TFDS dataset of --n
images in array_record (no network, no TensorFlow) in a temp dir, then measures
  * ClassIndex.sample_class(key, c, n) on the same images held in memory (jitted, c random,
    n = 256 as DC/DSA/DM draw per class), images/s;
  * load() of the whole split (array_record -> decoded numpy), images/s;
  * make_loader() batches of --batch (decode PNG, batch, normalize), images/s, for each
    --workers value (grain worker processes; 0 = in-process).
"""

import argparse
import sys
import tempfile
import time

import numpy as np


def build(data_dir, n):
    import tensorflow_datasets as tfds

    from elf_jax.data import registry

    class ElfBenchCifarlike(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(32, 32, 3)),
                "label": tfds.features.ClassLabel(num_classes=10)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(n)}

        def _generate_examples(self, m):
            rng = np.random.default_rng(0)
            for i in range(m):
                yield i, {"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                          "label": i % 10}

    info = registry.DatasetInfo("elf_bench_cifarlike", (32, 32, 3), 10, *registry.CIFAR10_STATS,
                                source="tfds", tfds_name="elf_bench_cifarlike")
    registry.REGISTRY[info.name] = info
    t = time.perf_counter()
    from elf_jax.data import tfds_source
    tfds_source.ensure_prepared(info, data_dir)
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="*", default=[0, 2])
    p.add_argument("--data-dir", default=None)
    a = p.parse_args()

    import jax

    from elf_jax.data import ClassIndex, load, make_loader

    data_dir = a.data_dir or tempfile.mkdtemp(prefix="elf_bench_input_")
    prep = build(data_dir, a.n)
    print(f"prepare {a.n} images (array_record, PIL PNG): {prep:.1f} s "
          f"({a.n / prep:,.0f} img/s)")

    t = time.perf_counter()
    ds = load("elf_bench_cifarlike", "train", data_dir=data_dir, cache=False)
    dt = time.perf_counter() - t
    print(f"load() whole split into memory: {dt:.2f} s ({len(ds) / dt:,.0f} img/s)")

    ci = ClassIndex(ds)
    key = jax.random.key(0)
    n = 256
    ci.sample_class(key, 0, n).block_until_ready()
    reps = 200
    keys = jax.random.split(key, reps)
    cls = np.random.default_rng(0).integers(0, 10, reps)
    t = time.perf_counter()
    for i in range(reps):
        out = ci.sample_class(keys[i], int(cls[i]), n)
    out.block_until_ready()
    dt = time.perf_counter() - t
    print(f"ClassIndex.sample_class(n={n}) in memory: {dt / reps * 1e3:.2f} ms/call "
          f"({reps * n / dt:,.0f} img/s)")
    ci.sample_all_classes(key, n).block_until_ready()
    t = time.perf_counter()
    for i in range(20):
        out = ci.sample_all_classes(keys[i], n)
    out.block_until_ready()
    dt = time.perf_counter() - t
    print(f"ClassIndex.sample_all_classes(n={n}) (10 classes): {dt / 20 * 1e3:.2f} ms/call "
          f"({20 * 10 * n / dt:,.0f} img/s)")

    for w in a.workers:
        loader = make_loader("elf_bench_cifarlike", "train", a.batch, seed=0, shard_index=0,
                             shard_count=1, data_dir=data_dir, worker_count=w)
        it = iter(loader)
        next(it)  # start-up (worker spawn) excluded
        t = time.perf_counter()
        count = 0
        for b in it:
            count += b["image"].shape[0]
        dt = time.perf_counter() - t
        print(f"grain make_loader batch {a.batch}, workers={w}: {count / dt:,.0f} img/s "
              f"({count} images in {dt:.2f} s)")


if __name__ == "__main__":
    sys.exit(main())
