"""The one training engine: epochs of the train step over an in-memory set, for any number
of runs, on one device or a ``("runs", "data")`` mesh, with resume, NaN stop and progress.

``fit(net, protocol, data, states, ...) -> (states, history, info)`` is the only epoch loop
of the package: evaluation (:func:`run_evaluation`), teachers and MTT experts
(``elf_jax.teacher``, a snapshot per epoch through ``on_chunk``), distillation-time
evaluation and data-parallel runs all call it. Parallelism is placement
(:class:`elf_jax.parallel.placement.Placement`), not a second loop.

Structure of the compiled program (one ``jit`` per (network, protocol, shapes, placement)):

* an epoch: a fresh permutation of the training set (the DataLoader's ``shuffle=True``), the
  full batches, then ONE more step on the last partial batch at its own static size
  (``drop_last=False``): exactly the reference's smaller batch, no padding or masking. Its
  random stream: ``k_next, k_perm, k_aug = split(state.key, 3)`` (:func:`epoch_plan`).
* ``scan`` engine: ``lax.scan`` over the minibatches and over up to ``chunk_epochs`` epochs;
  epochs past the requested count are skipped by a ``lax.cond``, so the last, shorter chunk
  reuses the executable. Repeats: ``sequential`` (``lax.map``) or ``vmap``; on a mesh each
  ``runs`` group maps over its share inside ``shard_map``, every step data parallel.
* ``host`` engine (the CPU default, :mod:`elf_jax.loops`): XLA:CPU runs convolutions inside
  a while-loop body on a naive emitter (measured: a ConvNet-W32 step 60 ms alone, 1.6 s
  inside ``lax.scan``; no XLA flag changes it). So the steps stay OUT of loops: one jitted
  step dispatched asynchronously per minibatch, the minibatch gathered before it from the
  epoch permutation (in memory) or read from its files (a stream: the same executable, so
  the same result), per-epoch bookkeeping in small jitted functions. Nothing goes to the
  host until the end of a chunk (a stream's permutation: once per epoch).

Between chunks the host updates a tqdm bar, checks the per-epoch losses for NaN/Inf
(:class:`TrainingDiverged`, without saving, so the last good checkpoint stays), calls
``on_chunk`` and saves a checkpoint every ``checkpoint_every`` epochs
(``elf_jax.checkpoint.StepCheckpoints``; atomic). Started again with the same arguments and
``workdir``, a run resumes and ends bit-identical to an uninterrupted run (the key is part
of the state; epoch ``e`` depends only on the state at its start).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from elf_jax.checkpoint import StepCheckpoints, check_expect
from elf_jax.hashing import fingerprint
from elf_jax.losses import mode_needs_features, mode_needs_logits
from elf_jax.keys import raw_key, stage_key, typed_key
from elf_jax.loops import default_engine
from elf_jax.parallel.mesh import DATA, RUNS
from elf_jax.parallel.placement import Placement, global_rows, local_rows, place_rows
from elf_jax.parallel.collectives import check_divisible, fold_key, host_copy, with_bn_axis
from elf_jax.train.protocol import TrainProtocol
from elf_jax.train.step import (TrainState, all_finite, default_hparams, global_augment,
                                init_state, make_variables, train_step)
from elf_jax.train.streaming import (DEFAULT_STREAM_STEPS, MAX_IN_FLIGHT, check_streamable,
                                     is_row_source, make_stream_chunk_fn, stream_batches,
                                     stream_test_batches)

__all__ = [
    "ENGINES", "REPEAT_STRATEGIES", "EVAL_FORMAT", "TrainingDiverged", "default_engine",
    "default_repeat_strategy", "epoch_plan", "fit", "init_states", "make_chunk_fn",
    "make_host_chunk_fn", "run_evaluation", "test_accuracy", "repeat_accuracies",
]

REPEAT_STRATEGIES = ("auto", "sequential", "vmap", "devices")
ENGINES = ("auto", "scan", "host")
METRIC_KEYS = ("loss", "task", "front", "rear", "acc")
_EPOCH_KEYS = METRIC_KEYS + ("finite",)
# v2: evaluation keys are derived from the "evaluate" stage tag (v1 shared the teacher's)
EVAL_FORMAT = "elf_jax.eval_run/2"


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN/Inf; the message names the repeat and the epoch."""


def default_repeat_strategy(backend: Optional[str] = None, arch: str = "", dtype: str = "float32") -> str:
    """The measured default (docs/benchmarks_notes.md, "Evaluation training").

    CPU: ``sequential`` (ConvNet batch 100, 5 repeats: vmap 3.7x slower). GPU (the project brief's numbers,
    H200): sequential is faster for ResNet18 in tf32 and bf16 and for ConvNet in tf32; vmap
    wins only for ConvNet in bf16 (5.8 vs 8.2 ms).
    """
    backend = backend or jax.default_backend()
    if backend == "gpu" and dtype == "bfloat16" and arch.startswith("ConvNet"):
        return "vmap"
    return "sequential"


# ------------------------------------------------------------------------------- one step
def epoch_batches(protocol: TrainProtocol, n: int, placement: Placement) -> tuple[int, int, int]:
    """``(full_batches, batch, last)`` of an epoch over ``n`` rows. On a data mesh the batch
    must divide over the ``data`` devices; a last partial batch that does not is dropped
    (``parallel.drop_remainder``) or is an error."""
    nfull, b, last = protocol.batch_plan(n)
    nd = placement.n_data
    if nd > 1:
        check_divisible(b, nd, "the global minibatch")
        if last % nd:
            if not placement.config.drop_remainder:
                raise ValueError(
                    f"the last minibatch of each epoch has {last} rows ({n} images, batch {b}), "
                    f"which does not divide over the {nd} 'data' devices; set "
                    "parallel.drop_remainder=True to drop it, or use a set size / batch size "
                    f"whose remainder is a multiple of {nd}")
            last = 0
    return nfull, b, last


