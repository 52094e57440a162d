"""Model zoo: registry, parameter parity, splits, norms, init, errors.

Kept fast on a busy 2-core CPU: shapes and counts use ``jax.eval_shape``; the forward
checks fill parameters with numpy (no per-shape RNG compiles) and run op by op on tiny
batches.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from elf_jax.models import (
    canonical_name, count_params, front_shape, get_model, init_shapes, list_models,
    model_info,
)

pytestmark = pytest.mark.numerics  # rounding-sensitive: make test-avx2 reruns it

REQUIRED = (
    ["MLP", "LeNet", "ConvNet"]
    + [f"ConvNetW{w}" for w in (32, 64, 128, 256, 512, 1024)]
    + [f"ConvNetD{d}" for d in range(1, 9)]
    + ["ConvNetBN", "ConvNetLN", "ConvNetGN", "ConvNetNN", "ConvNetAP", "ConvNetMP",
       "ConvNetNP", "AlexNet", "AlexNetBN", "VGG11", "VGG11BN", "ResNet18", "ResNet18BN",
       "ResNet18_AP", "ResNet18BN_AP", "ConvNetD4", "ConvNetD4W256", "ConvNetD4W512",
       "ResNet18ImageNet", "ResNet18BNImageNet", "VGG11ImageNet", "VGG11BNImageNet",
       "ConvNet_L3", "ConvNetW512_L3", "VGG11_L5", "VGG11BN_L5", "ResNet18_Layered",
       "ResNet18BN_Layered", "ResNet18ImageNet_L4", "VGG11ImageNet_L6", "ConvNetD4_L4", "ViT"]
)

# the reference models' parameter counts: (name, classes, input HWC, count)
COUNTS = [
    ("MLP", 10, (32, 32, 3), 411_146),
    ("LeNet", 10, (32, 32, 3), 62_006),
    ("ConvNet", 10, (32, 32, 3), 320_010),
    ("ConvNet", 10, (28, 28, 1), 317_706),
    ("ConvNet", 100, (32, 32, 3), 504_420),
    ("ConvNetW512", 10, (32, 32, 3), 4_818_954),
    ("AlexNet", 10, (32, 32, 3), 1_872_202),
    ("VGG11", 10, (32, 32, 3), 9_231_114),
    ("ResNet18", 10, (32, 32, 3), 11_173_962),
    ("ResNet18", 100, (32, 32, 3), 11_220_132),
    ("ResNet18_AP", 10, (32, 32, 3), 11_250_762),
    ("ConvNetD4", 10, (32, 32, 3), 452_490),
    ("ConvNetD4", 200, (64, 64, 3), 857_160),
    ("ResNet18ImageNet", 200, (64, 64, 3), 11_279_112),
    ("VGG11ImageNet", 200, (64, 64, 3), 35_219_400),
    ("ConvNetD4W512", 200, (64, 64, 3), 8_736_456),
    ("ConvNetD4W256", 200, (64, 64, 3), 2_598_856),
]

# docs/METHOD.md "Where each network is cut": (name, input HWC, front output HWC)
SPLITS = [
    ("ResNet18", (32, 32, 3), (4, 4, 512)),
    ("ResNet18BN", (32, 32, 3), (4, 4, 512)),
    ("ResNet18_Layered", (32, 32, 3), (4, 4, 512)),
    ("VGG11", (32, 32, 3), (4, 4, 512)),
    ("VGG11BN_L5", (32, 32, 3), (4, 4, 512)),
    ("ConvNet", (32, 32, 3), (4, 4, 128)),
    ("ConvNetBN", (32, 32, 3), (4, 4, 128)),
    ("ConvNetW512_L3", (32, 32, 3), (4, 4, 512)),
    ("ConvNet", (28, 28, 1), (4, 4, 128)),
    ("ResNet18ImageNet_L4", (64, 64, 3), (4, 4, 256)),
    ("VGG11ImageNet_L6", (64, 64, 3), (4, 4, 512)),
    ("ConvNetD4_L4", (64, 64, 3), (4, 4, 128)),
    ("ConvNetD4W256", (64, 64, 3), (4, 4, 256)),
    ("ViT", (32, 32, 3), (8, 8, 128)),
    ("ViT", (28, 28, 1), (7, 7, 128)),
    ("AlexNet", (32, 32, 3), (4, 4, 192)),
    ("AlexNetBN", (28, 28, 1), (4, 4, 192)),
    ("LeNet", (32, 32, 3), (5, 5, 16)),
    ("LeNet", (28, 28, 1), (5, 5, 16)),
    ("MLP", (28, 28, 1), (1, 1, 128)),
]


def fake_variables(net, x, seed=0):
    """Variables with init's tree structure, filled by numpy (fast, torch-like scale)."""
    shapes = init_shapes(net, x.shape[1:], batch=x.shape[0])
    rng = np.random.default_rng(seed)

    def fill(path, s):
        key = path[-1].key
        if key == "var":
            return jnp.ones(s.shape, s.dtype)
        if key == "mean" and path[0].key == "batch_stats":
            return jnp.zeros(s.shape, s.dtype)
        if key == "scale":
            return jnp.asarray(1 + 0.1 * rng.standard_normal(s.shape), s.dtype)
        fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 10
        bound = 1 / np.sqrt(fan_in)
        return jnp.asarray(rng.uniform(-bound, bound, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def rand_images(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# ----------------------------------------------------------------------------- registry


def test_required_names_registered():
    names = set(list_models())
    missing = [n for n in REQUIRED if n not in names]
    assert not missing
    assert "VGG11_L5" not in list_models(include_aliases=False)


@pytest.mark.parametrize("alias,target", [
    ("ConvNet_L3", "ConvNet"), ("ConvNetW512_L3", "ConvNetW512"), ("VGG11_L5", "VGG11"),
    ("VGG11BN_L5", "VGG11BN"), ("ResNet18_Layered", "ResNet18"),
    ("ResNet18BN_Layered", "ResNet18BN"), ("ResNet18ImageNet_L4", "ResNet18ImageNet"),
    ("VGG11ImageNet_L6", "VGG11ImageNet"), ("ConvNetD4_L4", "ConvNetD4"),
])
def test_split_aliases_are_the_same_network(alias, target):
    assert canonical_name(alias) == target
    assert get_model(alias, 10) == get_model(target, 10)


@pytest.mark.parametrize("name", list_models())
def test_every_name_inits_and_forwards_shapes(name):
    info = model_info(name)
    net = get_model(name, 7)
    hwc = info["input_shape"]
    x = jax.ShapeDtypeStruct((2,) + hwc, jnp.float32)

    def run(k, x):
        v = net.init(k, x)
        out = net.apply(v, x)
        if net.has_split:
            f = net.apply(v, x, method=net.front)
            return out, f, net.apply(v, f, method=net.rear)
        return out, None, None

    out, f, out2 = jax.eval_shape(run, jax.random.key(0), x)
    assert out.shape == (2, 7)
    assert info["has_split"] == net.has_split
    if net.has_split:
        assert len(f.shape) == 4 and f.shape[0] == 2
        assert out2.shape == (2, 7)


@pytest.mark.parametrize("name,k,hwc,expected", COUNTS)
def test_parameter_counts_match_reference(name, k, hwc, expected):
    assert count_params(init_shapes(get_model(name, k), hwc)) == expected


@pytest.mark.parametrize("name,hwc,feat", SPLITS)
def test_front_output_shapes(name, hwc, feat):
    assert front_shape(get_model(name, 10), hwc, batch=2) == (2,) + feat


# ----------------------------------------------------------------------------- forward


FORWARD = [
    ("ConvNet", (28, 28, 1)), ("ConvNetBN", (32, 32, 3)), ("ConvNetLN", (32, 32, 3)),
    ("ConvNetGN", (32, 32, 3)), ("ConvNetMP", (32, 32, 3)), ("ConvNetNN", (16, 16, 3)),
    ("AlexNetBN", (28, 28, 1)), ("MLP", (28, 28, 1)), ("LeNet", (28, 28, 1)),
    ("LeNet", (32, 32, 3)), ("VGG11BN", (32, 32, 3)), ("VGG11", (28, 28, 1)),
    ("ResNet18", (32, 32, 3)), ("ResNet18BN_AP", (32, 32, 3)), ("ViT", (32, 32, 3)),
]


@pytest.mark.parametrize("name,hwc", FORWARD)
def test_forward_and_exact_front_rear_composition(name, hwc):
    net = get_model(name, 5)
    x = rand_images((2,) + hwc)
    v = fake_variables(net, x)
    out = net.apply(v, x)
    assert out.shape == (2, 5) and bool(jnp.all(jnp.isfinite(out)))
    if net.has_split:
        f = net.apply(v, x, method=net.front)
        np.testing.assert_array_equal(np.asarray(net.apply(v, f, method=net.rear)),
                                      np.asarray(out))
        # eval mode is per-sample: no dependence on the rest of the batch (loose: TF32 on GPU)
        np.testing.assert_allclose(net.apply(v, x[:1]), out[:1], rtol=2e-3, atol=2e-3)


def test_torch_and_flax_init_schemes():
    from elf_jax.models import layers as L

    key = jax.random.key(0)
    # a whole (small) network through the real init, then a forward pass
    net = get_model("ConvNetD2", 10)
    x = rand_images((2, 4, 4, 3))
    v = net.init(key, x)
    assert set(v) == {"params"}
    p = v["params"]
    np.testing.assert_allclose(p["block1"]["norm"]["scale"], 1.0)
    np.testing.assert_allclose(p["block1"]["norm"]["bias"], 0.0)
    bound = 1 / np.sqrt(3 * 3 * 128)
    k, b = np.asarray(p["block2"]["conv"]["kernel"]), np.asarray(p["block2"]["conv"]["bias"])
    assert k.shape == (3, 3, 128, 128)
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.95 * bound
    assert abs(k.std() - bound / np.sqrt(3)) < 0.02 * bound  # uniform std
    assert np.abs(b).max() <= bound and np.abs(b).max() > 0.5 * bound
    kd = np.asarray(p["classifier"]["kernel"])
    assert kd.shape == (128, 10) and np.abs(kd).max() <= 1 / np.sqrt(128)
    assert np.abs(np.asarray(p["classifier"]["bias"])).max() <= 1 / np.sqrt(128)
    assert net.apply(v, x).shape == (2, 10)
    flax_dense = L.Dense(10, init_mode="flax").init(key, jnp.zeros((1, 64)))["params"]
    np.testing.assert_array_equal(flax_dense["bias"], 0.0)
    assert count_params(init_shapes(get_model("ConvNet", 10, init="flax"), (32, 32, 3))) \
        == 320_010


def test_bfloat16_compute_keeps_float32_params():
    net = get_model("ConvNetBN", 10, dtype="bfloat16", depth=2, width=16)
    x = rand_images((4, 32, 32, 3))
    v = fake_variables(net, x)
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(v))
    out, upd = net.apply(v, x, train=True, mutable=["batch_stats"])
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(upd))
    ref = get_model("ConvNetBN", 10, depth=2, width=16).apply(v, x, train=True,
                                                               mutable=["batch_stats"])[0]
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.1, rtol=0.1)


