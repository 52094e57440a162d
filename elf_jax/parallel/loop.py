"""Epochs of data-parallel evaluation training (the reference protocol) and the test.

``evaluate_parallel(net, protocol, images, labels, test_images, test_labels, features=None,
*, repeats, key, config, mesh=None) -> dict`` trains ``repeats`` fresh copies of ``net`` and
returns their test accuracies, like ``elf_jax.train.runner.run_evaluation`` and with the same
randomness: repeat ``r`` starts from ``runner.init_states`` (``fold_in(key, r)``), and epoch
``e`` draws ``k_next, k_perm, k_aug = split(state.key, 3)``, the permutation from ``k_perm``
and one step key per minibatch from ``k_aug``; the lr decays after epoch ``E // 2 + 1``
and the momentum restarts there. With ``sync_bn`` and ``dsa="global"`` the numbers equal a
one-device run up to float summation order.

Difference from the runner: a last partial minibatch must divide over the ``data`` devices;
otherwise it is dropped (``drop_remainder=True``) or a ``ValueError`` says what to change.

* ``parallel="shard_map"``: :class:`elf_jax.parallel.runs.RunsEngine` on a ``(runs, data)``
  mesh; the training set stays on the devices (sharded by rows with ``shard_bank``).
* ``parallel="pmap"`` / ``"none"``: :class:`elf_jax.parallel.wrappers.DataParallel`, one
  repeat after another, minibatches gathered on the host.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from elf_jax.elf.losses import mode_needs_features
from elf_jax.parallel.mesh import ParallelConfig, make_mesh
from elf_jax.parallel.runs import RunsEngine
from elf_jax.parallel.wrappers import DataParallel, check_divisible
from elf_jax.train import runner

__all__ = ["epoch_plan", "train_parallel", "evaluate_parallel"]

METRIC_KEYS = ("loss", "task", "front", "rear", "acc")


def epoch_plan(key_data, n: int, steps: int):
    """``(next_key, perm [n], step_keys [steps, 2])`` of one epoch, as the runner draws them
    (``elf_jax.train.runner.epoch_plan``), on the host."""
    out = runner.epoch_plan(jnp.asarray(key_data, jnp.uint32), n=int(n), nsteps=int(steps))
    return tuple(np.asarray(runner._raw(x)) for x in out)


def _batches(protocol, n, n_data, drop_remainder):
    nfull, b, last = protocol.batch_plan(n)
    check_divisible(b, n_data, "the global minibatch")
    sizes = [b] * nfull
    if last:
        if last % n_data == 0:
            sizes.append(last)
        elif not drop_remainder:
            raise ValueError(
                f"the last minibatch of each epoch has {last} rows ({n} images, batch {b}), "
                f"which does not divide over the {n_data} 'data' devices; set "
                "parallel.drop_remainder=True to drop it, or use a set size / batch size "
                f"whose remainder is a multiple of {n_data}")
    return sizes


def train_parallel(net, protocol, images, labels, features=None, *, repeats: int = 1, key=None,
                   config: Any = None, mesh=None, max_epochs: Optional[int] = None,
                   hparams: Optional[Mapping[str, Any]] = None, states=None,
                   log=None) -> tuple:
    """Trains ``repeats`` runs; returns ``(stacked host states, history, info)``.

    ``max_epochs`` stops early (e.g. a teacher snapshot after ``feature_epoch`` epochs of a
    longer schedule); ``states``: stacked initial states (default ``runner.init_states``).
    ``info``: ``seconds``, ``steps``, ``steps_per_s`` (after the first, compiling epoch).
    """
    pc = config if isinstance(config, ParallelConfig) else ParallelConfig.from_config(config)
    key = jax.random.PRNGKey(0) if key is None else key
    need_f = mode_needs_features(protocol.mode)
    if need_f and features is None:
        raise ValueError(f"loss mode {protocol.mode!r} needs the teacher feature bank (features=None)")
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels)
    n = images.shape[0]
    if states is None:
        states = runner.init_states(net, protocol, key, repeats, jnp.asarray(images[:1]), hparams)
    states = jax.tree.map(np.asarray, states)
    repeats = int(np.shape(states.epoch)[0])
    num_epochs = protocol.num_epochs if max_epochs is None else min(int(max_epochs), protocol.num_epochs)
    end = jax.jit(functools.partial(runner.end_epoch, protocol=protocol))
    history = {k: np.zeros((repeats, num_epochs), np.float32) for k in METRIC_KEYS}
    t0 = time.perf_counter()
    t_after_first = None
    steps_first = 0
    steps_done = 0

    if pc.parallel == "shard_map":
        mesh = mesh if mesh is not None else make_mesh(pc.runs, pc.data)
        eng = RunsEngine(net, protocol, pc, mesh)
        sizes = _batches(protocol, n, eng.n_data, pc.drop_remainder)
        eng.put_data(images, labels, features if need_f else None)
        placed = eng.put_states(states)
        keys = np.asarray(states.key)
        vend = jax.jit(jax.vmap(functools.partial(runner.end_epoch, protocol=protocol)))
        for e in range(num_epochs):
            plans = [epoch_plan(keys[r], n, len(sizes)) for r in range(repeats)]
            sums = {k: np.zeros(repeats) for k in METRIC_KEYS}
            pos = 0
            for s, bs in enumerate(sizes):
                idx = np.stack([p[1][pos: pos + bs] for p in plans])
                sk = np.stack([p[2][s] for p in plans])
                placed, m = eng.step(placed, *eng.put_indices(idx, sk))
                m = {k: np.asarray(jax.device_get(m[k])).reshape(repeats) for k in METRIC_KEYS}
                for k in METRIC_KEYS:
                    sums[k] += m[k] * bs
                pos += bs
                steps_done += 1
            keys = np.stack([p[0] for p in plans])
            placed = vend(placed, eng.put_indices(np.zeros((repeats, 1)), keys)[1])
            for k in METRIC_KEYS:
                history[k][:, e] = sums[k] / pos
            _check_finite(history["loss"][:, e], e)
            if e == 0:
                t_after_first, steps_first = time.perf_counter(), steps_done
            if log:
                log(f"epoch {e}: loss {history['loss'][:, e].mean():.4f}")
        final = eng.get_states(placed)
        net_single = eng.net_single
    else:
        dp = DataParallel(net, protocol, pc, mesh=mesh)
        sizes = _batches(protocol, n, dp.n_data, pc.drop_remainder)
        data = {"images": images, "labels": labels}
        if need_f:
            data["features"] = np.asarray(features, np.float32)
        outs = []
        for r in range(repeats):
            st = dp.put_state(jax.tree.map(lambda x: x[r], states))
            for e in range(num_epochs):
                nk, perm, sk = epoch_plan(np.asarray(jax.tree.map(lambda x: x[r], states.key)) if e == 0
                                          else dp.get_state(st).key, n, len(sizes))
                pos = 0
                sums = {k: 0.0 for k in METRIC_KEYS}
                for s, bs in enumerate(sizes):
                    idx = perm[pos: pos + bs]
                    st, m = dp.step(st, dp.put_batch({k: v[idx] for k, v in data.items()}), sk[s])
                    for k in METRIC_KEYS:
                        sums[k] += float(m[k]) * bs
                    pos += bs
                    steps_done += 1
                host = dp.get_state(st)
                st = dp.put_state(end(jax.tree.map(jnp.asarray, host), jnp.asarray(nk)))
                for k in METRIC_KEYS:
                    history[k][r, e] = sums[k] / pos
                _check_finite(history["loss"][r:r + 1, e], e)
                if t_after_first is None:
                    t_after_first, steps_first = time.perf_counter(), steps_done
            outs.append(dp.get_state(st))
        final = jax.tree.map(lambda *xs: np.stack(xs), *outs)
        net_single = dp.net_single
    t1 = time.perf_counter()
    rest = steps_done - (steps_first if t_after_first else 0)
    info = {
        "seconds": t1 - t0,
        "steps": steps_done,
        "steps_per_s": (rest / (t1 - t_after_first)) if t_after_first and rest else float("nan"),
        "parallel": pc.parallel,
        "net": net_single,
    }
    return final, history, info


def _check_finite(losses, epoch):
    if not np.all(np.isfinite(losses)):
        raise runner.EvaluationDiverged(
            f"the training loss became NaN/Inf at epoch {epoch}; lower the learning rate or "
            "check the synthetic set / feature bank")


def evaluate_parallel(net, protocol, images, labels, test_images, test_labels, features=None, *,
                      repeats: int = 1, key=None, config: Any = None, mesh=None,
                      hparams=None, log=None) -> dict:
    """Train (:func:`train_parallel`) and test; dict with ``accs``, ``mean``, ``std``,
    ``train_loss`` ``[R, E+1]``, ``seconds``, ``steps_per_s``, ``states``."""
    states, hist, info = train_parallel(net, protocol, images, labels, features, repeats=repeats,
                                        key=key, config=config, mesh=mesh, hparams=hparams, log=log)
    accs = runner.test_accuracy(info["net"], jax.tree.map(jnp.asarray, states), test_images,
                                test_labels, protocol.test_batch_size)
    return {"accs": accs, "mean": float(np.mean(accs)), "std": float(np.std(accs)),
            "train_loss": hist["loss"], "history": hist, "seconds": info["seconds"],
            "steps_per_s": info["steps_per_s"], "parallel": info["parallel"], "states": states}
