"""Evaluation training of several repeats: epochs under ``lax.scan`` in chunks, checkpoints.

``run_evaluation(net, protocol, images, labels, test_images, test_labels, features=None, *,
repeats, key, ...) -> dict``

Structure of the compiled program (one ``jit`` per (network, protocol, shapes, strategy)):

* ``run_epoch``: a fresh permutation of the training set (the DataLoader's ``shuffle=True``),
  ``lax.scan`` over the full batches, then ONE more step on the last partial batch at its
  own static size (``drop_last=False``). The last batch is therefore exactly the reference's
  smaller batch -- loss mean, BatchNorm batch statistics and running averages included --
  with no padding or masking, at the price of tracing the step at two shapes.
* ``run_chunk``: ``lax.scan`` over up to ``chunk_epochs`` epochs; epochs past the requested
  count are skipped by a ``lax.cond`` on the (unbatched) scan index, so the last, shorter
  chunk reuses the same executable. No host round trip inside a chunk.
* repeats: the state of all repeats is stacked on a leading axis and the chunk runs them
  ``sequential`` (``lax.map``: one after another in one program), ``vmap`` (vectorised;
  every convolution becomes a grouped convolution, and the DSA group ``switch`` becomes a
  select over all groups), or ``devices`` (``shard_map`` over a mesh axis ``"repeat"``; each
  device maps over its share of the repeats).

Between chunks the host updates a tqdm bar (with ETA), checks the per-epoch losses for
NaN/Inf (raising :class:`EvaluationDiverged` naming the repeat and epoch, without saving,
so the last good checkpoint stays), and saves a checkpoint every ``checkpoint_every`` epochs
(``elf_jax.checkpoint.StepCheckpoints``, an orbax CheckpointManager; atomic). Started again
with the same arguments and ``workdir``, a run resumes from the latest checkpoint and ends
bit-identical to an uninterrupted run (the RNG key is part of the state; the data order and
DSA draws of epoch ``e`` depend only on the state at the start of ``e``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from elf_jax.elf.losses import mode_needs_features
from elf_jax.train.protocol import EvalProtocol
from elf_jax.train.step import EvalState, init_state, make_variables, train_step

__all__ = [
    "ENGINES",
    "default_engine",
    "end_epoch",
    "epoch_plan",
    "make_host_chunk_fn",
    "REPEAT_STRATEGIES",
    "EvaluationDiverged",
    "default_repeat_strategy",
    "init_states",
    "make_chunk_fn",
    "run_evaluation",
    "test_accuracy",
]

REPEAT_STRATEGIES = ("auto", "sequential", "vmap", "devices")
METRIC_KEYS = ("loss", "task", "front", "rear", "acc")
_EPOCH_KEYS = METRIC_KEYS + ("finite",)


class EvaluationDiverged(FloatingPointError):
    """The training loss became NaN/Inf; the message names the repeat and the epoch."""


def default_repeat_strategy(backend: Optional[str] = None, arch: str = "", dtype: str = "float32") -> str:
    """The measured default (BENCHMARKS.md, "Evaluation training").

    CPU: ``sequential`` (ConvNet batch 100, 5 repeats: vmap 3.7x slower). GPU (SPEC numbers,
    H200): sequential is faster for ResNet18 in tf32 and bf16 and for ConvNet in tf32; vmap
    wins only for ConvNet in bf16 (5.8 vs 8.2 ms).
    """
    backend = backend or jax.default_backend()
    if backend == "gpu" and dtype == "bfloat16" and arch.startswith("ConvNet"):
        return "vmap"
    return "sequential"


# ------------------------------------------------------------------------------- one epoch
def _gather(data: Mapping[str, jax.Array], idx: jax.Array) -> dict:
    return {k: jnp.take(v, idx, axis=0) for k, v in data.items()}


def run_epoch(state: EvalState, data: Mapping[str, jax.Array], *, net, protocol: EvalProtocol):
    """One epoch over ``data`` (dict of ``[N, ...]`` arrays); returns ``(state, metrics)``
    with metrics averaged over samples (the reference's ``loss_avg``/``acc_avg``)."""
    n = data["images"].shape[0]
    nfull, b, last = protocol.batch_plan(n)
    key = jax.random.wrap_key_data(state.key) if state.key.dtype == jnp.uint32 else state.key
    k_next, k_perm, k_aug = jax.random.split(key, 3)
    perm = jax.random.permutation(k_perm, n)
    step_keys = jax.random.split(k_aug, nfull + (1 if last else 0))
    step = functools.partial(train_step, net=net, protocol=protocol)

    def body(st, xs):
        idx, k = xs
        st, m = step(st, _gather(data, idx), k)
        return st, m

    sums = {k: jnp.zeros((), jnp.float32) for k in METRIC_KEYS}
    if nfull:
        state, ms = lax.scan(body, state, (perm[: nfull * b].reshape(nfull, b), step_keys[:nfull]))
        sums = {k: sums[k] + jnp.sum(ms[k]) * b for k in METRIC_KEYS}
    if last:
        state, m = step(state, _gather(data, perm[nfull * b :]), step_keys[nfull])
        sums = {k: sums[k] + m[k] * last for k in METRIC_KEYS}
    metrics = {k: v / n for k, v in sums.items()}

    state = end_epoch(state, jax.random.key_data(k_next), protocol)
    metrics["finite"] = _all_finite(state)
    return state, metrics


def end_epoch(state: EvalState, k_next, protocol: EvalProtocol) -> EvalState:
    """The end of an epoch: the momentum restarts at zero after epoch ``E//2+1`` (the
    reference builds a new optimizer there), the key becomes ``k_next`` (raw key data) and
    the epoch count goes up. Shared by every epoch loop (scan, host, data parallel)."""
    opt_state = state.opt_state
    if protocol.decay_epoch is not None and protocol.reset_momentum_at_decay:
        reset = state.epoch == protocol.decay_epoch  # the epoch just finished
        opt_state = jax.tree.map(lambda x: jnp.where(reset, jnp.zeros_like(x), x), opt_state)
    return state._replace(opt_state=opt_state, key=k_next, epoch=state.epoch + 1)


def _all_finite(state: EvalState):
    """1.0 if every parameter / BN statistic is still finite after this epoch (the loss of an
    epoch is computed before its last update, so the state can break first)."""
    leaves = jax.tree.leaves((state.params, state.batch_stats))
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(l)) for l in leaves])).astype(jnp.float32)