@functools.lru_cache(maxsize=64)
def placed_step(net, protocol: TrainProtocol, placement: Placement) -> Callable:
    """``step(state, data, idx, key) -> (state, metrics)`` of ONE run: the minibatch of global
    row indices ``idx`` (on one device ``None``: ``data`` is the minibatch) and one
    :func:`train_step`. On a data mesh (called inside
    ``shard_map``) each device trains on its share, gradients and BN statistics averaged over
    ``data``; with ``dsa="global"`` the DSA draw is made for the whole minibatch."""
    if placement.n_data == 1:
        def single(state, data, idx, key):
            # idx None: `data` is the minibatch already (the host engine gathers it before)
            batch = data if idx is None else {k: jnp.take(v, idx, axis=0) for k, v in data.items()}
            return train_step(state, batch, key, net=net, protocol=protocol)

        return single
    pc = placement.config
    dp_net = with_bn_axis(net, DATA) if pc.sync_bn else with_bn_axis(net, None)
    dsa_on = protocol.dsa_strategy not in ("", "none", None)
    global_dsa = pc.dsa == "global" and dsa_on
    step_protocol = protocol.replace(dsa_strategy="none") if global_dsa else protocol
    sharded = placement.shard_data

    def data_parallel(state, data, idx, key):
        b = idx.shape[0] // lax.axis_size(DATA)
        batch = {}
        for name, local in data.items():
            if name == "images" and global_dsa:
                full = global_augment({"images": global_rows(local, idx, sharded)}, key, protocol)
                batch[name] = lax.dynamic_slice_in_dim(full["images"], lax.axis_index(DATA) * b, b)
            else:
                batch[name] = local_rows(local, idx, sharded)
        if "features" in batch:
            batch["features"] = batch["features"].astype(jnp.float32)
        return train_step(state, batch, fold_key(key, DATA), net=dp_net, protocol=step_protocol,
                          axis_name=DATA)

    return data_parallel


@functools.partial(jax.jit, static_argnames=("n", "nsteps"))
def epoch_plan(key_data, *, n, nsteps):
    """``(next key, permutation [n], step keys [nsteps, 2])`` of the epoch that starts with
    ``state.key == key_data``: the random stream of every epoch of the engine."""
    k_next, k_perm, k_aug = jax.random.split(typed_key(key_data), 3)
    return raw_key(k_next), jax.random.permutation(k_perm, n), raw_key(jax.random.split(k_aug, nsteps))


def end_epoch(state: TrainState, k_next, protocol: TrainProtocol) -> TrainState:
    """The end of an epoch: the momentum restarts at zero after epoch ``E//2+1`` (the
    reference builds a new optimizer there), the key becomes ``k_next`` and the epoch count
    goes up."""
    opt_state = state.opt_state
    if protocol.decay_epoch is not None and protocol.reset_momentum_at_decay:
        reset = state.epoch == protocol.decay_epoch  # the epoch just finished
        opt_state = jax.tree.map(lambda x: jnp.where(reset, jnp.zeros_like(x), x), opt_state)
    return state._replace(opt_state=opt_state, key=k_next, epoch=state.epoch + 1)


def _close_epoch(state, sums, k_next, rows, protocol):
    metrics = {k: v / rows for k, v in sums.items()}
    state = end_epoch(state, k_next, protocol)
    # the parameters and BN statistics after the epoch (its loss is computed before its last
    # update, so the state can break first): 1.0 while finite
    metrics["finite"] = all_finite((state.params, state.batch_stats)).astype(jnp.float32)
    return state, metrics


def _skipped_epoch():
    return {k: jnp.ones((), jnp.float32) if k == "finite" else jnp.zeros((), jnp.float32)
            for k in _EPOCH_KEYS}


# ------------------------------------------------------------------------------- scan engine
def run_epoch(state: TrainState, data, *, step, protocol: TrainProtocol, plan, n: int):
    """One epoch of one run; returns ``(state, metrics)`` averaged over the rows trained."""
    nfull, b, last = plan
    k_next, perm, keys = epoch_plan(state.key, n=n, nsteps=nfull + (1 if last else 0))
    sums = {k: jnp.zeros((), jnp.float32) for k in METRIC_KEYS}
    if nfull:
        def body(st, xs):
            return step(st, data, xs[0], xs[1])

        state, ms = lax.scan(body, state, (perm[: nfull * b].reshape(nfull, b), keys[:nfull]))
        sums = {k: sums[k] + jnp.sum(ms[k]) * b for k in METRIC_KEYS}
    if last:
        state, m = step(state, data, perm[nfull * b: nfull * b + last], keys[nfull])
        sums = {k: sums[k] + m[k] * last for k in METRIC_KEYS}
    return _close_epoch(state, sums, k_next, nfull * b + last, protocol)


