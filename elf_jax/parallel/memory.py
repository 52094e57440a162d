"""Memory estimate of a data-parallel evaluation before it starts (large synthetic sets and
feature banks, e.g. ImageNet-1k IPC 10-50 = 10k-50k images at 64x64).

Per device: the synthetic images and labels and the feature bank (1/data of them with
``shard_bank``, bank in float32 or bfloat16), the parameters, optimizer momentum and
gradients of the runs it trains (x3 float32, plus BatchNorm statistics), and the
activations of one per-device minibatch kept for the backward pass (every module output of
the network on one image, from an abstract trace, x ``activation_factor`` for the output
gradients and fused temporaries; the image path and, in ELF modes, the rear on the feature
batch). It is an estimate, not a promise: XLA may need more for temporaries.

``estimate_memory(...) -> MemoryEstimate`` (printable table); ``check_fits(est)`` raises
``ValueError`` with what to change when it exceeds ``headroom`` x the device memory.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["MemoryEstimate", "estimate_memory", "activation_bytes_per_image", "device_memory_bytes",
           "check_fits", "format_bytes"]


def format_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(b) < 1024 or unit == "TiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{int(b)} B"
        b /= 1024.0
    return f"{b:.1f} TiB"


@dataclasses.dataclass
class MemoryEstimate:
    items: dict  # name -> bytes per device
    n_data: int
    n_runs: int
    runs_per_device: int
    device_bytes: Optional[int] = None
    headroom: float = 0.9
    notes: Sequence[str] = ()

    @property
    def total(self) -> int:
        return int(sum(self.items.values()))

    @property
    def fits(self) -> Optional[bool]:
        return None if not self.device_bytes else self.total <= self.headroom * self.device_bytes

    def __str__(self) -> str:
        lines = [f"memory estimate per device (mesh runs={self.n_runs} x data={self.n_data}, "
                 f"{self.runs_per_device} run(s) per device group):"]
        w = max(len(k) for k in self.items) if self.items else 10
        for k, v in self.items.items():
            lines.append(f"  {k:<{w}}  {format_bytes(v):>10}")
        lines.append(f"  {'total':<{w}}  {format_bytes(self.total):>10}")
        if self.device_bytes:
            lines.append(f"  {'device memory':<{w}}  {format_bytes(self.device_bytes):>10} "
                         f"(usable {self.headroom:.0%}: {format_bytes(self.headroom * self.device_bytes)})")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def activation_bytes_per_image(net, image_shape, feature_shape=None, train: bool = True) -> int:
    """Bytes of every module output of ``net`` on ONE image (abstract trace, no compute)."""
    x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)

    def fwd(xx):
        v = net.init(jax.random.key(0), xx, train=False)
        _, st = net.apply(v, xx, train=False, capture_intermediates=True, mutable=["intermediates"])
        return st

    inter = jax.eval_shape(fwd, x)
    total = sum(int(np.prod(l.shape)) * jnp.dtype(l.dtype).itemsize for l in jax.tree.leaves(inter))
    return int(total)


def device_memory_bytes(device=None) -> Optional[int]:
    """Memory of ``device`` (``bytes_limit`` of its allocator), or the host RAM on the CPU."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - not every backend reports
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // max(1, jax.local_device_count())
        except (ValueError, OSError, AttributeError):
            return None
    return None