def run_chunk(state, data, n_run, *, net, protocol: EvalProtocol, chunk_epochs: int):
    """Up to ``chunk_epochs`` epochs; only the first ``n_run`` (traced, unbatched) run."""

    def body(st, i):
        def go(s):
            return run_epoch(s, data, net=net, protocol=protocol)

        def skip(s):
            return s, {k: jnp.ones((), jnp.float32) if k == "finite" else jnp.zeros((), jnp.float32)
                       for k in _EPOCH_KEYS}

        return lax.cond(i < n_run, go, skip, st)

    return lax.scan(body, state, jnp.arange(chunk_epochs))


@functools.lru_cache(maxsize=32)
def make_chunk_fn(net, protocol: EvalProtocol, chunk_epochs: int, strategy: str, mesh=None):
    """(Cached per arguments: equal modules and protocols reuse one executable.) Jitted ``(stacked_states, data, n_run) -> (stacked_states, metrics [R, K])``; the
    states are donated."""
    single = functools.partial(run_chunk, net=net, protocol=protocol, chunk_epochs=chunk_epochs)
    if strategy == "sequential":

        def fn(states, data, n_run):
            return lax.map(lambda s: single(s, data, n_run), states)

    elif strategy == "vmap":
        fn = jax.vmap(single, in_axes=(0, None, None))
    elif strategy == "devices":
        from jax.sharding import PartitionSpec as P

        if mesh is None:
            mesh = jax.make_mesh((jax.device_count(),), ("repeat",))

        def local(states, data, n_run):
            return lax.map(lambda s: single(s, data, n_run), states)

        fn = jax.shard_map(
            local, mesh=mesh, in_specs=(P("repeat"), P(), P()), out_specs=P("repeat"),
            check_vma=False,
        )
    else:
        raise ValueError(f"unknown repeat strategy {strategy!r}; choose one of {REPEAT_STRATEGIES}")
    return jax.jit(fn, donate_argnums=(0,))


