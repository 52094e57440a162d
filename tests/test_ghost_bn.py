"""Ghost BatchNorm (``bn_chunks``) against PyTorch ``nn.DataParallel`` on ``bn_chunks`` GPUs.

DataParallel cannot run without GPUs, so the torch side is its computation written out
(``torch/nn/parallel``): the batch is cut with ``tensor.chunk(n_devices)`` (its scatter), every
replica runs the module on its chunk with the SAME parameters (gradients flow back to them
and sum) and its own copy of the buffers, except replica 0, whose buffers are the module's
own (``broadcast_coalesced`` returns the source tensors for the source device), so the
running statistics after the step are those replica 0 wrote. Outputs are gathered in order.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elf_jax.models import get_model
from elf_jax.models import layers as L
from elf_jax.train.protocol import TrainProtocol
from elf_jax.train.step import init_state, train_step

torch = pytest.importorskip("torch")

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from torch_reference_nets import get_reference_network  # noqa: E402

pytestmark = pytest.mark.numerics  # rounding-sensitive: make test-avx2 reruns it


def dataparallel_forward(module, x, devices):
    """What ``nn.DataParallel(module, device_ids=range(devices))(x)`` computes on GPUs."""
    chunks = x.chunk(devices)
    params = dict(module.named_parameters())
    outs = [module(chunks[0])]  # replica 0: the module's own buffers, updated in place
    for chunk in chunks[1:]:  # the other replicas: copies of the buffers, then dropped
        buffers = {k: b.clone() for k, b in module.named_buffers()}
        outs.append(torch.func.functional_call(module, {**params, **buffers}, (chunk,)))
    return torch.cat(outs)


def _nhwc(t):
    return np.ascontiguousarray(t.detach().numpy().transpose(0, 2, 3, 1))


@pytest.mark.parametrize("n,k", [(12, 4), (6, 4), (5, 4), (4, 1), (2, 4), (1, 3), (256, 4)])
def test_chunk_sizes_are_torch_chunk(n, k):
    want = [len(c) for c in torch.arange(n).chunk(k)]
    assert L.bn_chunk_sizes(n, k) == want


def test_chunk_sizes_reject_bad_counts():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="bn_chunks must be an int >= 1"):
            L.bn_chunk_sizes(8, bad)
    with pytest.raises(ValueError, match="bn_chunks"):
        get_model("ResNet18BN", 10, bn_chunks=0)


@pytest.mark.parametrize("n", [12, 10, 6])  # even chunks, a short last chunk, 3 of 4 replicas
def test_batchnorm_layer_matches_dataparallel(n):
    x = np.random.default_rng(0).standard_normal((n, 5, 6, 8)).astype(np.float32) * 2 + 1
    bn = torch.nn.BatchNorm2d(8).train()
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    variables = {"params": {"scale": jnp.asarray(bn.weight.detach().numpy()),
                            "bias": jnp.asarray(bn.bias.detach().numpy())},
                 "batch_stats": {"mean": jnp.asarray(bn.running_mean.numpy()),
                                 "var": jnp.asarray(bn.running_var.numpy())}}
    want = _nhwc(dataparallel_forward(bn, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), 4))
    out, st = L.BatchNorm(chunks=4).apply(variables, jnp.asarray(x), True, mutable=["batch_stats"])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(st["batch_stats"]["mean"], bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st["batch_stats"]["var"], bn.running_var.numpy(), rtol=1e-5, atol=1e-6)
    whole = L.BatchNorm().apply(variables, jnp.asarray(x), True, mutable=["batch_stats"])[0]
    assert np.abs(np.asarray(whole) - want).max() > 1e-2  # chunking changes the numbers
    # eval mode: the running averages, chunks or not
    ev = L.BatchNorm(chunks=4).apply(variables, jnp.asarray(x), False)
    np.testing.assert_allclose(ev, L.BatchNorm().apply(variables, jnp.asarray(x), False))


def _torch_sgd_step(net, x, y, devices):
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    logits = dataparallel_forward(net, x, devices)
    loss = torch.nn.functional.cross_entropy(logits, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


_jitted_step = jax.jit(train_step, static_argnames=("net", "protocol", "axis_name"))


def _jit_step(state, batch, net, protocol):
    return _jitted_step(state, batch, jax.random.PRNGKey(2), net=net, protocol=protocol)


def test_convnetbn_sgd_step_matches_dataparallel():
    """ConvNetBN width 32 (3 BN layers), one SGD step through the training engine's step, batch 10 in
    4 chunks (3, 3, 3, 1): loss, every parameter and running statistic to 1e-5."""
    from elf_jax.interop import torch as ti

    torch.manual_seed(0)
    net = get_reference_network("ConvNetW32BN", 3, 10, (32, 32)).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (10,), generator=g)
    start = ti.from_torch_state_dict("ConvNetBN", net.state_dict(), 10, (32, 32, 3), width=32)
    torch_loss = _torch_sgd_step(net, x, y, 4)
    want = ti.from_torch_state_dict("ConvNetBN", net.state_dict(), 10, (32, 32, 3), width=32)

    protocol = TrainProtocol(lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=10, epochs=1,
                             dsa_strategy="none", mode="task")
    batch = {"images": jnp.asarray(_nhwc(x)), "labels": jnp.asarray(y.numpy())}

    def step(chunks):
        model = get_model("ConvNetBN", 10, width=32, bn_chunks=chunks)
        st = init_state(model, protocol, jax.random.PRNGKey(0), jax.random.PRNGKey(1),
                        batch["images"][:1])
        st = st._replace(params=start["params"], batch_stats=start["batch_stats"])
        return _jit_step(st, batch, model, protocol)

    got, metrics = step(4)
    np.testing.assert_allclose(float(metrics["loss"]), torch_loss, rtol=1e-5)
    for col in ("params", "batch_stats"):
        flat_got = jax.tree_util.tree_leaves_with_path(getattr(got, col))
        flat_want = dict(jax.tree_util.tree_leaves_with_path(want[col]))
        for path, leaf in flat_got:
            np.testing.assert_allclose(leaf, flat_want[path], rtol=1e-5, atol=1e-5,
                                       err_msg=jax.tree_util.keystr(path))
    whole, _ = step(1)  # the whole-batch statistics give other numbers
    diff = max(float(jnp.abs(a - b).max()) for a, b in
               zip(jax.tree.leaves(whole.batch_stats), jax.tree.leaves(got.batch_stats)))
    assert diff > 1e-3


def _dp_step(net, batch, protocol, start, devices):
    """``train_step`` data parallel over a vmapped ``data`` axis of ``devices`` 'devices'."""
    def local(images, labels):
        return train_step(start, {"images": images, "labels": labels}, jax.random.PRNGKey(2),
                          net=net, protocol=protocol, axis_name="data")

    split = {k: v.reshape((devices, -1) + v.shape[1:]) for k, v in batch.items()}
    return jax.jit(jax.vmap(local, axis_name="data"))(split["images"], split["labels"])


def test_bn_chunks_under_data_parallel_step():
    """Chunks are those of each device's LOCAL batch: with per-device BN (sync_bn off) 2
    devices x 2 chunks train the parameters exactly as 4 chunks of the global batch on one
    device; the running statistics are the devices' average of their first chunks' (the step
    averages BN statistics over ``data``). Sync BN with chunks is refused."""
    protocol = TrainProtocol(batch_size=16, epochs=1, dsa_strategy="none", mode="task")
    rng = np.random.default_rng(0)
    batch = {"images": jnp.asarray(rng.standard_normal((16, 8, 8, 3)), jnp.float32),
             "labels": jnp.asarray(rng.integers(0, 3, 16))}
    kw = dict(depth=1, width=8)
    one = get_model("ConvNetBN", 3, bn_chunks=4, **kw)
    start = init_state(one, protocol, jax.random.PRNGKey(0), jax.random.PRNGKey(1),
                       batch["images"][:1])
    want, _ = _jit_step(start, batch, one, protocol)
    got, _ = _dp_step(get_model("ConvNetBN", 3, bn_chunks=2, **kw), batch, protocol, start, 2)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
        np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a[1], b, rtol=1e-5, atol=1e-6)
    # running statistics: mean over the devices of each device's first-chunk update
    two = get_model("ConvNetBN", 3, bn_chunks=2, **kw)
    per_device = [_jit_step(start, {k: v[8 * d: 8 * d + 8] for k, v in batch.items()}, two,
                            protocol)[0].batch_stats for d in (0, 1)]
    for a, b, c in zip(jax.tree.leaves(got.batch_stats), *map(jax.tree.leaves, per_device)):
        np.testing.assert_allclose(a[0], (b + c) / 2, rtol=1e-5, atol=1e-6)
    sync = get_model("ConvNetBN", 3, bn_chunks=2, bn_axis_name="data", **kw)
    with pytest.raises(ValueError, match="bn_chunks=2 .* cannot be combined with sync BN"):
        _dp_step(sync, batch, protocol, start, 2)


def test_bn_chunks_reaches_every_bn_model():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 32, 32, 3)), jnp.float32)
    for name in ("ConvNetBN", "AlexNetBN", "VGG11BN", "ResNet18BN"):
        net = get_model(name, 10, bn_chunks=3)
        shapes = jax.eval_shape(lambda v: net.apply(v, x, train=True, mutable=["batch_stats"]),
                                jax.eval_shape(net.init, jax.random.key(0), x))
        assert shapes[0].shape == (6, 10), name
        assert {m.chunks for m in _bn_modules(net, x)} == {3}, name
    for name in ("MLP", "LeNet", "ViT"):  # no BatchNorm: accepted, nothing to chunk
        get_model(name, 10, bn_chunks=4)


def _bn_modules(net, x):
    """The BatchNorm modules a forward pass binds."""
    found = []

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, L.BatchNorm):
            found.append(context.module)
        return next_fun(*args, **kwargs)

    with __import__("flax").linen.intercept_methods(interceptor):
        jax.eval_shape(net.init, jax.random.key(0), x)
    assert found
    return found
