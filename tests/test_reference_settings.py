"""Reference reproduction options (issue 13): the loss-mode quirks of the reference's
``epoch()``, the MTT/DM distillation settings of its scripts, and the shipped configs of
its published setups."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from elf_jax import pipeline
from elf_jax.config import base_config, check_config
from elf_jax.losses import elf_objective, feature_loss, task_loss
from elf_jax.train.protocol import TrainProtocol


def _loss_inputs(seed=0, n=4, k=5):
    r = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)  # noqa: E731
    return f(n, k), f(n, k), f(n, 2, 2, 3), jnp.abs(f(n, 2, 2, 3)), jnp.arange(n) % k


def _reference_epoch_loss(mode, kind, lf, lr, img_out, ftr_out, img_ftr, ftr, lab):
    """The loss lines of the reference's ``utils.epoch`` in torch (NCHW features)."""
    torch = pytest.importorskip("torch")
    t = lambda a, nchw=False: torch.tensor(  # noqa: E731
        np.transpose(np.asarray(a), (0, 3, 1, 2)) if nchw else np.asarray(a))
    img_out, ftr_out, lab = t(img_out), t(ftr_out), t(lab).long()
    img_ftr, ftr = t(img_ftr, True), t(ftr, True)
    criterion = torch.nn.CrossEntropyLoss()
    feature_criterion = {"ce": torch.nn.CrossEntropyLoss(), "l2": torch.nn.MSELoss(),
                         "l1": torch.nn.L1Loss()}[kind]
    if mode == "front_rear_task":
        loss = lf * feature_criterion(img_ftr, ftr) + lr * criterion(ftr_out, lab) + \
            criterion(img_out, lab)
    elif mode == "front_task":
        loss = lf * criterion(img_ftr, ftr) + criterion(img_out, lab)
    elif mode == "rear_task":
        loss = lr * criterion(ftr_out, lab) + criterion(img_out, lab)
    else:  # front_rear
        loss = lf * feature_criterion(img_ftr, ftr) + criterion(ftr_out, lab)
    return float(loss)


@pytest.mark.parametrize("mode", ["front_rear_task", "front_task", "rear_task", "front_rear"])
@pytest.mark.parametrize("kind", ["l2", "l1", "ce"])
def test_loss_quirks_reproduce_the_reference_and_default_is_our_fix(mode, kind):
    img_out, ftr_out, img_ftr, ftr, lab = _loss_inputs()
    lf, lr = 0.7, 0.3
    args = (img_out, ftr_out, img_ftr, ftr, lab, mode, kind, lf, lr)
    quirky, _ = elf_objective(*args, reference_quirks=True)
    want = _reference_epoch_loss(mode, kind, lf, lr, img_out, ftr_out, img_ftr, ftr, lab)
    np.testing.assert_allclose(float(quirky), want, rtol=1e-5)
    # the default: the chosen distance and both lambdas in every mode
    ours, _ = elf_objective(*args)
    terms = {"front": lf * feature_loss(img_ftr, ftr, kind), "rear": lr * task_loss(ftr_out, lab),
             "task": task_loss(img_out, lab)}
    np.testing.assert_allclose(float(ours), float(sum(v for k, v in terms.items() if k in mode)),
                               rtol=1e-6)
    differs = (mode == "front_task" and kind != "ce") or mode == "front_rear"
    assert (abs(float(ours) - float(quirky)) > 1e-4) == differs


def test_loss_quirks_reach_the_train_step_from_the_config():
    from elf_jax.models import get_model
    from elf_jax.train.step import init_state, train_step

    c = base_config()
    c.eval.lambda_rear = 0.0
    assert "reference_loss_quirks" not in pipeline._protocol(c).to_dict()  # older records
    c.eval.reference_loss_quirks = True
    check_config(c)
    p = pipeline._protocol(c)
    assert p.reference_loss_quirks and p.to_dict()["reference_loss_quirks"] is True
    net = get_model("ConvNet", 3, width=4, depth=1)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8, 8, 1)), jnp.float32)
    feats = jnp.abs(net.apply(net.init(jax.random.key(1), x), x, method=net.front))
    batch = {"images": x, "labels": jnp.arange(4) % 3, "features": feats}
    losses = {}
    for quirks in (False, True):
        proto = TrainProtocol(mode="front_rear", lambda_rear=0.0, dsa_strategy="none",
                              reference_loss_quirks=quirks)
        state = init_state(net, proto, jax.random.key(0), np.zeros(2, np.uint32), x[:1])
        _, m = train_step(state, batch, jax.random.key(2), net=net, protocol=proto)
        losses[quirks] = (float(m["loss"]), float(m["front"]), float(m["rear"]))
    (l0, f0, r0), (l1, f1, r1) = losses[False], losses[True]
    np.testing.assert_allclose(l0, f0, rtol=1e-6)  # lambda_rear 0: no rear term
    np.testing.assert_allclose(l1, f1 + r1, rtol=1e-6)  # the reference: rear weighed 1
    np.testing.assert_allclose((f0, r0), (f1, r1), rtol=1e-6)  # the same terms
    assert r1 > 0.1