@functools.lru_cache(maxsize=32)
def make_chunk_fn(net, protocol: TrainProtocol, chunk_epochs: int, strategy: str,
                  placement: Placement = Placement(), n: int = 0):
    """Jitted ``(stacked states, data, n_run) -> (states, metrics [R, chunk])``: up to
    ``chunk_epochs`` epochs, only the first ``n_run`` (traced) run; states donated. Cached
    per arguments, so equal modules and protocols reuse one executable."""
    plan = epoch_batches(protocol, n, placement)
    step = placed_step(net, protocol, placement)

    def single(state, data, n_run):
        def body(st, i):
            go = functools.partial(run_epoch, data=data, step=step, protocol=protocol, plan=plan, n=n)
            return lax.cond(i < n_run, go, lambda s: (s, _skipped_epoch()), st)

        return lax.scan(body, state, jnp.arange(chunk_epochs))

    if strategy == "vmap" and placement.mesh is None:
        return jax.jit(jax.vmap(single, in_axes=(0, None, None)), donate_argnums=(0,))

    def mapped(states, data, n_run):
        return lax.map(lambda s: single(s, data, n_run), states)

    if placement.mesh is None:
        return jax.jit(mapped, donate_argnums=(0,))
    dspec = P(DATA) if placement.shard_data else P()
    fn = jax.shard_map(mapped, mesh=placement.mesh, in_specs=(P(RUNS), dspec, P()),
                       out_specs=P(RUNS), check_vma=False)
    return jax.jit(fn, donate_argnums=(0,))


# ------------------------------------------------------------------------------- host engine
@functools.partial(jax.jit, static_argnames=("size",))
def _gather_rows(data, perm, start, *, size):
    """The minibatch of rows ``perm[start:start + size]`` of every array of ``data``."""
    idx = lax.dynamic_slice(perm, (start,), (size,))
    return {k: jnp.take(v, idx, axis=0) for k, v in data.items()}


@functools.partial(jax.jit, static_argnames=("step",), donate_argnums=(0, 1))
def _batch_step(state, sums, batch, key, *, step):
    """One train step on a gathered minibatch, its metrics added to ``sums`` (times its rows).
    The one executable of the host engine's steps, whether the rows came from memory
    (:func:`_gather_rows`) or from a stream: the two give the same result by construction."""
    size = jax.tree.leaves(batch)[0].shape[0]
    state, m = step(state, batch, None, key)  # one device: the minibatch as given
    return state, {k: sums[k] + m[k] * size for k in METRIC_KEYS}


def _host_step(state, sums, data, perm, start, key, *, step, size):
    """:func:`_batch_step` on the rows ``perm[start:start + size]`` of in-memory ``data``."""
    return _batch_step(state, sums, _gather_rows(data, perm, start, size=size), key, step=step)


_close_epoch_jit = jax.jit(_close_epoch, static_argnames=("rows", "protocol"), donate_argnums=(0,))


def memory_batches(data, plan):
    """``batches(perm)``: the device minibatches of one epoch of in-memory ``data`` in order
    (full ones, then the last partial one), dispatched without a host sync."""
    nfull, b, last = plan

    def batches(perm):
        for s in range(nfull):
            yield _gather_rows(data, perm, s * b, size=b)
        if last:
            yield _gather_rows(data, perm, nfull * b, size=last)

    return batches


def _host_epochs(state, batches, n_run, *, step, protocol, plan, n, sync_every=None):
    """``n_run`` epochs of ONE run, each minibatch its own dispatch (see the module doc).
    ``batches(perm)`` yields an epoch's device minibatches (:func:`memory_batches`, or
    ``streaming.stream_batches``); ``sync_every``: wait for the device every that many steps
    (a stream: its minibatches are held in memory until their step has run)."""
    nfull, b, last = plan
    out = []
    for _ in range(n_run):
        k_next, perm, keys = epoch_plan(state.key, n=n, nsteps=nfull + (1 if last else 0))
        sums = {k: jnp.zeros((), jnp.float32) for k in METRIC_KEYS}
        for i, batch in enumerate(batches(perm)):
            if sync_every and i % sync_every == 0:
                jax.block_until_ready(state)
            state, sums = _batch_step(state, sums, batch, keys[i], step=step)
        state, m = _close_epoch_jit(state, sums, k_next, rows=nfull * b + last, protocol=protocol)
        out.append(m)
    return state, out


@functools.lru_cache(maxsize=32)
def _mesh_host_fns(step, placement: Placement, protocol, plan, n):
    """The host engine's jitted pieces on a mesh: a step advances local run ``j`` (traced) of
    every ``runs`` group by one minibatch; the epoch plan and end are vmapped over runs."""
    dspec = P(DATA) if placement.shard_data else P()

    def body(states, sums, data, perms, start, keys, j, *, size):
        st = jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, j, keepdims=False), states)
        idx = lax.dynamic_slice(lax.dynamic_index_in_dim(perms, j, keepdims=False), (start,), (size,))
        st, m = step(st, data, idx, lax.dynamic_index_in_dim(keys, j, keepdims=False))
        states = jax.tree.map(lambda x, y: lax.dynamic_update_index_in_dim(x, y, j, 0), states, st)
        sums = {k: sums[k].at[j].add(m[k] * size) for k in METRIC_KEYS}
        return states, sums

    @functools.lru_cache(maxsize=None)
    def stepper(size):
        fn = jax.shard_map(functools.partial(body, size=size), mesh=placement.mesh,
                           in_specs=(P(RUNS), P(RUNS), dspec, P(RUNS), P(), P(RUNS), P()),
                           out_specs=(P(RUNS), P(RUNS)), check_vma=False)
        return jax.jit(fn, donate_argnums=(0, 1))

    nsteps = plan[0] + (1 if plan[2] else 0)
    plans = jax.jit(jax.vmap(lambda k: epoch_plan(k, n=n, nsteps=nsteps)))
    close = jax.jit(jax.vmap(functools.partial(_close_epoch, rows=plan[0] * plan[1] + plan[2],
                                               protocol=protocol)), donate_argnums=(0,))
    return stepper, plans, close


