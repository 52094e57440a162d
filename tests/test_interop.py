"""PyTorch interop: state_dicts, flat parameter vectors, expert buffers, synthetic sets.

The PyTorch side is ``tests/torch_reference_nets.py``, a re-implementation of the reference
``networks.py`` classes (same module names, Sequential indices and registration order).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from elf_jax.interop import torch as ti  # noqa: E402
from elf_jax.models import get_model  # noqa: E402

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from torch_reference_nets import REFERENCE_NAMES, get_reference_network  # noqa: E402

pytestmark = pytest.mark.torch


def _ref_net(name, c, k, s, seed=0):
    """Reference torch net in eval mode with non-trivial norm parameters/statistics."""
    torch.manual_seed(seed)
    net = get_reference_network(name, c, k, (s, s))
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
            if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
    return net.eval()


def _nhwc(x):
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


# (name, channels, classes, size): every family the issues ask for
CASES = [
    ("ConvNet", 3, 10, 32),
    ("ConvNetBN", 3, 10, 32),
    ("ConvNet", 1, 10, 28),
    ("AlexNetBN", 3, 10, 32),
    ("VGG11BN", 3, 10, 32),
    ("ResNet18BN", 3, 10, 32),
    ("ResNet18_AP", 3, 10, 32),
    ("ResNet18ImageNet_L4", 3, 20, 64),  # 64x64 variant, split-class key names
]


@pytest.mark.parametrize("name,c,k,s", CASES, ids=[f"{n}-{s}x{s}x{c}" for n, c, k, s in CASES])
def test_from_torch_matches_logits_round_trip_and_flat_order(name, c, k, s):
    net = _ref_net(name, c, k, s)
    sd = net.state_dict()
    x = torch.randn(3, c, s, s, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = net(x).numpy()

    variables = ti.from_torch_state_dict(name, sd, k, (s, s, c))
    model = get_model(name, k)
    got = model.apply(variables, _nhwc(x), train=False)
    assert got.shape == want.shape
    assert _rel_err(got, want) < 1e-4

    # round trip: identical tensors, same keys in the same order
    back = ti.to_torch_state_dict(name, variables, k, (s, s, c))
    assert list(back) == list(sd)
    for key in sd:
        assert back[key].dtype == sd[key].dtype, key
        assert torch.equal(back[key], sd[key]), key

    # flat vector = torch.cat of net.parameters(), in that order
    flat_torch = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).numpy()
    flat = ti.variables_to_flat_params(name, variables, k, (s, s, c))
    np.testing.assert_array_equal(np.asarray(flat), flat_torch)
    shapes = ti.flat_param_shapes(name, k, (s, s, c))
    assert [tuple(p.shape) for p in net.parameters()] == [sh for _, sh in shapes]
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in shapes]


@pytest.mark.parametrize("name", REFERENCE_NAMES)
def test_reference_layout_matches_torch_nets(name):
    """Key names, shapes and parameters() order for every reference name (no JAX)."""
    s, k = (64, 20) if ("ImageNet" in name or "D4" in name) else (32, 10)
    net = get_reference_network(name, 3, k, (s, s))
    sd = net.state_dict()
    assert ti.reference_state_dict_keys(name, k, (s, s, 3)) == list(sd)
    spec = ti._spec(name, k, (s, s, 3))
    assert spec.torch_shapes() == {key: tuple(v.shape) for key, v in sd.items()}
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in spec.param_list()]


def test_split_alias_accepts_both_key_schemes():
    plain = _ref_net("ConvNet", 3, 10, 32)
    split = get_reference_network("ConvNet_L3", 3, 10, (32, 32))
    # same architecture, layer1.* instead of features.*
    split.load_state_dict({k.replace("features.", "layer1."): v
                           for k, v in plain.state_dict().items()})
    v_plain = ti.from_torch_state_dict("ConvNet", plain.state_dict(), 10, (32, 32, 3))
    v_split = ti.from_torch_state_dict("ConvNet_L3", split.state_dict(), 10, (32, 32, 3))
    v_cross = ti.from_torch_state_dict("ConvNet", split.state_dict(), 10, (32, 32, 3))
    for a, b in [(v_plain, v_split), (v_plain, v_cross)]:
        jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    assert list(ti.to_torch_state_dict("ConvNet_L3", v_plain, 10, (32, 32, 3)))[0] == \
        "layer1.0.weight"
    assert list(ti.to_torch_state_dict("ConvNet", v_plain, 10, (32, 32, 3)))[0] == \
        "features.0.weight"
    # ResNet18BN_Layered keys (layer2..4, layer5_befor/after) <-> plain ResNet18BN keys
    layered = _ref_net("ResNet18BN_Layered", 3, 10, 32).state_dict()
    v = ti.from_torch_state_dict("ResNet18BN_Layered", layered, 10, (32, 32, 3))
    back = ti.to_torch_state_dict("ResNet18BN_Layered", v, 10, (32, 32, 3))
    assert list(back) == list(layered)
    assert all(torch.equal(back[key], layered[key]) for key in layered)
    plain = ti.to_torch_state_dict("ResNet18BN", v, 10, (32, 32, 3), as_numpy=True)
    np.testing.assert_array_equal(plain["layer4.0.shortcut.1.running_var"],
                                  layered["layer5_befor.0.shortcut.1.running_var"].numpy())
    np.testing.assert_array_equal(plain["layer1.1.conv2.weight"],
                                  layered["layer2.1.conv2.weight"].numpy())


def test_state_dict_errors_name_the_problem():
    net = _ref_net("ConvNet", 3, 10, 32)
    sd = dict(net.state_dict())

    missing = {k: v for k, v in sd.items() if k != "classifier.bias"}
    with pytest.raises(ValueError, match=r"Missing keys.*classifier\.bias"):
        ti.from_torch_state_dict("ConvNet", missing, 10, (32, 32, 3))

    extra = dict(sd, **{"features.99.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"Unexpected keys.*features\.99\.weight"):
        ti.from_torch_state_dict("ConvNet", extra, 10, (32, 32, 3))

    with pytest.raises(ValueError, match=r"classifier\.weight: state_dict \(10, 2048\), "
                                         r"expected \(100, 2048\)"):
        ti.from_torch_state_dict("ConvNet", sd, 100, (32, 32, 3))

    resnet_sd = get_reference_network("ResNet18", 3, 10).state_dict()
    with pytest.raises(ValueError, match="another architecture"):
        ti.from_torch_state_dict("ConvNet", resnet_sd, 10, (32, 32, 3))

    with pytest.raises(ValueError, match="no PyTorch reference layout"):
        ti.from_torch_state_dict("ResNet99", sd, 10, (32, 32, 3))

    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        ti.from_torch_state_dict("ConvNet", sd, 10, (3, 32, 32))

    # DataParallel checkpoints ("module." prefix) and numpy values are accepted
    dp = {f"module.{k}": v.numpy() for k, v in sd.items()}
    v = ti.from_torch_state_dict("ConvNet", dp, 10, (32, 32, 3))
    assert v["params"]["classifier"]["kernel"].shape == (2048, 10)

    with pytest.raises(ValueError, match=r"Missing.*block1/conv/kernel"):
        bad = {"params": {k: w for k, w in v["params"].items() if k != "block1"}}
        ti.to_torch_state_dict("ConvNet", bad, 10, (32, 32, 3))


def test_flat_vector_list_and_jit():
    name, shape = "ConvNetBN", (32, 32, 3)
    net = _ref_net(name, 3, 10, 32)
    params = list(net.parameters())
    vec = torch.cat([p.detach().reshape(-1) for p in params])
    stats = ti.from_torch_state_dict(name, net.state_dict(), 10, shape)["batch_stats"]
    from_list = ti.flat_params_to_variables(name, params, 10, shape, batch_stats=stats)
    from_vec = ti.flat_params_to_variables(name, vec, 10, shape, batch_stats=stats)
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_list, from_vec)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = net(x).numpy()
    got = get_model(name, 10).apply(from_vec, _nhwc(x), train=False)
    assert _rel_err(got, want) < 1e-4

    # traceable: jit over the flat vector and back
    to_vars = jax.jit(lambda v: ti.flat_params_to_variables(name, v, 10, shape,
                                                            params_only=True))
    p = to_vars(jnp.asarray(vec.numpy()))
    back = jax.jit(lambda p: ti.variables_to_flat_params(name, p, 10, shape))(p)
    np.testing.assert_array_equal(np.asarray(back), vec.numpy())
    # default BN statistics when none are given
    v0 = ti.flat_params_to_variables(name, vec, 10, shape)
    np.testing.assert_array_equal(v0["batch_stats"]["block1"]["norm"]["var"], np.ones(128))

    with pytest.raises(ValueError, match="320010 parameters"):
        ti.flat_params_to_variables(name, vec[:-1], 10, shape)
    with pytest.raises(ValueError, match=r"tensor 12 is \(10, 2048\).*\(100, 2048\)"):
        ti.flat_params_to_variables(name, params, 100, shape)


def _save_buffer(path, name, k, shape, n_traj=2, n_epochs=3):
    """A replay buffer in the reference format: list[traj], traj = list[epoch params]."""
    h, w, c = shape
    trajs, nets = [], []
    for t in range(n_traj):
        net = get_reference_network(name, c, k, (h, w))
        torch.manual_seed(10 + t)
        epochs = [[p.detach().cpu().clone() for p in net.parameters()]]
        for _ in range(n_epochs - 1):
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(0.01 * torch.randn_like(p))
            epochs.append([p.detach().cpu().clone() for p in net.parameters()])
        trajs.append(epochs)
        nets.append(net)
    torch.save(trajs, path)
    return trajs


def test_replay_buffer_loads_and_matches_torch_logits(tmp_path):
    name, k, shape = "ConvNetW32", 10, (32, 32, 3)
    path = tmp_path / "replay_buffer_0.pt"
    trajs = _save_buffer(path, name, k, shape)

    loaded = ti.load_replay_buffer(path, name, k, shape)
    assert len(loaded) == 2 and len(loaded[0]) == 3

    # one epoch's parameters, loaded into the torch net, give the same logits
    net = get_reference_network(name, 3, k).eval()
    torch.nn.utils.vector_to_parameters(
        torch.cat([p.reshape(-1) for p in trajs[1][2]]), net.parameters())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = net(x).numpy()
    model = get_model(name, k)
    got = model.apply(loaded[1][2], _nhwc(x), train=False)
    assert _rel_err(got, want) < 1e-4

    stacked = ti.load_replay_buffer(path, name, k, shape, stack=True)
    kern = stacked[1]["params"]["block1"]["conv"]["kernel"]
    assert kern.shape == (3, 3, 3, 3, 32)
    np.testing.assert_array_equal(kern[2], loaded[1][2]["params"]["block1"]["conv"]["kernel"])
    # flat vector of the loaded epoch = the buffer's concatenation (MTT student vector)
    flat = ti.variables_to_flat_params(name, loaded[0][1], k, shape)
    np.testing.assert_array_equal(np.asarray(flat),
                                  torch.cat([p.reshape(-1) for p in trajs[0][1]]).numpy())

    # export (lists of variable dicts, or stacked trees) writes the reference format back
    for src in (loaded, stacked):
        out = ti.export_replay_buffer(tmp_path / "again.pt", name, src, k, shape)
        again = torch.load(out, weights_only=True)
        assert len(again) == 2 and all(len(t) == 3 for t in again)
        for t_old, t_new in zip(trajs, again):
            for e_old, e_new in zip(t_old, t_new):
                assert all(torch.equal(a, b) for a, b in zip(e_old, e_new))
    bare = ti.load_replay_buffer(path, "ConvNetW32", k, shape, params_only=True)
    assert "block1" in bare[0][0]


def test_replay_buffer_for_another_architecture_names_both(tmp_path):
    path = tmp_path / "replay_buffer_0.pt"
    _save_buffer(path, "ConvNetW32", 10, (32, 32, 3), n_traj=1, n_epochs=1)
    with pytest.raises(ValueError, match=r"does not fit ConvNet \(num_classes=10.*"
                                         r"matches: ConvNetW32"):
        # a width-32 buffer read as the default (width 128) ConvNet
        ti.load_replay_buffer(path, "ConvNet", 10, (32, 32, 3))
    with pytest.raises(FileNotFoundError):
        ti.load_replay_buffer(tmp_path / "nope.pt", "ConvNet", 10, (32, 32, 3))


def test_reference_synset_pt_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    ref = tmp_path / "ref"
    ref.mkdir()
    imgs = torch.from_numpy(rng.standard_normal((20, 3, 32, 32)).astype(np.float32))
    labs = torch.arange(10).repeat_interleave(2)  # int64, as the reference saves
    torch.save(imgs.clone().requires_grad_(True), ref / "images_best.pt")
    torch.save(labs, ref / "labels_best.pt")
    torch.save(torch.tensor(0.0123), ref / "lr_best.pt")

    s = ti.load_reference_synset(ref, zca=True)
    assert s.images.shape == (20, 32, 32, 3) and s.images.dtype == np.float32
    np.testing.assert_array_equal(s.images, imgs.numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(s.labels, labs.numpy())
    assert s.labels.dtype == np.int32
    assert s.lr == float(np.float32(0.0123))
    assert s.metadata["zca"] is True and s.num_classes == 10 and s.ipc == 2

    out = tmp_path / "out"
    paths = ti.export_reference_synset(s, out)
    for key, orig in (("images", imgs), ("labels", labs)):
        t = torch.load(paths[key], weights_only=True)
        assert t.dtype == orig.dtype and torch.equal(t, orig)
    assert torch.equal(torch.load(paths["lr"], weights_only=True), torch.tensor(0.0123))
    s2 = ti.load_reference_synset(out, zca=True)
    assert s2.content_hash() == s.content_hash() and s2.lr == s.lr

    # soft labels, no lr file, python-float lr, file-path source
    soft = torch.softmax(torch.randn(20, 10), -1)
    d = ti.load_reference_synset({"images": paths["images"], "labels": paths["labels"]},
                                 as_dict=True)
    assert d["lr"] is None and d["labels"].dtype == np.int32
    paths3 = ti.export_reference_synset(d["images"], tmp_path / "soft", labels=soft.numpy(),
                                        lr=0.5, lr_as_float=True)
    s3 = ti.load_reference_synset(paths3["images"])
    assert s3.soft and s3.lr == 0.5
    np.testing.assert_array_equal(s3.labels, soft.numpy())


def test_reference_synset_bad_input(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    imgs = torch.zeros(4, 3, 8, 8)
    imgs[0, 0, 0, 0] = float("nan")
    torch.save(imgs, bad / "images_best.pt")
    torch.save(torch.zeros(4, dtype=torch.long), bad / "labels_best.pt")
    with pytest.raises(ValueError, match="NaN"):
        ti.load_reference_synset(bad)
    torch.save(torch.tensor(float("nan")), bad / "lr_best.pt")
    torch.save(torch.zeros(4, 3, 8, 8), bad / "images_best.pt")
    with pytest.raises(ValueError, match="lr"):
        ti.load_reference_synset(bad)
    with pytest.raises(FileNotFoundError):
        ti.load_reference_synset(tmp_path / "missing")


def test_reference_synset_damaged_files(tmp_path):
    """A truncated or random-bytes .pt is one line saying so, without torch's advice to load
    with weights_only=False (which would run pickled code)."""
    torch.save(torch.zeros(4, 3, 8, 8), tmp_path / "images.pt")
    good = (tmp_path / "images.pt").read_bytes()
    for name, data in {"cut": good[: len(good) // 2], "random": bytes(range(256)) * 4}.items():
        d = tmp_path / name
        d.mkdir()
        (d / "images_best.pt").write_bytes(data)
        torch.save(torch.zeros(4, dtype=torch.long), d / "labels_best.pt")
        with pytest.raises(ValueError, match="is not a valid .pt tensor file") as e:
            ti.load_reference_synset(d)
        assert "weights_only" not in str(e.value) and "\n" not in str(e.value)


def test_missing_torch_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ImportError, match=r"pip install 'elf_jax\[torch\]'"):
        ti.require_torch()
    with pytest.raises(ImportError, match="torch==2.13.0"):
        ti.load_reference_synset("anything")
    # weight conversion from numpy state_dicts needs no torch
    net_sd = {k: np.zeros(s, np.float32) for k, s in
              ti._spec("LeNet", 10, (32, 32, 3)).torch_shapes().items()}
    v = ti.from_torch_state_dict("LeNet", net_sd, 10, (32, 32, 3))
    out = ti.to_torch_state_dict("LeNet", v, 10, (32, 32, 3), as_numpy=True)
    assert list(out) == list(net_sd)


def test_elf_teacher_feature_from_reference_buffer_epoch():
    """ELF_eval.py: flat params of a ConvNetW512 expert epoch -> ConvNetW512_L3 feature."""
    torch.manual_seed(3)
    ref = get_reference_network("ConvNetW512_L3", 3, 10, (32, 32)).eval()
    epoch = [p.detach().clone() for p in ref.parameters()]  # buffer saved for ConvNetW512
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref.layer1(x).numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC
    variables = ti.flat_params_to_variables("ConvNetW512_L3", epoch, 10, (32, 32, 3))
    model = get_model("ConvNetW512_L3", 10)
    got = model.apply(variables, _nhwc(x), train=False, method=model.front)
    assert got.shape == (2, 4, 4, 512)
    assert _rel_err(got, want) < 1e-4