# ------------------------------------------------------------------ MTT: the short batch
def test_short_student_batch_used_first_as_the_reference():
    from elf_jax.distill.mtt import _reference_chunks, _Student

    torch = pytest.importorskip("torch")
    n, b = 10, 4
    perm = np.random.default_rng(0).permutation(n)
    chunks = list(torch.split(torch.from_numpy(perm), b))  # the reference's indices_chunks
    popped = [chunks.pop().numpy() for _ in range(3)]  # its order: the short chunk first
    ours = np.asarray(_reference_chunks(jnp.asarray(perm), b))
    assert [list(ours[0][:2])] + [list(r) for r in ours[1:]] == [list(p) for p in popped]

    st = _Student(None, None, num_classes=3, batch_syn=b, syn_steps=7, dsa_strategy="none",
                  remainder="reference")
    idx, keys, w = st.schedule(jax.random.key(0), n)
    assert idx.shape == (7, b) and keys.shape[0] == 7
    np.testing.assert_array_equal(w[:, 2:].sum(1), [0, 2, 2, 0, 2, 2, 0])  # every 3rd short
    for start in (0, 3):  # each permutation's rows of weight 1 cover the set once
        used = np.asarray(idx[start:start + 3])[np.asarray(w[start:start + 3]) > 0]
        assert sorted(used) == list(range(n))
    drop = _Student(None, None, num_classes=3, batch_syn=b, syn_steps=7, dsa_strategy="none")
    assert len(drop.schedule(jax.random.key(0), n)) == 2  # no weights: the old schedule


def test_padded_short_batch_gives_the_short_batch_gradient():
    from jax.flatten_util import ravel_pytree

    from elf_jax.distill.mtt import _Student
    from elf_jax.models import get_model

    net = get_model("ConvNet", 3, width=4, depth=1)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((6, 8, 8, 1)), jnp.float32)
    flat, unravel = ravel_pytree(net.init(jax.random.key(0), x[:1])["params"])
    targets = jax.nn.one_hot(jnp.arange(6) % 3, 3)
    st = _Student(net, unravel, num_classes=3, batch_syn=4, syn_steps=1, dsa_strategy="none",
                  remainder="reference")
    key = jax.random.key(0)
    padded = st.grad(flat, x, targets, (jnp.array([4, 5, 0, 1]), key, jnp.array([1., 1, 0, 0])))
    short = st.grad(flat, x, targets, (jnp.array([4, 5]), key))
    np.testing.assert_allclose(padded, short, rtol=1e-5, atol=1e-7)


def test_reference_remainder_refused_for_batchnorm_and_unknown_names():
    from elf_jax.distill.mtt import _remainder
    from elf_jax.distill.settings import TrajectorySettings

    s = TrajectorySettings(arch="ConvNetBN", batch_syn=4, syn_batch_remainder="reference")
    with pytest.raises(ValueError, match="padding rows would enter ConvNetBN's BatchNorm"):
        _remainder(s, {"norm": {}}, 10)
    assert _remainder(s, {"norm": {}}, 8) == "reference"  # 4 divides 8: nothing padded
    assert _remainder(s, None, 10) == "reference"
    with pytest.raises(ValueError, match="choose one of drop, reference"):
        _remainder(TrajectorySettings(syn_batch_remainder="pad"), None, 10)


