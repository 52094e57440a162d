"""The engine's epochs over a streamed split (``elf_jax.data.stream.StreamedSplit``): the
minibatches are read from the array_record files while the device trains, never the whole
split in memory.

An epoch is the in-memory engine's epoch (:func:`elf_jax.train.runner.epoch_plan`): the
same permutation from ``state.key``, the same full batches and last partial batch, the same
step keys; only where a minibatch's rows come from differs. A background thread reads the
rows of the next ``prefetch`` groups (uint8, decoded on the split's threads) and puts them
on the devices; the device maps them into the normalized space (a 256-entry table: the same
float32 values as ``load``). The stream's position is ``(state.key, state.epoch)``, which
the engine's checkpoints hold: a run killed anywhere resumes at its last saved epoch and
ends as an uninterrupted one.

The ``host`` engine (the CPU default) on one device trains a stream with its in-memory
epoch loop and step executable (:func:`stream_batches` is its data source), so a streamed
run equals the in-memory run bit for bit by construction. The ``scan`` engine and a mesh
train a group of ``steps`` minibatches per compiled call (``lax.scan``; ``stream_steps``;
one minibatch on a mesh with the host engine): no host round trip per step either way, but
another program than the in-memory chunk, equal to it up to float rounding. On a ``data``
mesh each process reads only the rows of its own devices (``make_array_from_callback``) and
each device trains on its share, as the in-memory engine with a sharded bank does; the runs
axis must be 1 (every run reads its own stream).
"""

from __future__ import annotations

import functools
import queue
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from elf_jax import loops
from elf_jax.parallel.mesh import DATA
from elf_jax.parallel.collectives import host_copy

__all__ = ["is_row_source", "check_streamable", "make_stream_chunk_fn", "stream_batches",
           "DEFAULT_STREAM_STEPS", "PREFETCH", "MAX_IN_FLIGHT"]

#: Minibatches per compiled call of the ``scan`` engine on a stream.
DEFAULT_STREAM_STEPS = 8
#: Groups read ahead of the device.
PREFETCH = 2
#: Groups dispatched but not yet run: dispatch is asynchronous, and without this bound the
#: host would read and enqueue a whole epoch ahead of the device, every batch held in memory.
MAX_IN_FLIGHT = 2


def is_row_source(x) -> bool:
    """Whether ``x`` is read on demand (``read(indices)`` uint8 rows + a ``_lut`` table)."""
    return hasattr(x, "read") and hasattr(x, "to_space") and not isinstance(x, (np.ndarray, jax.Array))


def check_streamable(data, placement, strategy: str) -> None:
    """One-line ``ValueError`` when a streamed ``data`` cannot be trained as asked."""
    extra = sorted(set(data) - {"images", "labels"})
    if extra:
        raise ValueError(f"a streamed training set carries images and labels only (got "
                         f"{extra}): train ELF on an in-memory (synthetic) set")
    if np.ndim(data["labels"]) != 1:
        raise ValueError("a streamed training set needs hard integer labels [N]")
    if placement.mesh is not None and placement.n_runs != 1:
        raise ValueError(f"a streamed training set trains one run at a time on the 'data' axis; "
                         f"set parallel.runs=1 (got runs={placement.n_runs})")
    if strategy == "vmap":
        raise ValueError("repeat strategy 'vmap' needs the training set in memory; use "
                         "'sequential' with a streamed set")


def _to_space(lut, u8):
    return lut[u8.astype(jnp.int32), jnp.arange(lut.shape[1])]


@functools.lru_cache(maxsize=64)
def _group_fn(step, placement, size: int, metric_keys: tuple, per_step: bool = False):
    """Jitted ``(state, sums, u8 [S, size, ...], labels [S, size], keys [S, 2], lut) ->
    (state, sums)``: ``S`` minibatches of ``size`` rows, one compiled call. ``per_step``:
    ``sums`` is returned as given, and the ``S`` steps' metrics ``[S]`` with it (the scan
    engine sums an epoch's metrics at its end, :func:`_epoch_sums`). Cached: the same step
    (``placed_step`` is cached too) on a split of another size reuses the executable instead
    of compiling it again."""
    def body(state, sums, u8, labels, keys, lut):
        def one(carry, xs):
            st, sm = carry
            x8, y, k = xs
            data = {"images": _to_space(lut, x8), "labels": y}
            st, m = step(st, data, jnp.arange(x8.shape[0] * _data_size(placement)), k)
            if per_step:
                return (st, sm), m
            return (st, {k_: sm[k_] + m[k_] * size for k_ in metric_keys}), None

        (state, sums), ms = loops.scan(one, (state, sums), (u8, labels, keys))
        return (state, sums, ms) if per_step else (state, sums)

    donate = (0,) if per_step else (0, 1)
    if placement.mesh is None:
        return jax.jit(body, donate_argnums=donate)
    fn = jax.shard_map(body, mesh=placement.mesh,
                       in_specs=(P(), P(), P(None, DATA), P(None, DATA), P(), P()),
                       out_specs=(P(), P(), P()) if per_step else (P(), P()), check_vma=False)
    return jax.jit(fn, donate_argnums=donate)