@functools.lru_cache(maxsize=32)
def make_host_chunk_fn(net, protocol: TrainProtocol, chunk_epochs: int, strategy: str,
                       placement: Placement = Placement(), n: int = 0):
    """The host engine with the signature of :func:`make_chunk_fn`. One device: the repeats
    one after another (``vmap`` is not offered: grouped convolutions are the slow path on the
    CPU too), on in-memory data or a streamed split (``{"images": StreamedSplit, "labels"}``):
    one epoch loop and one step executable for both. A mesh: every ``runs`` group advances
    its local runs step by step."""
    plan = epoch_batches(protocol, n, placement)
    step = placed_step(net, protocol, placement)
    pad = functools.partial(_pad_epochs, chunk_epochs=chunk_epochs)
    if placement.mesh is not None:
        return _mesh_host_chunk(placement, *_mesh_host_fns(step, placement, protocol, plan, n),
                                plan=plan, pad=pad)

    def fn(states, data, n_run):
        if is_row_source(data["images"]):  # a stream: its rows read while the device trains
            batches, sync = stream_batches(data["images"], data["labels"], plan), MAX_IN_FLIGHT
        else:
            batches, sync = memory_batches(data, plan), None
        finals, mets = [], []
        for r in range(jax.tree.leaves(states.epoch)[0].shape[0]):
            st = jax.tree.map(lambda a: a[r], states)
            st, ms = _host_epochs(st, batches, int(n_run), step=step, protocol=protocol, plan=plan,
                                  n=n, sync_every=sync)
            finals.append(st)
            mets.append(pad(ms))
        stack = lambda *xs: jnp.stack(xs)  # noqa: E731
        return jax.tree.map(stack, *finals), jax.tree.map(stack, *mets)

    return fn


def _pad_epochs(ms, *, chunk_epochs, axis=0):
    """Per-epoch metric dicts -> one dict of ``chunk_epochs`` stacked entries (the epochs
    skipped in a short chunk padded as :func:`make_chunk_fn` pads them)."""
    shape = jnp.shape(ms[0]["loss"])
    skip = {k: jnp.broadcast_to(v, shape) for k, v in _skipped_epoch().items()}
    ms = list(ms) + [skip] * (chunk_epochs - len(ms))
    return jax.tree.map(lambda *xs: jnp.stack(xs, axis), *ms)


def _mesh_host_chunk(placement, stepper, plans, close, *, plan, pad):
    nfull, b, last = plan

    def fn(states, data, n_run):
        r = jax.tree.leaves(states.epoch)[0].shape[0]
        local = r // placement.n_runs
        out = []
        for _ in range(int(n_run)):
            k_next, perms, keys = plans(states.key)
            sums = placement.put_runs({k: np.zeros(r, np.float32) for k in METRIC_KEYS})
            for j in range(local):
                for s in range(nfull + (1 if last else 0)):
                    size = b if s < nfull else last
                    states, sums = stepper(size)(states, sums, data, perms, np.int32(s * b),
                                                 keys[:, s], np.int32(j))
            states, m = close(states, sums, k_next)
            out.append(m)
        return states, pad(out, axis=1)

    return fn


@functools.lru_cache(maxsize=32)
def make_streamed_chunk_fn(net, protocol: TrainProtocol, chunk_epochs: int,
                           placement: Placement = Placement(), n: int = 0, steps: int = 1):
    """The chunk of :func:`make_chunk_fn` over a streamed split (:mod:`elf_jax.train.streaming`):
    ``steps`` minibatches per compiled call. On a ``data`` mesh a device holds only its rows
    of each minibatch: the step sees them as a sharded bank would be seen."""
    plan = epoch_batches(protocol, n, placement)
    if placement.n_data > 1:
        placement = dataclasses.replace(placement, config=dataclasses.replace(
            placement.config, shard_bank=True))
    step = placed_step(net, protocol, placement)
    close = functools.partial(_close_epoch_jit, rows=plan[0] * plan[1] + plan[2], protocol=protocol)
    return make_stream_chunk_fn(step, placement, plan, n, steps=steps, epoch_plan=epoch_plan,
                                close_epoch=close, metric_keys=METRIC_KEYS,
                                pad=functools.partial(_pad_epochs, chunk_epochs=chunk_epochs))


# ------------------------------------------------------------------------------- init/test
def init_states(net, protocol, key, repeats: int, sample_images, hparams=None, *,
                first: int = 0, indices=None) -> TrainState:
    """Stacked initial states of repeats ``first .. first + repeats - 1`` (leading axis).

    Repeat ``r`` uses ``fold_in(key, r)`` (split into an init key and a training key), so a
    repeat's result does not depend on how many repeats run, nor on the strategy or the
    placement. ``key`` is the caller's stage key (``elf_jax.keys.stage_key``).
    ``hparams``: optional dict of scalars or ``[repeats]`` arrays (lr, lambda_front,
    lambda_rear), e.g. for a vectorised lambda sweep. ``indices``: the repeat index of each
    of the ``repeats`` runs instead of ``first ..`` (runs with one index start from the same
    weights and data stream: a lambda sweep's grid points, paired).
    """
    if indices is None:
        indices = range(first, first + repeats)
    elif first:
        raise ValueError("init_states: give `first` or `indices`, not both")
    indices = [int(i) for i in indices]
    if len(indices) != repeats:
        raise ValueError(f"init_states: {len(indices)} indices for {repeats} runs")
    hparams = {**default_hparams(protocol), **dict(hparams or {})}
    # the init depends on the protocol only through the optimizer's state: one executable
    # for every loss mode, lr and lambda
    sgd = TrainProtocol(momentum=protocol.momentum, weight_decay=protocol.weight_decay)
    key = typed_key(key)
    states = []
    for i, index in enumerate(indices):
        k_init, k_train = jax.random.split(jax.random.fold_in(key, index))
        hp = {k: jnp.asarray(v, jnp.float32).reshape(-1)[i] if jnp.ndim(v) else v for k, v in hparams.items()}
        # eager: each op compiles once and is reused by every later network, which beats one
        # jitted init per network when many networks are evaluated (measured on the CPU)
        states.append(init_state(net, sgd, k_init, raw_key(k_train), sample_images, hp))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