# ------------------------------------------------------------------------------- host engine
# XLA:CPU does not canonicalise the backward convolutions (filter and input gradients) that
# sit inside a while-loop body: they keep dim_labels like ``f01b_i01o->01bf`` and fall off the
# Eigen fast path onto a naive loop emitter. Measured here (2-core EPYC, jax 0.10.2): a
# ConvNet-W32 train step costs 60 ms of CPU alone and 1.6 s inside ``lax.scan``; a lone
# filter-gradient conv 0.13 s vs ~20 s inside ``fori_loop``. No XLA flag changes it (oneDNN,
# XNNPACK, thunk runtime tried). So on the CPU the default engine ("host") keeps the steps
# OUT of loops: one jitted step (gather by dynamic_slice of the epoch permutation inside it)
# dispatched asynchronously per minibatch, and per-epoch bookkeeping in small jitted
# functions. Nothing is transferred to the host until the end of a chunk, so there is no
# host round trip inside a chunk either; dispatch costs microseconds against ~100 ms steps.


@functools.partial(jax.jit, static_argnames=("n", "nsteps"))
def epoch_plan(key_data, *, n, nsteps):
    """``(next key, permutation [n], step keys [nsteps, 2])`` of the epoch that starts with
    ``state.key == key_data``: the random stream of :func:`run_epoch`, for epoch loops run
    from the host (here and ``elf_jax.parallel.loop``)."""
    key = jax.random.wrap_key_data(key_data)
    k_next, k_perm, k_aug = jax.random.split(key, 3)
    return jax.random.key_data(k_next), jax.random.permutation(k_perm, n), jax.random.split(k_aug, nsteps)


@functools.partial(jax.jit, static_argnames=("net", "protocol", "size"), donate_argnums=(0, 1))
def _host_step(state, sums, data, perm, start, key, *, net, protocol, size):
    idx = lax.dynamic_slice(perm, (start,), (size,))
    state, m = train_step(state, _gather(data, idx), key, net=net, protocol=protocol)
    return state, {k: sums[k] + m[k] * size for k in METRIC_KEYS}


@functools.partial(jax.jit, static_argnames=("protocol", "n"), donate_argnums=(0,))
def _end_epoch(state, sums, k_next, *, protocol, n):
    metrics = {k: v / n for k, v in sums.items()}
    state = end_epoch(state, k_next, protocol)
    metrics["finite"] = _all_finite(state)
    return state, metrics


def _host_epochs(state, data, n_run, *, net, protocol):
    """``n_run`` epochs of ONE repeat with the host-dispatched engine (same semantics and
    random stream as :func:`run_epoch`)."""
    n = data["images"].shape[0]
    nfull, b, last = protocol.batch_plan(n)
    nsteps = nfull + (1 if last else 0)
    out = []
    for _ in range(n_run):
        k_next, perm, keys = epoch_plan(state.key, n=n, nsteps=nsteps)
        sums = {k: jnp.zeros((), jnp.float32) for k in METRIC_KEYS}
        for s in range(nfull):
            state, sums = _host_step(state, sums, data, perm, s * b, keys[s], net=net,
                                     protocol=protocol, size=b)
        if last:
            state, sums = _host_step(state, sums, data, perm, nfull * b, keys[nfull], net=net,
                                     protocol=protocol, size=last)
        state, m = _end_epoch(state, sums, k_next, protocol=protocol, n=n)
        out.append(m)
    return state, out