def test_capture_intermediates_names():
    net = get_model("ConvNet", 10)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)

    def run(k, x, net):
        v = net.init(k, x)
        return net.apply(v, x, capture_intermediates=True, mutable=["intermediates"])[1]

    inter = jax.eval_shape(lambda k, x: run(k, x, net), jax.random.key(0), x)["intermediates"]
    for n in ("block1", "block2", "block3", "pre_logits"):
        assert n in inter
    assert inter["block3"]["__call__"][0].shape == (1, 4, 4, 128)
    assert inter["pre_logits"]["__call__"][0].shape == (1, 2048)

    net = get_model("ResNet18", 10)
    inter = jax.eval_shape(lambda k, x: run(k, x, net), jax.random.key(0), x)["intermediates"]
    for n in ("stem", "stage1", "stage2", "stage3", "stage4", "pre_logits"):
        assert n in inter
    assert inter["stage3"]["__call__"][0].shape == (1, 8, 8, 256)
    assert inter["stage4"]["__call__"][-1].shape == (1, 4, 4, 512)
    assert inter["stage4"]["block1"]["__call__"][0].shape == (1, 4, 4, 512)
    assert inter["pre_logits"]["__call__"][0].shape == (1, 512)


def test_parameter_tree_names():
    p = init_shapes(get_model("ResNet18BN", 10), (32, 32, 3))
    blk = p["params"]["stage2"]["block1"]
    assert set(blk) == {"conv1", "norm1", "conv2", "norm2", "shortcut_conv", "shortcut_norm"}
    assert set(p["params"]["stem"]) == {"conv", "norm"}
    assert "classifier" in p["params"]
    assert set(p["batch_stats"]["stem"]["norm"]) == {"mean", "var"}
    assert "shortcut_conv" not in p["params"]["stage1"]["block1"]
    p = init_shapes(get_model("VGG11ImageNet", 200), (64, 64, 3))["params"]
    assert [f"block{i}" in p for i in range(1, 9)] == [True] * 8
    assert set(p["classifier"]) == {"fc1", "fc2", "fc3"}