@functools.partial(jax.jit, static_argnames=("b", "last"))
def _epoch_sums(full, lasts, *, b: int, last: int):
    """An epoch's metric sums from its steps' metrics as the in-memory scan engine
    (``run_epoch``) adds them (the same order of additions): the full minibatches'
    ``full`` (a list of ``{metric: [S]}``) summed, times ``b``, then the last one's."""
    keys = (full or lasts)[0].keys()
    sums = {k: jnp.zeros((), jnp.float32) for k in keys}
    if full:
        sums = {k: sums[k] + jnp.sum(jnp.concatenate([m[k] for m in full])) * b for k in keys}
    if last:
        sums = {k: sums[k] + lasts[0][k][0] * last for k in keys}
    return sums


def _data_size(placement) -> int:
    # inside shard_map a device holds 1/n_data of the rows; the step's row indices are global
    return placement.n_data


def _groups(nfull: int, b: int, last: int, steps: int):
    """``[(first row, group steps, rows per step)]`` of one epoch."""
    out, s = [], 0
    while s < nfull:
        g = min(steps, nfull - s)
        out.append((s * b, g, b))
        s += g
    if last:
        out.append((nfull * b, 1, last))
    return out


_DONE = object()  # the end of an epoch's groups


class _Prefetcher:
    """Reads the groups of one epoch on a thread, ``PREFETCH`` ahead, and yields them on the
    devices until the last; an error in the thread is raised in the caller."""

    def __init__(self, source, labels, perm, groups, put):
        self._q = queue.Queue(maxsize=PREFETCH)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source, labels, perm, groups, put),
                                        daemon=True, name="elf-jax-prefetch")
        self._thread.start()

    def _run(self, source, labels, perm, groups, put):
        try:
            for start, g, size in groups:
                rows = perm[start: start + g * size].reshape(g, size)
                if not self._hand(put(source, labels, rows)):
                    return
            self._hand(_DONE)
        except BaseException as e:  # handed to the consumer
            self._hand(e)

    def _hand(self, item) -> bool:
        """Puts ``item`` in the queue; False when the consumer closed the reader first."""
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        item = self._q.get()
        if item is _DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)


def _put_rows(source, labels, rows):
    """``(u8 [*rows.shape, H, W, C], labels [*rows.shape])`` of ``rows`` on the device."""
    u8 = source.read(rows.reshape(-1)).reshape(rows.shape + tuple(source.image_shape))
    return jax.device_put(u8), jax.device_put(labels[rows])


def _put_fn(placement):
    """``put(source, labels, rows [S, size]) -> (u8, labels)`` on the placement; on a mesh
    each process reads only the rows of its addressable devices."""
    if placement.mesh is None:
        return _put_rows
    sh = NamedSharding(placement.mesh, P(None, DATA))

    def put(source, labels, rows):
        shape = rows.shape + tuple(source.image_shape)
        u8 = jax.make_array_from_callback(
            shape, sh, lambda idx: source.read(rows[idx[:2]].reshape(-1)).reshape(
                rows[idx[:2]].shape + tuple(source.image_shape)))
        lab = jax.make_array_from_callback(rows.shape, sh, lambda idx: labels[rows[idx[:2]]])
        return u8, lab

    return put