@functools.partial(jax.jit, static_argnames=("net",))
def _count_correct(net, variables, x, y, mask):
    logits = net.apply(variables, x, train=False)
    return jnp.sum((jnp.argmax(logits, -1) == y) & mask)


def _test_batches(images, labels, batch_size: int):
    """The test set as fixed-size device batches ``[(x, y, mask)]`` (the last one padded and
    masked: one compilation) and its size; made once per evaluation, reused by every run."""
    images = np.asarray(jax.device_get(images), np.float32)
    labels = np.asarray(jax.device_get(labels))
    labels = labels.argmax(-1) if labels.ndim == 2 else labels
    n = images.shape[0]
    if n == 0:
        raise ValueError("test_accuracy: no images")
    if labels.shape[0] != n:
        raise ValueError(f"test_accuracy: {n} images but {labels.shape[0]} labels")
    bs = int(min(batch_size, n))
    out = []
    for s in range(0, n, bs):
        x, y = images[s:s + bs], labels[s:s + bs].astype(np.int32)
        real = x.shape[0]
        if real < bs:
            x = np.concatenate([x, np.zeros((bs - real,) + x.shape[1:], x.dtype)])
            y = np.concatenate([y, np.zeros(bs - real, np.int32)])
        out.append((jnp.asarray(x), jnp.asarray(y), jnp.asarray(np.arange(bs) < real)))
    return out, n


def _accuracy(net, variables, batches, n) -> float:
    # a Python loop (XLA:CPU runs convolutions inside loops slowly); one batch runs at a time
    # (the next is read meanwhile): the buffers of a forward pass are large, and dispatching
    # ahead would hold several of them at once
    variables = {k: v for k, v in dict(variables).items() if k in ("params", "batch_stats") and v}
    counts = []
    for x, y, m in batches:
        if counts:
            counts[-1].block_until_ready()
        counts.append(_count_correct(net, variables, x, y, m))
    return int(np.sum(jax.device_get(counts))) / n


def _batches(images, labels, batch_size: int):
    """``(batches, n)`` for :func:`_accuracy`: device batches of an in-memory test set, or a
    one-pass reader of a streamed one (call again for another pass)."""
    if is_row_source(images):
        if len(images) == 0:
            raise ValueError("test_accuracy: no images")
        return stream_test_batches(images, labels, batch_size), len(images)
    return _test_batches(images, labels, batch_size)