def make_host_chunk_fn(net, protocol: EvalProtocol, chunk_epochs: int, strategy: str, mesh=None):
    """The "host" engine with the signature of :func:`make_chunk_fn`. ``sequential`` runs the
    repeats one after another; ``vmap`` is not offered here (grouped convolutions are the slow
    path on the CPU too) and falls back to sequential."""
    del mesh

    def fn(states, data, n_run):
        n_run = int(n_run)
        reps = jax.tree.leaves(states.epoch)[0].shape[0]
        finals, mets = [], []
        for r in range(reps):
            st = jax.tree.map(lambda a: a[r], states)
            st, ms = _host_epochs(st, data, n_run, net=net, protocol=protocol)
            finals.append(st)
            pad = [{k: jnp.ones(()) if k == "finite" else jnp.zeros(()) for k in _EPOCH_KEYS}] * (chunk_epochs - n_run)
            mets.append(jax.tree.map(lambda *xs: jnp.stack(xs), *(ms + pad)))
        stack = lambda *xs: jnp.stack(xs)  # noqa: E731
        return jax.tree.map(stack, *finals), jax.tree.map(stack, *mets)

    return fn


ENGINES = ("auto", "scan", "host")


def default_engine(backend: Optional[str] = None) -> str:
    """``host`` on the CPU (see above), ``scan`` elsewhere."""
    return "host" if (backend or jax.default_backend()) == "cpu" else "scan"


# ------------------------------------------------------------------------------- init/test
def init_states(net, protocol, key, repeats: int, sample_images, hparams=None) -> EvalState:
    """Stacked initial states of ``repeats`` independent repeats (leading axis ``R``).

    Repeat ``r`` uses ``jax.random.fold_in(key, r)`` (split into an init key and a training
    key), so a repeat's result does not depend on how many repeats run or on the strategy.
    ``hparams``: optional dict of scalars or ``[R]`` arrays (lr, lambda_front, lambda_rear),
    e.g. for a vectorised lambda sweep.
    """
    hparams = dict(hparams or {})
    states = []
    for r in range(repeats):
        k_init, k_train = jax.random.split(jax.random.fold_in(key, r))
        hp = {k: jnp.asarray(v, jnp.float32).reshape(-1)[r] if jnp.ndim(v) else v for k, v in hparams.items()}
        states.append(init_state(net, protocol, k_init, _raw(k_train), sample_images, hp))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def _raw(k):
    """Raw uint32 key data of a typed or raw PRNG key."""
    k = jnp.asarray(k) if not hasattr(k, "dtype") else k
    return jax.random.key_data(k) if jnp.issubdtype(k.dtype, jax.dtypes.prng_key) else k


@functools.partial(jax.jit, static_argnames=("net",))
def _test_counts(params, batch_stats, xs, ys, mask, *, net):
    def per_repeat(pb):
        p, bs = pb

        def per_batch(b):
            x, y, m = b
            logits = net.apply(make_variables(p, bs), x, train=False)
            return jnp.sum((jnp.argmax(logits, -1) == y) * m)

        return jnp.sum(lax.map(per_batch, (xs, ys, mask)))

    return lax.map(per_repeat, (params, batch_stats))