def make_stream_chunk_fn(step: Callable, placement, plan, n: int, *, steps: int,
                         epoch_plan: Callable, close_epoch: Callable, metric_keys,
                         pad: Callable) -> Callable:
    """The engine's chunk over a stream, with the signature of the in-memory chunks:
    ``fn(states [R, ...], {"images": source, "labels": [N]}, n_run) -> (states, metrics)``;
    the runs train one after another, each its own stream."""
    nfull, b, last = plan
    groups = _groups(nfull, b, last, max(1, int(steps)))
    per_step = int(steps) > 1  # the scan engine: metrics summed as run_epoch sums them
    put = _put_fn(placement)
    fns = {}

    def group_fn(size):
        if size not in fns:
            fns[size] = _group_fn(step, placement, size, tuple(metric_keys), per_step)
        return fns[size]

    def place(tree):
        return tree if placement.mesh is None else placement.put(host_copy(tree))

    def fn(states, data, n_run):
        source, labels = data["images"], np.asarray(data["labels"], np.int32)
        lut = place(jnp.asarray(source._lut))
        finals, mets = [], []
        for r in range(int(np.shape(jax.tree.leaves(states.epoch)[0])[0])):
            st = place(jax.tree.map(lambda a: a[r], states))
            out = []
            for _ in range(int(n_run)):
                k_next, perm, keys = epoch_plan(host_copy(st.key), n=n,
                                                nsteps=nfull + (1 if last else 0))
                perm, keys = np.asarray(perm), np.asarray(keys)
                sums = place({k: jnp.zeros((), jnp.float32) for k in metric_keys})
                reader = _Prefetcher(source, labels, perm, groups, put)
                full, lasts = [], []
                try:
                    step_i = 0
                    for gi, ((start, g, size), (u8, y)) in enumerate(zip(groups, reader)):
                        if gi % MAX_IN_FLIGHT == 0:
                            jax.block_until_ready(st)  # the device caught up: bounded memory
                        out_g = group_fn(size)(st, sums, u8, y, place(keys[step_i: step_i + g]), lut)
                        if per_step:
                            st, sums, ms = out_g
                            (full if size == b else lasts).append(ms)
                        else:
                            st, sums = out_g
                        step_i += g
                finally:
                    reader.close()
                if per_step:
                    sums = _epoch_sums(full, lasts, b=b, last=last)
                st, m = close_epoch(st, sums, place(np.asarray(k_next)))
                out.append(m)
            finals.append(host_copy(st) if placement.mesh is not None else st)
            mets.append(pad(out))
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *finals)
        if placement.mesh is not None:
            stacked = placement.put_runs(host_copy(stacked))
        return stacked, jax.tree.map(lambda *xs: jnp.stack(xs), *mets)

    return fn


def stream_batches(source, labels, plan) -> Callable:
    """``batches(perm)`` of the host engine on one device (``runner._host_epochs``): an
    epoch's minibatches of a streamed split in the order of ``perm``, each read on a thread
    ``PREFETCH`` ahead and mapped into the normalized space on the device (the float32 values
    of ``load``), so the engine's one step executable sees the rows the in-memory run sees."""
    nfull, b, last = plan
    groups = _groups(nfull, b, last, 1)
    labels = np.asarray(labels, np.int32)
    lut = jnp.asarray(source._lut)

    def put(src, lab, rows):  # a group of one minibatch: [size, ...], as memory's
        return _put_rows(src, lab, rows[0])

    def batches(perm):
        reader = _Prefetcher(source, labels, np.asarray(perm), groups, put)
        try:
            for u8, y in reader:
                yield {"images": _to_space_jit(lut, u8), "labels": y}
        finally:
            reader.close()

    return batches


def stream_test_batches(source, labels, batch_size: int):
    """``(x, y, mask)`` device batches of a streamed split in order (the last padded and
    masked: one compilation), read one ahead of the caller."""
    n = len(source)
    bs = int(min(batch_size, n))
    labels = np.asarray(labels, np.int32)
    lut = jnp.asarray(source._lut)

    def read(s):
        rows = np.arange(s, min(n, s + bs))
        u8 = source.read(rows)
        y = labels[rows]
        real = len(rows)
        if real < bs:
            u8 = np.concatenate([u8, np.zeros((bs - real,) + u8.shape[1:], u8.dtype)])
            y = np.concatenate([y, np.zeros(bs - real, np.int32)])
        return _to_space_jit(lut, jnp.asarray(u8)), jnp.asarray(y), jnp.asarray(np.arange(bs) < real)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as ex:
        nxt = ex.submit(read, 0)
        for s in range(0, n, bs):
            cur = nxt.result()
            if s + bs < n:
                nxt = ex.submit(read, s + bs)
            yield cur


_to_space_jit = jax.jit(_to_space)