def test_accuracy(net, variables, images, labels, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``net`` (inference mode, no augmentation) on ``images``/``labels``
    (hard ``[N]`` or soft ``[N, K]``); ``images`` may be a streamed split (read in order,
    never whole in memory)."""
    return _accuracy(net, variables, *_batches(images, labels, batch_size))


test_accuracy.__test__ = False  # not a pytest test when imported into a test module


def repeat_accuracies(net, states: TrainState, images, labels, batch_size: int = 500) -> np.ndarray:
    """:func:`test_accuracy` of every run of stacked ``states``: ``[R]``."""
    states = host_copy(states)
    streamed = is_row_source(images)
    batches, n = (None, None) if streamed else _test_batches(images, labels, batch_size)

    def acc(i):
        variables = make_variables(*jax.tree.map(lambda a: a[i], (states.params, states.batch_stats)))
        if streamed:  # one pass over the files per run
            return test_accuracy(net, variables, images, labels, batch_size)
        return _accuracy(net, variables, batches, n)

    return np.asarray([acc(i) for i in range(np.shape(states.epoch)[0])])


# ------------------------------------------------------------------------------- the engine
def _resume(mngr, states, meta):
    """``(states, start epoch, training seconds before this process)`` from the newest
    checkpoint that reads back (an unreadable newer one is skipped with a warning); refused
    when its settings or format differ. The seconds are None when the checkpoint does not
    record them (written before they were stored: unknown)."""
    where = f"checkpoints in {mngr.directory}"
    restart = _restart_hint(Path(mngr.directory))

    def check(saved):
        if saved.get("kind") != meta["kind"]:
            raise ValueError(
                f"{where} were written in format {saved.get('kind')!r}, but this version of "
                f"elf_jax writes {meta['kind']!r} (the random streams changed, so they cannot be "
                "continued exactly); delete that directory or use another workdir to start over")
        if isinstance(saved.get("protocol"), Mapping) and isinstance(meta.get("protocol"), Mapping):
            # fields the run's mode does not read (TrainProtocol.run_record) are not compared:
            # checkpoints written when they were recorded still resume
            saved = {**saved, "protocol": {k: v for k, v in saved["protocol"].items()
                                           if k in meta["protocol"]}}
        check_expect(saved, meta, where=f"{where} ({restart})", names=_META_NAMES)

    found = mngr.restore_latest_good(like=dict(states._asdict()), check=check)
    if found is None:
        return states, 0, 0.0
    _, restored, saved = found
    states = TrainState(**restored)
    earlier = saved.get("train_seconds")
    epoch = int(np.asarray(host_copy(states.epoch)).reshape(-1)[0])
    return states, epoch, None if earlier is None else float(earlier)


# What the evaluation checkpoints' keys mean, for a refusal that names them.
_META_NAMES = {"data": "hash of the training set: synthetic images, labels, teacher features "
                       "or logits; a new set or teacher changes it",
               "net_config": "the network and its settings", "key": "the seed"}


def _restart_hint(directory: Path) -> str:
    """How to start checkpoints in `directory` over, by the stage of the elf-jax workdir
    layout they sit in (elf_jax.pipeline)."""
    stage = next((s for part, s in (("teachers", "teacher"), ("sweep", "sweep"), ("eval", "evaluate"))
                  if part in directory.parts), None)
    if stage is None:
        return "to start over: delete that directory or use another workdir"
    command = {"teacher": "train-teacher"}.get(stage, stage)
    return (f"to start over: `elf-jax {command} --overwrite={stage}` recomputes that stage, or "
            "delete that directory")


def _first_bad(ms, epoch, num_epochs, desc, mngr):
    bad = ~np.isfinite(ms["loss"]) | (ms["finite"] < 1)
    if not bad.any():
        return
    e = int(np.argwhere(bad.any(0))[0, 0])  # the first bad epoch, then its repeat
    r = int(np.argwhere(bad[:, e])[0, 0])
    last_good = mngr.latest_step() if mngr is not None else None
    where = (f"the last good checkpoint (epoch {last_good}) is kept in {mngr.directory}"
             if last_good is not None else "no checkpoint was written" if mngr is not None
             else "no workdir was given, so nothing was saved")
    raise TrainingDiverged(
        f"{desc}: the training diverged (NaN/Inf loss or parameters) at repeat {r}, epoch "
        f"{epoch + e} (of 0..{num_epochs - 1}); stopping. {where}. Lower the learning rate or "
        "check the synthetic set / feature bank for extreme values.")


def fit(net, protocol: TrainProtocol, data: Mapping[str, Any], states: TrainState, *,
        num_epochs: Optional[int] = None, placement: Any = None, engine: str = "auto",
        strategy: str = "sequential", chunk_epochs: Optional[int] = None, workdir=None,
        checkpoint_every: int = 100, max_to_keep: Optional[int] = 2,
        meta: Optional[Mapping[str, Any]] = None,
        on_chunk: Optional[Callable[[int, TrainState, dict], None]] = None,
        progress: bool = True, desc: str = "train",
        stream_steps: int = DEFAULT_STREAM_STEPS) -> tuple:
    """Trains the stacked runs ``states`` (``[R, ...]``, :func:`init_states`) on ``data``.

    Args:
      data: ``{"images" [N,H,W,C], "labels" [N] or [N,K], "features"?}`` host or device
        arrays, or ``{"images": StreamedSplit, "labels" [N]}``: a split read from its files
        while training (:mod:`elf_jax.train.streaming`; the same epochs, never in memory).
      stream_steps: minibatches per compiled call on a stream (``scan`` engine; the ``host``
        engine dispatches one at a time).
      num_epochs: epochs to run (default ``protocol.num_epochs``; fewer, e.g. for a teacher
        trained for ``E`` epochs with the schedule of ``E``).
      placement: None (one device), a ``ParallelConfig``/config section, or a ``Placement``.
      engine: ``auto`` | ``scan`` | ``host``; strategy: ``sequential`` | ``vmap`` (one device).
      chunk_epochs: epochs per compiled call (default ``checkpoint_every``).
      workdir: checkpoints in ``workdir`` every ``checkpoint_every`` epochs (rounded to whole
        chunks); an existing run there with the same ``meta`` is resumed.
      meta: JSON settings stored with the checkpoints that must match on resume.
      on_chunk: ``on_chunk(epochs_done, states, metrics)`` after each chunk, before its
        checkpoint (teachers save a snapshot per epoch here).
    Returns: ``(states, history {metric: [R, num_epochs]}, info)``; info holds ``seconds``
      (this call), ``total_seconds`` (with the processes a resumed run ran in before; None
      when its checkpoint predates that record), ``resumed_from``, ``engine``,
      ``chunk_epochs``, ``placement``, ``net`` (the network as built for one device, e.g.
      for testing).
    """
    t0 = time.perf_counter()
    placement = Placement.of(placement)
    num_epochs = protocol.num_epochs if num_epochs is None else int(num_epochs)
    n = len(data["images"]) if is_row_source(data["images"]) else int(np.shape(data["images"])[0])
    k = max(1, min(int(chunk_epochs or checkpoint_every or num_epochs), max(num_epochs, 1)))
    ckpt_every = max(k, (max(1, checkpoint_every) // k) * k) if checkpoint_every else k
    engine = default_engine() if engine == "auto" else engine
    if engine not in ENGINES[1:]:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    if engine == "host" and strategy == "vmap" and placement.mesh is None:
        engine = "scan"  # the host engine runs repeats one after another
    repeats = int(np.shape(states.epoch)[0])
    if placement.mesh is not None:
        states = placement.put_runs(host_copy(states))
    # lr and lambdas live in state.hparams: fields that do not change the compiled program
    # are normalised so that such runs share one executable
    compiled = dataclasses.replace(protocol, lr=1.0, lambda_front=0.0, lambda_rear=0.0,
                                   use_learned_lr=False, test_batch_size=1)
    if is_row_source(data["images"]):
        check_streamable(data, placement, strategy)
        on_dev = {"images": data["images"], "labels": np.asarray(data["labels"], np.int32)}
        if engine == "host" and placement.mesh is None:  # the in-memory host engine's epochs
            chunk_fn = make_host_chunk_fn(net, compiled, k, strategy, placement, n)
        else:
            chunk_fn = make_streamed_chunk_fn(net, compiled, k, placement, n,
                                              stream_steps if engine == "scan" else 1)
    else:
        dtypes = {"images": jnp.float32}
        if "features" in data:
            dtypes["features"] = jnp.bfloat16 if placement.config.bank_dtype == "bfloat16" else jnp.float32
        on_dev = place_rows(data, placement, dtypes)
        factory = make_host_chunk_fn if engine == "host" else make_chunk_fn
        chunk_fn = factory(net, compiled, k, strategy, placement, n)
    meta = {"kind": EVAL_FORMAT, **dict(meta or {})}

    mngr, start, earlier = None, 0, 0.0
    if workdir is not None:
        mngr = StepCheckpoints(Path(workdir), max_to_keep=max_to_keep)
        states, start, earlier = _resume(mngr, states, meta)

    def total_seconds():  # stored with each checkpoint, so a resumed run reports its total
        return None if earlier is None else earlier + time.perf_counter() - t0

    history = _load_history(workdir, start, repeats, num_epochs)
    bar = None
    try:
        epoch = start
        while epoch < num_epochs:
            n_run = min(k, num_epochs - epoch)
            states, ms = chunk_fn(states, on_dev, jnp.asarray(n_run, jnp.int32))
            ms = {k_: v[:, :n_run] for k_, v in host_copy(ms).items()}  # the one sync per chunk
            _first_bad(ms, epoch, num_epochs, desc, mngr)
            for k_ in METRIC_KEYS:
                history[k_][:, epoch: epoch + n_run] = ms[k_]
            epoch += n_run
            if progress and bar is None and epoch < num_epochs:
                # made after the first chunk, so its rate and ETA leave out the compilation
                from tqdm.auto import tqdm

                bar = tqdm(total=num_epochs, initial=epoch, desc=desc, unit="ep", leave=False,
                           dynamic_ncols=True, postfix={"compiled+first": f"{time.perf_counter() - t0:.0f}s"})
            elif bar is not None:
                bar.set_postfix(loss=f"{float(ms['loss'][:, -1].mean()):.4f}")
                bar.update(n_run)
            if on_chunk is not None:
                on_chunk(epoch, states, ms)
            if mngr is not None and (epoch % ckpt_every == 0 or epoch == num_epochs):
                _save(mngr, workdir, epoch, states, meta, history, total_seconds())
    finally:
        if bar is not None:
            bar.close()
        if mngr is not None:
            mngr.close()
    info = {"seconds": time.perf_counter() - t0, "total_seconds": total_seconds(),
            "resumed_from": start or None, "engine": engine,
            "chunk_epochs": k, "placement": placement.describe(), "net": with_bn_axis(net, None)}
    return states, history, info


def _load_history(workdir, start, repeats, num_epochs):
    history = {k: np.zeros((repeats, num_epochs), np.float32) for k in METRIC_KEYS}
    path = None if not start else Path(workdir) / f"history_{start}.npz"
    if path is not None and path.exists():
        with np.load(path) as z:
            for k in METRIC_KEYS:
                history[k][:, :start] = z[k][:, :start]
    return history


def _save(mngr, workdir, epoch, states, meta, history, train_seconds):
    np.savez(Path(workdir) / f"history_{epoch}.npz", **history)
    extra = {"epoch": epoch}
    if train_seconds is not None:  # not part of `meta`: never compared on resume
        extra["train_seconds"] = round(train_seconds, 3)
    mngr.save(epoch, dict(states._asdict()), {**meta, **extra})
    for old in Path(workdir).glob("history_*.npz"):
        if int(old.stem.split("_")[1]) not in mngr.all_steps():
            old.unlink(missing_ok=True)


# ------------------------------------------------------------------------------- evaluation
def _resolve_placement(strategy, placement, mesh):
    """``devices`` is a placement: every device its share of the repeats."""
    if strategy != "devices":
        return strategy, Placement.of(placement, mesh)
    if placement is None and mesh is None:
        return "sequential", Placement.repeats_over_devices()
    return "sequential", Placement.of(placement or "shard_map", mesh)


def _check_soft_width(labels: np.ndarray, net) -> None:
    """Soft labels must be over the network's classes: say so before training, naming the
    synthetic set (the loss would only report mismatched shapes)."""
    k = getattr(net, "num_classes", None)
    if labels.ndim == 2 and k is not None and labels.shape[1] != int(k):
        raise ValueError(
            f"the synthetic set's soft labels are over {labels.shape[1]} classes but the network "
            f"has {k} outputs (num_classes); fix the set's labels or build the network with "
            f"{labels.shape[1]} classes")


def _teacher_logit_rows(teacher_logits, n: int, net) -> np.ndarray:
    """The ``kd`` mode's per-image teacher logits as float32 ``[n, K]``, ``K`` the network's
    outputs; a one-line ``ValueError`` otherwise."""
    if teacher_logits is None:
        raise ValueError("loss mode 'kd' needs the teacher's logits (teacher_logits=None); pass "
                         "a feature bank built by elf_jax.elf.build_bank, which stores them")
    t = np.asarray(jax.device_get(teacher_logits), np.float32)
    k = getattr(net, "num_classes", None)
    if t.ndim != 2 or t.shape[0] != n or (k is not None and t.shape[1] != int(k)):
        raise ValueError(f"the teacher logits have shape {t.shape} but loss mode 'kd' needs "
                         f"[{n}, {k}] (one row per image over the network's classes); rebuild "
                         "the bank with a teacher over this set's classes")
    return t


def run_evaluation(net, protocol: TrainProtocol, images, labels, test_images, test_labels,
                   features=None, *, teacher_logits=None, repeats: int = 5, key=None, strategy: str = "auto",
                   engine: str = "auto", chunk_epochs: Optional[int] = None, workdir=None,
                   checkpoint_every: int = 100, max_to_keep: int = 2,
                   hparams: Optional[Mapping[str, Any]] = None, placement: Any = None, mesh=None,
                   progress: bool = True, desc: str = "eval",
                   run_info: Optional[Mapping[str, Any]] = None,
                   return_states: bool = False, repeat_index=None, on_chunk=None) -> dict:
    """Trains ``repeats`` fresh copies of ``net`` on ``(images, features, labels)`` with
    ``protocol`` and returns their test accuracies.

    Args:
      net: Flax module (``elf_jax.models.get_model``).
      images: ``[N,H,W,C]``; labels: int ``[N]`` or float ``[N,K]``; features: the teacher
        feature bank ``[N, ...front shape]`` (needed by the ELF modes); teacher_logits: the
        bank's ``[N, K]`` teacher logits (needed by mode ``kd`` only).
      test_images, test_labels: the real test set.
      repeats, key: number of repeats and the base key (default ``PRNGKey(0)``); repeat ``r``
        starts from ``fold_in(stage_key(key, "evaluate"), r)``: never a teacher's or an
        expert's initialization, the same for every loss mode (paired comparisons).
      strategy: ``auto`` | ``sequential`` | ``vmap`` | ``devices`` (the repeats spread over
        all devices: a placement).
      engine: ``auto`` | ``scan`` | ``host`` (see the module docstring).
      placement, mesh: where to train (:func:`fit`); a ``("runs", "data")`` mesh trains every
        step data parallel.
      workdir: checkpoints go to ``workdir/checkpoints``; an existing run there is resumed.
      hparams: per-repeat ``lr``/``lambda_front``/``lambda_rear`` (scalars or ``[R]``).
      on_chunk: the engine's hook after each chunk (:func:`fit`), e.g. a curve writer.
      repeat_index: ``[R]`` ints, the repeat (key) index of each run (default ``0..R-1``):
        runs with one index start from the same weights and data stream (a lambda sweep).
      run_info: extra JSON metadata that must match on resume (e.g. the architecture name).
    Returns: dict with ``accs`` ``[R]``, ``mean``, ``std``, ``train_loss``/``train_acc``
      ``[R, E+1]``, ``history``, ``seconds`` (this process), ``total_seconds`` (with the
      processes before a resume; None if unknown), ``strategy``, ``engine``, ``resumed_from``,
      ``chunk_epochs``, ``placement`` and ``states`` if ``return_states``.
    """
    key = jax.random.PRNGKey(0) if key is None else key
    if int(repeats) < 1:
        raise ValueError(f"repeats={repeats}: at least one repeat is needed")
    if strategy == "auto":
        strategy = default_repeat_strategy(arch=type(net).__name__, dtype=protocol.dtype)
    if strategy not in REPEAT_STRATEGIES[1:]:
        raise ValueError(f"unknown repeat strategy {strategy!r}; choose one of {REPEAT_STRATEGIES}")
    label, (strategy, placement) = strategy, _resolve_placement(strategy, placement, mesh)
    data = {"images": np.asarray(jax.device_get(images), np.float32),
            "labels": np.asarray(jax.device_get(labels))}
    _check_soft_width(data["labels"], net)
    if mode_needs_features(protocol.mode):
        if features is None:
            raise ValueError(f"loss mode {protocol.mode!r} needs the teacher feature bank (features=None)")
        data["features"] = np.asarray(jax.device_get(features), np.float32)
    if mode_needs_logits(protocol.mode):
        data["teacher_logits"] = _teacher_logit_rows(teacher_logits, len(data["images"]), net)
    base = stage_key(key, "evaluate")
    states = init_states(net, protocol, base, repeats, jnp.asarray(data["images"][:1]), hparams,
                         indices=repeat_index)
    meta = {"net": type(net).__name__, "net_config": repr(net), "protocol": protocol.run_record(),
            "repeats": int(repeats), "key": np.asarray(raw_key(key)).tolist(),
            "data": fingerprint(*data.values()),
            "hparams": {k: np.asarray(v).tolist() for k, v in (hparams or {}).items()},
            **dict(run_info or {})}
    if repeat_index is not None:  # only then: the checkpoints of plain runs stay as they were
        meta["repeat_index"] = [int(i) for i in repeat_index]
    states, history, info = fit(
        net, protocol, data, states, placement=placement, engine=engine, strategy=strategy,
        chunk_epochs=chunk_epochs, workdir=None if workdir is None else Path(workdir) / "checkpoints",
        checkpoint_every=checkpoint_every, max_to_keep=max_to_keep, meta=meta,
        progress=progress, desc=desc, on_chunk=on_chunk)
    accs = repeat_accuracies(info["net"], states, test_images, test_labels, protocol.test_batch_size)
    out = {"accs": accs, "mean": float(np.mean(accs)), "std": float(np.std(accs)),
           "train_loss": history["loss"], "train_acc": history["acc"], "history": history,
           "strategy": label if placement.mesh is None else f"{label} ({placement.describe()})",
           **{k: info[k] for k in ("seconds", "total_seconds", "engine", "resumed_from",
                                   "chunk_epochs", "placement")}}
    if return_states:
        out["states"] = host_copy(states)
    return out
