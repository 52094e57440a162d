"""Input-pipeline throughput: in-memory ClassIndex.sample_class, the grain loader, the
engine's streamed reader, and (--image-size 64) the ImageNet-64 teacher's train step
against them.

    .venv/bin/python benchmarks/bench_input.py [--n 20000] [--batch 256] [--workers 0 2]
    .venv/bin/python benchmarks/bench_input.py --image-size 64 --n 5000 [--step-batches 2]

Builds a local TFDS dataset of --n random-pixel images in array_record (no network, no
TensorFlow) in a temp dir: CIFAR-shaped (32x32x3, 10 classes) or, with --image-size 64,
ImageNet-64-shaped (64x64x3, --classes, default 1000; PNG-encoded as TFDS
`imagenet_resized/64x64` stores them; random pixels are the worst case for PNG). Measures
  * ClassIndex.sample_class(key, c, n) on the same images held in memory (jitted, c random,
    n = 256 as DC/DSA/DM draw per class), images/s;
  * load() of the whole split (array_record -> decoded numpy), images/s;
  * make_loader() batches of --batch (decode PNG, batch, normalize), images/s, for each
    --workers value (grain worker processes; 0 = in-process);
  * the engine's streamed reader (`StreamedSplit.read` on its threads, the prefetch thread
    and the device put of `elf_jax.train.streaming`) over one random epoch, images/s;
  * with --step-batches > 0 (default with --image-size 64): the teacher of the config
    (`imagenet64_config()` at 64, `base_config()` at 32: `teacher.arch`, `teacher.batch_size`,
    `teacher.dsa_strategy`, SGD settings, `dtype`) trained by the engine itself
    (`elf_jax.train.runner.fit` with `chunk_epochs=1`, as `train_teacher` calls it) for two
    epochs of --step-batches full batches over the loaded images; the second epoch (compile
    excluded) gives the step's images/s, and the input / step ratio of each loader setting
    (> 1: the input is not the bottleneck).
"""

import argparse
import sys
import tempfile
import time

import numpy as np


# --image-size -> (TFDS builder class, whose snake_case name is the dataset's, its stats)
KINDS = {32: ("ElfBenchCifarlike", "CIFAR10_STATS"), 64: ("ElfBenchImagenet64like", "IMAGENET_STATS")}


def build(data_dir, n, size=32, classes=10):
    """Prepares the random-pixel dataset; returns (its registry name, seconds)."""
    import tensorflow_datasets as tfds

    from elf_jax.data import registry

    shape = (size, size, 3)
    cls_name, stats = KINDS[size]

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=shape),
            "label": tfds.features.ClassLabel(num_classes=classes)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(n)}

    def _generate_examples(self, m):
        rng = np.random.default_rng(0)
        for i in range(m):
            yield i, {"image": rng.integers(0, 256, shape, dtype=np.uint8), "label": i % classes}

    builder = type(cls_name, (tfds.core.GeneratorBasedBuilder,), {
        "VERSION": tfds.core.Version("1.0.0"), "_info": _info,
        "_split_generators": _split_generators, "_generate_examples": _generate_examples})
    info = registry.DatasetInfo(builder.name, shape, classes, *getattr(registry, stats),
                                source="tfds", tfds_name=builder.name)
    registry.REGISTRY[info.name] = info
    t = time.perf_counter()
    from elf_jax.data import tfds_source
    tfds_source.ensure_prepared(info, data_dir)
    return info.name, time.perf_counter() - t