def test_accuracy(net, states: EvalState, test_images, test_labels, batch_size: int = 500) -> np.ndarray:
    """Test accuracy of every repeat (BN in eval mode, no augmentation): ``[R]`` floats."""
    test_images = np.asarray(test_images)
    test_labels = np.asarray(test_labels)
    if test_labels.ndim == 2:
        test_labels = test_labels.argmax(-1)
    n = test_images.shape[0]
    tb = min(batch_size, n)
    nb = -(-n // tb)
    pad = nb * tb - n
    xs = np.concatenate([test_images, np.zeros((pad,) + test_images.shape[1:], test_images.dtype)])
    ys = np.concatenate([test_labels, np.zeros((pad,), test_labels.dtype)]).astype(np.int32)
    mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    counts = _test_counts(
        states.params, states.batch_stats,
        xs.reshape((nb, tb) + xs.shape[1:]), ys.reshape(nb, tb), mask.reshape(nb, tb), net=net,
    )
    return np.asarray(counts, np.float64) / n


# ------------------------------------------------------------------------------- driver
def _fingerprint(*arrays) -> str:
    h = hashlib.sha1()
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _to_dict(state: EvalState) -> dict:
    return dict(state._asdict())


def run_evaluation(
    net,
    protocol: EvalProtocol,
    images,
    labels,
    test_images,
    test_labels,
    features=None,
    *,
    repeats: int = 5,
    key=None,
    strategy: str = "auto",
    engine: str = "auto",
    chunk_epochs: Optional[int] = None,
    workdir=None,
    checkpoint_every: int = 100,
    max_to_keep: int = 2,
    hparams: Optional[Mapping[str, Any]] = None,
    mesh=None,
    progress: bool = True,
    desc: str = "eval",
    run_info: Optional[Mapping[str, Any]] = None,
    return_states: bool = False,
) -> dict:
    """Trains ``repeats`` fresh copies of ``net`` on ``(images, features, labels)`` with
    ``protocol`` and returns their test accuracies.

    Args:
      net: Flax module (``elf_jax.models.get_model``).
      images: ``[N,H,W,C]``; labels: int ``[N]`` or float ``[N,K]``; features: the teacher
        feature bank ``[N, ...front shape]`` (needed unless ``protocol.mode == "task"``).
      test_images, test_labels: the real test set.
      repeats, key: number of repeats and the base PRNG key (default ``PRNGKey(0)``).
      strategy: ``auto`` | ``sequential`` | ``vmap`` | ``devices`` (see module docstring).
      engine: ``auto`` | ``scan`` (epochs under ``lax.scan`` in one executable per chunk) |
        ``host`` (jitted steps dispatched from Python; the CPU default, see "host engine").
      chunk_epochs: epochs per compiled call (default ``checkpoint_every``, at most the run).
      workdir: if set, checkpoints go to ``workdir/checkpoints`` every ``checkpoint_every``
        epochs (rounded to whole chunks) and an existing run there is resumed.
      hparams: per-repeat overrides of ``lr``/``lambda_front``/``lambda_rear`` (scalars or
        ``[R]``), e.g. a vectorised lambda sweep.
      run_info: extra JSON metadata that must match on resume (e.g. the architecture name).
    Returns: dict with ``accs`` ``[R]``, ``mean``, ``std``, ``train_loss``/``train_acc``
      ``[R, E+1]``, ``seconds`` (training wall time in this call), ``strategy``,
      ``resumed_from`` (epoch or None), and ``states`` if ``return_states``.
    """
    t0 = time.perf_counter()
    key = jax.random.PRNGKey(0) if key is None else key
    if strategy == "auto":
        strategy = default_repeat_strategy(arch=type(net).__name__, dtype=protocol.dtype)
    if strategy not in REPEAT_STRATEGIES[1:]:
        raise ValueError(f"unknown repeat strategy {strategy!r}; choose one of {REPEAT_STRATEGIES}")
    if strategy == "devices":
        ndev = mesh.size if mesh is not None else jax.device_count()
        if repeats % ndev:
            raise ValueError(f"strategy 'devices': {repeats} repeats do not divide over {ndev} devices")

    need_f = mode_needs_features(protocol.mode)
    data = {"images": jnp.asarray(images, jnp.float32), "labels": jnp.asarray(labels)}
    if need_f:
        if features is None:
            raise ValueError(f"loss mode {protocol.mode!r} needs the teacher feature bank (features=None)")
        data["features"] = jnp.asarray(features, jnp.float32)
    num_epochs = protocol.num_epochs
    k = chunk_epochs or checkpoint_every or num_epochs
    k = max(1, min(int(k), num_epochs))
    ckpt_every = max(k, (max(1, checkpoint_every) // k) * k) if checkpoint_every else k

    states = init_states(net, protocol, key, repeats, data["images"][:1], hparams)
    key_data = np.asarray(_raw(key))
    meta = {
        "kind": "elf_jax.eval_run/1",
        "net": type(net).__name__,
        "net_config": repr(net),
        "protocol": protocol.to_dict(),
        "repeats": int(repeats),
        "key": key_data.tolist(),
        "data": _fingerprint(images, labels, features),
        "hparams": {k_: np.asarray(v).tolist() for k_, v in (hparams or {}).items()},
        **dict(run_info or {}),
    }

    mngr = None
    start = 0
    resumed_from = None
    if workdir is not None:
        from elf_jax.checkpoint import StepCheckpoints, check_expect

        mngr = StepCheckpoints(Path(workdir) / "checkpoints", max_to_keep=max_to_keep)
        latest = mngr.latest_step()
        if latest is not None:
            saved_meta = mngr.read_meta(latest)
            check_expect(saved_meta, {k_: v for k_, v in meta.items()},
                         where=f"evaluation checkpoints in {mngr.directory} (use another workdir "
                               "or delete it to start over)")
            restored, _ = mngr.restore(latest, like=_to_dict(states))
            states = EvalState(**restored)
            start = int(np.asarray(states.epoch).reshape(-1)[0])
            resumed_from = start

    history = {k_: np.zeros((repeats, num_epochs), np.float32) for k_ in METRIC_KEYS}
    if start:
        hist_path = Path(workdir) / "checkpoints" / f"history_{start}.npz"
        if hist_path.exists():
            with np.load(hist_path) as z:
                for k_ in METRIC_KEYS:
                    history[k_][:, :start] = z[k_][:, :start]

    # lr and lambdas live in state.hparams: fields that do not change the compiled program
    # are normalised so that such runs share one executable
    compiled = dataclasses.replace(protocol, lr=0.0, lambda_front=0.0, lambda_rear=0.0,
                                   use_learned_lr=False, test_batch_size=1)
    if engine == "auto":
        engine = default_engine()
    if engine not in ENGINES[1:]:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    if engine == "host" and strategy == "sequential":
        chunk_fn = make_host_chunk_fn(net, compiled, k, strategy, mesh)
    else:
        engine = "scan"
        chunk_fn = make_chunk_fn(net, compiled, k, strategy, mesh)
    bar = None
    if progress and start < num_epochs:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_epochs, initial=start, desc=desc, unit="ep", leave=False, dynamic_ncols=True)
    try:
        epoch = start
        while epoch < num_epochs:
            n_run = min(k, num_epochs - epoch)
            states, ms = chunk_fn(states, data, jnp.asarray(n_run, jnp.int32))
            ms = {k_: np.asarray(v)[:, :n_run] for k_, v in ms.items()}
            bad = ~np.isfinite(ms["loss"]) | (ms["finite"] < 1)
            if bad.any():
                e = int(np.argwhere(bad.any(0))[0, 0])  # the first bad epoch, then its repeat
                r = int(np.argwhere(bad[:, e])[0, 0])
                last_good = mngr.latest_step() if mngr is not None else None
                where = (f"the last good checkpoint (epoch {last_good}) is kept in {mngr.directory}"
                         if last_good is not None else "no checkpoint was written"
                         if mngr is not None else "no workdir was given, so nothing was saved")
                raise EvaluationDiverged(
                    f"{desc}: the training diverged (NaN/Inf loss or parameters) at repeat {r}, "
                    f"epoch {epoch + e} (of 0..{protocol.epochs}); stopping. {where}. Lower the "
                    "learning rate or check the synthetic set / feature bank for extreme values.")
            for k_ in METRIC_KEYS:
                history[k_][:, epoch : epoch + n_run] = ms[k_]
            epoch += n_run
            if bar is not None:
                bar.set_postfix(loss=f"{float(ms['loss'][:, -1].mean()):.4f}")
                bar.update(n_run)
            if mngr is not None and (epoch % ckpt_every == 0 or epoch == num_epochs):
                np.savez(Path(workdir) / "checkpoints" / f"history_{epoch}.npz", **history)
                mngr.save(epoch, _to_dict(states), {**meta, "epoch": epoch})
                for old in (Path(workdir) / "checkpoints").glob("history_*.npz"):
                    step_ = int(old.stem.split("_")[1])
                    if step_ not in mngr.all_steps():
                        old.unlink(missing_ok=True)
    finally:
        if bar is not None:
            bar.close()
        if mngr is not None:
            mngr.close()
    train_seconds = time.perf_counter() - t0
    accs = test_accuracy(net, states, test_images, test_labels, protocol.test_batch_size)
    out = {
        "accs": accs,
        "mean": float(np.mean(accs)),
        "std": float(np.std(accs)),
        "train_loss": history["loss"],
        "train_acc": history["acc"],
        "history": history,
        "seconds": train_seconds,
        "strategy": strategy,
        "resumed_from": resumed_from,
        "chunk_epochs": k,
        "engine": engine,
    }
    if return_states:
        out["states"] = states
    return out