# ----------------------------------------------------------------------------- batchnorm


def test_batchnorm_train_uses_batch_stats_and_updates_running_like_torch():
    net = get_model("ConvNetBN", 3, depth=1, width=8)
    x = rand_images((4, 8, 8, 3))
    v = fake_variables(net, x)
    (out, state) = net.apply(v, x, train=True, mutable=["batch_stats", "intermediates"],
                             capture_intermediates=True)
    conv = np.asarray(state["intermediates"]["block1"]["conv"]["__call__"][0], np.float64)
    n = conv.shape[0] * conv.shape[1] * conv.shape[2]
    bm = conv.mean(axis=(0, 1, 2))
    bv = conv.var(axis=(0, 1, 2)) * n / (n - 1)
    st = state["batch_stats"]["block1"]["norm"]
    np.testing.assert_allclose(st["mean"], 0.1 * bm, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(st["var"], 0.9 + 0.1 * bv, rtol=1e-4, atol=1e-6)
    # train mode depends on the batch; eval mode uses the running averages
    out1 = net.apply(v, x[:2], train=True, mutable=["batch_stats"])[0]
    assert not np.allclose(out1, out[:2], atol=1e-4)
    ev = net.apply(v, x)
    np.testing.assert_allclose(net.apply(v, x[:2]), ev[:2], rtol=1e-5, atol=1e-6)
    assert not np.allclose(ev, out, atol=1e-4)
    v2 = {"params": v["params"], "batch_stats": state["batch_stats"]}
    assert not np.allclose(net.apply(v2, x), ev, atol=1e-4)
    with pytest.raises(Exception):
        net.apply(v, x, train=True)  # batch_stats must be mutable in training


def test_sync_batchnorm_over_named_axis_equals_full_batch():
    net = get_model("ConvNetBN", 3, depth=1, width=8, bn_axis_name="batch")
    x = rand_images((4, 8, 8, 3))
    v = fake_variables(net, x)
    local = get_model("ConvNetBN", 3, depth=1, width=8)
    full, st_full = local.apply(v, x, train=True, mutable=["batch_stats"])

    def shard(xs):
        return net.apply(v, xs, train=True, mutable=["batch_stats"])

    out, st = jax.vmap(shard, axis_name="batch")(x.reshape(2, 2, 8, 8, 3))
    np.testing.assert_allclose(out.reshape(4, 3), full, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(st), jax.tree_util.tree_leaves(st_full)):
        np.testing.assert_allclose(a[0], b, rtol=1e-4, atol=1e-6)


def test_norms_match_torch():
    torch = pytest.importorskip("torch")
    from elf_jax.models import layers as L

    x = np.random.default_rng(0).standard_normal((3, 5, 6, 8)).astype(np.float32) * 2 + 1
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

    def ours(mod, train=False, mutable=False):
        v = mod.init(jax.random.key(0), jnp.asarray(x))
        if mutable:
            return mod.apply(v, jnp.asarray(x), train, mutable=["batch_stats"])
        return np.asarray(mod.apply(v, jnp.asarray(x), train))

    def nchw(t):
        return t.detach().numpy().transpose(0, 2, 3, 1)

    np.testing.assert_allclose(ours(L.GroupNorm()), nchw(torch.nn.GroupNorm(8, 8)(xt)),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours(L.GroupNorm(groups=4)),
                               nchw(torch.nn.GroupNorm(4, 8)(xt)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours(L.LayerNormCHW()),
                               nchw(torch.nn.LayerNorm([8, 5, 6])(xt)), rtol=1e-4, atol=1e-5)
    bn = torch.nn.BatchNorm2d(8).train()
    ref = nchw(bn(xt))
    out, st = ours(L.BatchNorm(), train=True, mutable=True)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(st["batch_stats"]["mean"], bn.running_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(st["batch_stats"]["var"], bn.running_var.numpy(), rtol=1e-5)


# ----------------------------------------------------------------------------- errors


def test_unknown_name_lists_nearest():
    with pytest.raises(ValueError, match="ConvNetW512"):
        get_model("ConvNetW500", 10)
    with pytest.raises(ValueError, match="ResNet18"):
        get_model("resnet18", 10)


def test_bad_overrides_and_classes():
    with pytest.raises(ValueError, match="width"):
        get_model("ResNet18", 10, width=64)
    with pytest.raises(ValueError, match="init"):
        get_model("ConvNet", 10, init="xavier")
    with pytest.raises(ValueError, match="num_classes"):
        get_model("ConvNet", 0)
    with pytest.raises(ValueError, match="norm"):
        init_shapes(get_model("ConvNet", 10, norm="weird"), (32, 32, 3))


def test_every_registry_model_declares_a_split():
    # ELF needs front/rear on every evaluation net (adapters handle the shapes)
    assert all(model_info(n)["has_split"] for n in list_models())


def test_bad_input_rank_layout_and_channels():
    net = get_model("ConvNet", 10, depth=1, width=8)
    with pytest.raises(ValueError, match="4-D NHWC"):
        net.init(jax.random.key(0), jnp.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match="NCHW"):
        net.init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)))
    x = rand_images((1, 32, 32, 3))
    v = fake_variables(net, x)
    with pytest.raises(ValueError, match="1 channels but the layer expects 3"):
        net.apply(v, rand_images((1, 32, 32, 1)))
    with pytest.raises(ValueError, match="features but the layer expects"):
        net.apply(v, rand_images((1, 16, 16, 3)))
    with pytest.raises(ValueError, match="4-D"):
        net.apply(v, jnp.zeros((1, 2048)), method=net.rear)


def test_vgg_imagenet_dropout_needs_rng_in_training():
    net = get_model("VGG11ImageNet", 4)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    v = init_shapes(net, (64, 64, 3))
    out = jax.eval_shape(lambda v, x, k: net.apply(v, x, train=True, rngs={"dropout": k}),
                         v, x, jax.random.key(1))
    assert out.shape == (1, 4)
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(lambda v, x: net.apply(v, x, train=True), v, x)