def teacher_step_rate(config, ds, steps):
    """Images/s of the config's teacher step in the engine (second epoch of ``steps`` full
    batches, so compilation is excluded), and the seconds of the first (compile) epoch."""
    import jax.numpy as jnp

    from elf_jax.keys import stage_key
    from elf_jax.models import get_model
    from elf_jax.train.protocol import TrainProtocol
    from elf_jax.train.runner import fit, init_states

    t = config.teacher
    b = int(t.batch_size)
    n = b * steps
    if len(ds) < n:
        raise ValueError(f"--step-batches {steps} x batch {b} needs {n} images; raise --n")
    net = get_model(t.arch, ds.num_classes, **dict(t.model_kwargs or {}))
    # the protocol train_teacher builds from these settings (elf_jax/teacher.py)
    protocol = TrainProtocol(
        lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, batch_size=b,
        epochs=int(t.epochs), lr_decay=bool(t.lr_decay), reset_momentum_at_decay=True,
        dsa_strategy=t.dsa_strategy or "none", mode="task", kind="ce",
        dtype=str(jnp.dtype(config.dtype)))
    data = {"images": np.asarray(ds.images[:n], np.float32),
            "labels": np.asarray(ds.labels[:n], np.int32)}
    states = init_states(net, protocol, stage_key(0, "teacher"), 1, jnp.asarray(data["images"][:1]))
    marks = [time.perf_counter()]
    fit(net, protocol, data, states, num_epochs=2, chunk_epochs=1, progress=False,
        on_chunk=lambda *_: marks.append(time.perf_counter()))
    return n / (marks[2] - marks[1]), marks[1] - marks[0]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="*", default=[0, 2])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--image-size", type=int, choices=sorted(KINDS), default=32,
                   help="32: CIFAR-like; 64: ImageNet-64-like, with the imagenet64 teacher")
    p.add_argument("--classes", type=int, default=None, help="default 10 (32) / 1000 (64)")
    p.add_argument("--step-batches", type=int, default=None,
                   help="teacher step: full batches per timed epoch (default 2 at 64, 0 = off at 32)")
    a = p.parse_args()
    classes = a.classes or (1000 if a.image_size == 64 else 10)
    steps = a.step_batches if a.step_batches is not None else (2 if a.image_size == 64 else 0)

    import jax

    from elf_jax.config import base_config, imagenet64_config
    from elf_jax.data import ClassIndex, load, make_loader

    data_dir = a.data_dir or tempfile.mkdtemp(prefix="elf_bench_input_")
    name, prep = build(data_dir, a.n, a.image_size, classes)
    print(f"prepare {a.n} images {a.image_size}x{a.image_size}x3, {classes} classes "
          f"(array_record, PIL PNG): {prep:.1f} s ({a.n / prep:,.0f} img/s)")

    t = time.perf_counter()
    ds = load(name, "train", data_dir=data_dir, cache=False)
    dt = time.perf_counter() - t
    print(f"load() whole split into memory: {dt:.2f} s ({len(ds) / dt:,.0f} img/s)")

    ci = ClassIndex(ds)
    key = jax.random.key(0)
    n = min(256, a.n // classes)  # distinct images per class: at most what a class holds
    ci.sample_class(key, 0, n).block_until_ready()
    reps = 200
    keys = jax.random.split(key, reps)
    cls = np.random.default_rng(0).integers(0, classes, reps)
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
    print(f"ClassIndex.sample_all_classes(n={n}) ({classes} classes): {dt / 20 * 1e3:.2f} "
          f"ms/call ({20 * classes * n / dt:,.0f} img/s)")
    del ci

    rates = {}
    for w in a.workers:
        loader = make_loader(name, "train", a.batch, seed=0, shard_index=0,
                             shard_count=1, data_dir=data_dir, worker_count=w)
        it = iter(loader)
        next(it)  # start-up (worker spawn) excluded
        t = time.perf_counter()
        count = 0
        for b in it:
            count += b["image"].shape[0]
        dt = time.perf_counter() - t
        rates[w] = count / dt
        print(f"grain make_loader batch {a.batch}, workers={w}: {count / dt:,.0f} img/s "
              f"({count} images in {dt:.2f} s)")

    # what the engine reads a streamed split with: StreamedSplit.read on its threads, the
    # prefetch thread, the device put (elf_jax.train.streaming), one random epoch
    from elf_jax.data.stream import open_split
    from elf_jax.parallel.placement import Placement
    from elf_jax.train import streaming

    split = open_split(name, "train", mode="stream", data_dir=data_dir)
    perm = np.random.default_rng(0).permutation(len(split))
    groups = streaming._groups(len(split) // a.batch, a.batch, 0, 1)
    t = time.perf_counter()
    count = 0
    reader = streaming._Prefetcher(split, split.labels, perm, groups,
                                   streaming._put_fn(Placement()))
    for u8, _ in reader:
        u8.block_until_ready()
        count += u8.shape[0] * u8.shape[1]
    reader.close()
    dt = time.perf_counter() - t
    rates["engine stream"] = count / dt
    print(f"engine stream (StreamedSplit.read, {split.workers} threads, prefetch, device put) "
          f"batch {a.batch}: {count / dt:,.0f} img/s ({count} images in {dt:.2f} s)")

    if steps:
        config = imagenet64_config() if a.image_size == 64 else base_config()
        t = config.teacher
        step, first = teacher_step_rate(config, ds, steps)
        print(f"teacher step {t.arch} ({classes} classes), batch {t.batch_size}, DSA "
              f"{t.dsa_strategy}, {config.dtype}, engine fit (one epoch of {steps} batches "
              f"after a compile epoch of {first:.0f} s): {step:,.1f} img/s "
              f"({t.batch_size / step:.2f} s/step)")
        for w, r in rates.items():
            print(f"input / step, {w if isinstance(w, str) else f'grain workers={w}'}: "
                  f"{r / step:,.1f}x "
                  f"({'input keeps up' if r > step else 'INPUT IS THE BOTTLENECK'})")


if __name__ == "__main__":
    sys.exit(main())