# ------------------------------------------------------------------ configs
def _load(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_reference_configs_carry_the_scripts_settings():
    mtt, dm, dsa = (_load(f"reference_distill_{m}") for m in ("mtt", "dm", "dsa"))
    assert (mtt.synset.max_start_epoch, mtt.synset.num_experts, mtt.synset.eval_every,
            mtt.synset.eval_learned_lr, mtt.stats) == (40, 100, 100, True, "mtt")
    assert (dm.synset.iterations, dm.synset.eval_every, dm.stats) == (20000, 2000, "dc")
    assert mtt.synset.syn_batch_remainder == "reference"  # the preset
    assert (dsa.synset.dis_metric, dsa.synset.init, dsa.stats) == ("mse", "real", "dc")
    ev = _load("reference_elf_eval")
    assert ev.teacher.reference_buffer.endswith("ConvNetW512/momentum/replay_buffer_0.pt")
    assert (ev.eval.pool, ev.eval.bn_chunks, ev.eval.reference_loss_quirks) == (
        ("ResNet18",), 4, True)
    run = pipeline.Run(ev, "unused")
    assert run.teachers == {"ResNet18": "ConvNetW512"}
    buf = _load("reference_elf_buffer")
    assert (buf.teacher.epochs, buf.teacher.feature_epoch, buf.teacher.momentum) == (200, 100, 0.9)


def test_cpu_sized_reference_config_runs_end_to_end(tmp_path):
    import json

    c = _load("reference_mnist5k_tiny")
    pipeline.set_logger(lambda line: None)
    try:
        pipeline.run_all(pipeline.Run(c, tmp_path))
    finally:
        pipeline.set_logger(print)
    out = json.loads((tmp_path / "results.json").read_text())
    assert set(out["results"]["ConvNetBN"]) == {"task", "front_rear_task"}
    req = out["request"]
    assert req["bn_chunks"] == 4 and req["teacher"]["bn_chunks"] == 4
    assert req["protocol"]["reference_loss_quirks"] is True
    assert all(np.isfinite(out["results"]["ConvNetBN"][m]["mean"]) for m in req["modes"])


# ------------------------------------------------------------------ the preset, audited
# The reference's reason for each value reference_preset sets (docs/REFERENCE.md section 1).
PRESET_REFERENCE = {
    # its published runs: 4 GPUs, nn.DataParallel: BatchNorm per 64-row chunk of a 256
    # batch, running statistics of replica 0 (the first chunk)
    "eval.bn_chunks": 4,
    "teacher.bn_chunks": 4,  # buffer.py's nets are DataParallel too (get_network(dist=True))
    "stats": "mtt",  # utils.py (ELF teacher, test set, MTT) normalizes CIFAR-100 as CIFAR-10
    "parallel.sync_bn": False,  # DataParallel replicas compute their own BN statistics
    # utils.epoch_for_feature: front_task always uses CE, front_rear drops lamda_rear
    "eval.reference_loss_quirks": True,
    "synset.syn_batch_remainder": "reference",  # distill_MTT.py: short chunk used, first
    "synset.eval_learned_lr": True,  # distill_MTT.py: args.lr_net = syn_lr.item() (our default)
    "validation.fraction": 0.0,  # images_best.pt is kept by test accuracy
}


def _documented_preset_options():
    """``{field: value}`` from the option column of docs/REFERENCE.md's rows whose Preset
    column says yes (`` `field = value` `` spans)."""
    import ast
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "REFERENCE.md").read_text()
    out = {}
    for line in text.splitlines():
        if not re.match(r"\| \d+\.\d+ \|", line):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 7, f"docs/REFERENCE.md row with {len(cells)} cells: {line[:60]}"
        if cells[5].startswith("yes"):
            for name, value in re.findall(r"`([a-z_.]+) = ([^`]+)`", cells[4]):
                out[name] = ast.literal_eval(value)
    return out


def test_preset_sets_every_documented_reference_option():
    import ml_collections

    from elf_jax.config import fields, reference_preset
    from elf_jax.distill.settings import from_config

    base = base_config()
    base.parallel = ml_collections.ConfigDict({"parallel": "none", "sync_bn": True})
    preset = reference_preset(base)
    check_config(preset)
    got, default = fields(preset), fields(base)
    assert {k: got[k] for k in PRESET_REFERENCE} == PRESET_REFERENCE
    # the document's "preset: yes" rows name exactly these values ...
    assert _documented_preset_options() == PRESET_REFERENCE
    # ... and the preset changes nothing the document does not list
    changed = {k for k in got if got[k] != default[k]}
    assert changed == set(PRESET_REFERENCE) - {"synset.eval_learned_lr"}  # already ours
    # the fields reach what the stages build (no training)
    preset.dataset = "cifar100"
    assert pipeline.run_normalization(preset)["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    assert pipeline._protocol(preset).reference_loss_quirks is True
    assert pipeline._model_overrides(preset, "ResNet18BN") == {"bn_chunks": 4}
    assert pipeline._bn_chunks(preset.teacher) == {"bn_chunks": 4}
    mtt = from_config("mtt", preset.synset)
    assert (mtt.syn_batch_remainder, mtt.eval_learned_lr) == ("reference", True)


def test_imagenet64_config_is_the_references_imagenet_setting():
    from elf_jax.config import imagenet64_config
    from elf_jax.models.registry import canonical_name

    c = imagenet64_config()
    check_config(c)
    assert c.dtype == "float32"  # the reference trains in float32 (bf16: --config.dtype)
    # utils.get_eval_pool("cross_imagenet"): its split names are aliases of ours
    cross_imagenet = ("ConvNetD4_L4", "ConvNetD4BN_L4", "ResNet18ImageNet_L4",
                      "ResNet18BNImageNet_L4", "VGG11ImageNet_L6", "VGG11BNImageNet_L6")
    assert tuple(c.eval.pool) == tuple(canonical_name(a) for a in cross_imagenet)
    # ELF_eval.py reads ImageNet feature buffers from lr_0.01/epoch_200
    assert (c.teacher.epochs, c.teacher.lr) == (200, 0.01)
    assert pipeline.Run(c, "unused").teachers == {
        "ConvNetD4": "ConvNetD4", "ConvNetD4BN": "ConvNetD4",
        "ResNet18ImageNet": "ConvNetD4W256", "ResNet18BNImageNet": "ConvNetD4W256",
        "VGG11ImageNet": "ConvNetD4W512", "VGG11BNImageNet": "ConvNetD4W512"}