def estimate_memory(*, n_images: int, image_shape: Sequence[int], num_classes: int,
                    param_count: int, batch_size: int, feature_shape: Optional[Sequence[int]] = None,
                    bank_dtype: str = "float32", shard_bank: bool = True, n_data: int = 1,
                    n_runs: int = 1, repeats: int = 1, soft_labels: bool = False,
                    activation_per_image: int = 0, activation_factor: float = 3.0,
                    batch_stats_count: int = 0, compute_dtype: str = "float32",
                    test_images: int = 0, device_bytes: Optional[int] = None,
                    headroom: float = 0.9) -> MemoryEstimate:
    """Bytes per device of a data-parallel evaluation (see the module docstring)."""
    n_data, n_runs = max(1, int(n_data)), max(1, int(n_runs))
    share = (1.0 / n_data) if shard_bank else 1.0
    rows = -(-int(n_images) // n_data) * n_data if shard_bank else int(n_images)
    items = {}
    items["synthetic images (f32)"] = int(rows * share * int(np.prod(image_shape)) * 4)
    items["labels"] = int(rows * share * (num_classes * 4 if soft_labels else 4))
    if feature_shape is not None:
        bpe = 2 if bank_dtype == "bfloat16" else 4
        items[f"feature bank ({bank_dtype})"] = int(rows * share * int(np.prod(feature_shape)) * bpe)
    runs_per = -(-int(repeats) // n_runs)
    # params + momentum + gradient (f32), BN statistics; the scan/lax.map over runs holds all
    items[f"params+momentum+grads x{runs_per} run(s)"] = int(runs_per * (3 * param_count + 2 * batch_stats_count) * 4)
    per_dev = -(-int(batch_size) // n_data)
    act_scale = jnp.dtype(compute_dtype).itemsize / 4.0
    act = activation_per_image * per_dev * activation_factor * act_scale
    if feature_shape is not None:
        act *= 1.25  # the rear on the feature batch
    items[f"activations (batch {per_dev}/device)"] = int(act)
    if test_images:
        items["test batch"] = int(min(test_images, 500) * int(np.prod(image_shape)) * 4)
    notes = []
    if feature_shape is not None and bank_dtype == "float32":
        notes.append("parallel.bank_dtype='bfloat16' halves the feature bank")
    if not shard_bank and n_data > 1:
        notes.append(f"parallel.shard_bank=True stores 1/{n_data} of the set and bank per device")
    return MemoryEstimate(items, n_data, n_runs, runs_per, device_bytes, headroom, notes)


def check_fits(est: MemoryEstimate, device_bytes: Optional[int] = None) -> MemoryEstimate:
    """``ValueError`` when the estimate exceeds ``headroom`` x the device memory (queried from
    the first local device when not given); returns the estimate."""
    if device_bytes is not None:
        est.device_bytes = int(device_bytes)
    elif est.device_bytes is None:
        est.device_bytes = device_memory_bytes()
    if est.device_bytes and est.fits is False:
        big = max(est.items, key=est.items.get)
        tips = list(est.notes) + [
            "more devices on the 'data' axis (parallel.data) divide the sharded set and bank",
            "a smaller eval.batch_size lowers the activations",
        ]
        raise ValueError(
            f"the run will not fit: about {format_bytes(est.total)} per device is needed but "
            f"{format_bytes(est.headroom * est.device_bytes)} is usable "
            f"({est.headroom:.0%} of {format_bytes(est.device_bytes)}); the largest item is "
            f"{big} ({format_bytes(est.items[big])}). Options: " + "; ".join(tips) + ".\n" + str(est))
    return est


def estimate_for(net, protocol, *, n_images: int, image_shape, num_classes: int,
                 feature_shape=None, config: Any = None, repeats: int = 1, n_data: int = 1,
                 n_runs: int = 1, soft_labels: bool = False, device_bytes=None) -> MemoryEstimate:
    """:func:`estimate_memory` with the parameter count and activations taken from ``net``."""
    from elf_jax.parallel.mesh import ParallelConfig

    pc = config if isinstance(config, ParallelConfig) else ParallelConfig.from_config(config)
    shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1,) + tuple(image_shape)), train=False))
    pcount = sum(int(np.prod(l.shape)) for l in jax.tree.leaves(shapes.get("params", {})))
    bcount = sum(int(np.prod(l.shape)) for l in jax.tree.leaves(shapes.get("batch_stats", {})))
    return estimate_memory(
        n_images=n_images, image_shape=image_shape, num_classes=num_classes, param_count=pcount,
        batch_size=protocol.batch_size, feature_shape=feature_shape, bank_dtype=pc.bank_dtype,
        shard_bank=pc.shard_bank, n_data=n_data, n_runs=n_runs, repeats=repeats,
        soft_labels=soft_labels, activation_per_image=activation_bytes_per_image(net, image_shape),
        batch_stats_count=bcount, compute_dtype=protocol.dtype, device_bytes=device_bytes,
        headroom=pc.memory_headroom)
