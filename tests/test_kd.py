"""The knowledge-distillation control (issue 12, item 5): teacher logits in the bank, loss
mode kd, its validation, the pipeline's rebuild of old banks and the report's KD column."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from elf_jax import report
from elf_jax.elf import evaluate_synset
from elf_jax.elf.bank import FeatureBank, build_bank, load_bank, save_bank
from elf_jax.losses import kd_loss, kd_objective
from elf_jax.models import get_model
from elf_jax.synset import SyntheticSet
from elf_jax.train import TrainProtocol
from elf_jax.train.step import init_state, train_step

pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.numerics]  # rounding-sensitive: make test-avx2 reruns it

K = 3
W8 = {"width": 8}
TINY = TrainProtocol(epochs=1, batch_size=4, dsa_strategy="none")


def _torch_kd(s, t, temp):
    s, t = torch.tensor(s), torch.tensor(t)
    log_q = torch.log_softmax(s / temp, -1)
    return float(torch.nn.functional.kl_div(log_q, torch.softmax(t / temp, -1),
                                            reduction="batchmean") * temp * temp)


@pytest.mark.parametrize("temp", [1.0, 4.0, 0.5])
def test_kd_loss_is_hinton_kl_with_temperature(temp):
    rng = np.random.default_rng(0)
    s = rng.normal(size=(5, 7)).astype(np.float32) * 3
    t = rng.normal(size=(5, 7)).astype(np.float32) * 3
    np.testing.assert_allclose(kd_loss(s, t, temp), _torch_kd(s, t, temp), rtol=1e-5)
    # numpy, written out: T^2 * mean_n sum_c p log(p / q)
    p = np.exp(t / temp) / np.exp(t / temp).sum(-1, keepdims=True)
    q = np.exp(s / temp) / np.exp(s / temp).sum(-1, keepdims=True)
    want = temp ** 2 * np.mean(np.sum(p * np.log(p / q), -1))
    np.testing.assert_allclose(kd_loss(s, t, temp), want, rtol=1e-5)
    assert float(kd_loss(t, t, temp)) == pytest.approx(0.0, abs=1e-6)
    # no gradient into the teacher; masked rows leave the loss of the smaller batch
    g = jax.grad(lambda tt: kd_loss(jnp.asarray(s), tt, temp))(jnp.asarray(t))
    assert float(jnp.abs(g).max()) == 0.0
    mask = np.array([1, 1, 1, 0, 0], np.float32)
    np.testing.assert_allclose(kd_loss(s, t, temp, mask=mask), kd_loss(s[:3], t[:3], temp), rtol=1e-6)
    loss, aux = kd_objective(s, t, np.array([0, 1, 2, 3, 4]), temp)
    assert float(loss) == float(aux["loss"]) and float(aux["task"]) > 0


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    x, tx = (rng.normal(size=(n, 16, 16, 3)).astype(np.float32) for n in (9, 7))
    y, ty = ((np.arange(n) % K).astype(np.int32) for n in (9, 7))
    net = get_model("ConvNet", K, **W8)
    variables = jax.jit(net.init)(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))
    syn = SyntheticSet(x, y, num_classes=K, metadata={"method": "real_random", "dataset": "t"})
    bank = build_bank(net, variables, syn, teacher_name="ConvNet", snapshot_epoch=1, batch_size=4)
    return x, y, tx, ty, net, variables, bank


def test_bank_stores_the_teachers_logits(setup, tmp_path):
    x, _, _, _, net, variables, bank = setup
    want = np.asarray(net.apply(variables, jnp.asarray(x), False))
    assert bank.logits.shape == (9, K) and bank.logits.dtype == np.float32 and bank.num_classes == K
    np.testing.assert_allclose(bank.logits, want, rtol=1e-5, atol=1e-6)
    save_bank(tmp_path / "new", bank)
    back = load_bank(tmp_path / "new")
    np.testing.assert_array_equal(back.logits, bank.logits)
    assert back.metadata["logits_shape"] == [K] and "logits_hash" not in back.metadata
    # a bank saved before banks stored logits still loads, without them
    save_bank(tmp_path / "old", FeatureBank(bank.features, bank.metadata))
    old = load_bank(tmp_path / "old")
    assert old.logits is None and "logits_shape" not in old.metadata
    with pytest.raises(ValueError, match="one row per feature"):
        FeatureBank(bank.features, bank.metadata, bank.logits[:4])


def test_train_step_kd_loss_on_the_net_logits(setup):
    x, y, _, _, net, _, bank = setup
    protocol = TINY.replace(mode="kd", kd_temperature=2.0)
    state = init_state(net, protocol, jax.random.PRNGKey(2), jax.random.PRNGKey(3), jnp.asarray(x[:1]))
    logits = net.apply({"params": state.params}, jnp.asarray(x), True)
    batch = {"images": x, "labels": y, "teacher_logits": bank.logits}
    step = jax.jit(lambda st, b, k: train_step(st, b, k, net=net, protocol=protocol))
    _, m = step(state, batch, jax.random.PRNGKey(4))
    np.testing.assert_allclose(m["loss"], kd_loss(logits, bank.logits, 2.0), rtol=1e-5)
    with pytest.raises(ValueError, match="teacher_logits"):
        train_step(state, {"images": x, "labels": y}, jax.random.key(4), net=net, protocol=protocol)
    assert "kd_temperature" in protocol.to_dict() and "kd_temperature" not in TINY.to_dict()


def test_evaluate_kd_runs_differs_from_task_and_validates(setup):
    x, y, tx, ty, _, _, bank = setup
    run = dict(repeats=1, model_overrides=W8, progress=False, return_states=True)
    kd = evaluate_synset("ConvNet", x, y, tx, ty, bank, TINY.replace(mode="kd"), **run)
    task = evaluate_synset("ConvNet", x, y, tx, ty, bank, TINY.replace(mode="task"), **run)
    assert kd["mode"] == "kd" and 0.0 <= kd["mean"] <= 1.0
    assert not np.allclose(kd["train_loss"], task["train_loss"])
    a, b = (jax.tree.leaves(r["states"].params) for r in (kd, task))
    assert any(not np.array_equal(u, v) for u, v in zip(a, b))
    with pytest.raises(ValueError, match="only a FeatureBank holds"):
        evaluate_synset("ConvNet", x, y, tx, ty, bank.features, TINY.replace(mode="kd"), 1,
                        model_overrides=W8)
    with pytest.raises(ValueError, match="must be rebuilt"):
        evaluate_synset("ConvNet", x, y, tx, ty, FeatureBank(bank.features, bank.metadata),
                        TINY.replace(mode="kd"), 1, model_overrides=W8)
    wide = FeatureBank(bank.features, bank.metadata, np.zeros((9, 10), np.float32))
    with pytest.raises(ValueError, match=r"shape \(9, 10\).*needs \(9, 3\)"):
        evaluate_synset("ConvNet", x, y, tx, ty, wide, TINY.replace(mode="kd"), 1,
                        model_overrides=W8)


RESULTS = {
    "ConvNet": {"task": {"accs": [0.80, 0.82, 0.81]}, "front_rear_task": {"accs": [0.85, 0.87, 0.86]},
                "kd": {"accs": [0.84, 0.85, 0.86]}},
    "ResNet18": {"task": {"accs": [0.70, 0.71, 0.72]}, "front_rear_task": {"accs": [0.75, 0.76, 0.77]}},
}


def test_report_third_column_elf_vs_kd(tmp_path):
    rows = report.summarize(RESULTS)
    conv = rows["ConvNet"]
    assert conv["gain_vs_kd"] == pytest.approx(0.01)
    diffs = [0.01, 0.02, 0.0]  # paired per repeat: the same inits
    from elf_jax.elf.summary import t_interval

    assert conv["gain_vs_kd_ci95"] == pytest.approx(t_interval(diffs))
    assert conv["gain_vs_kd_significant"] is False and "gain_vs_kd" not in rows["ResNet18"]
    md = report.markdown_table(rows, missing=[("ResNet18", "kd")], repeats=3)
    header = md.splitlines()[0]
    assert header.split(" | ")[1:4] == ["task (n=3)", "front_rear_task (n=3)", "kd (n=3)"]
    assert header.endswith("| ELF - KD (points) [95% CI, * excludes 0] |")
    lo, hi = (100 * v for v in t_interval(diffs))
    assert f"| ConvNet | 81.00 ± 0.82 | 86.00 ± 0.82 | 85.00 ± 0.82 | +5.00 [+5.00, +5.00]* | " \
           f"+1.00 [{lo:+.2f}, {hi:+.2f}] |" in md
    assert md.splitlines()[-1].endswith("| missing | +5.00 [+5.00, +5.00]* | missing |")  # no kd
    assert "ELF - KD [95% CI]" in report.text_table(rows)
    paths = report.write_report({"results": RESULTS}, str(tmp_path))
    stored = report.load_report(paths["json"])["summary"]["ConvNet"]
    assert stored["gain_vs_kd"] == pytest.approx(0.01) and len(stored["gain_vs_kd_ci95"]) == 2
    two = {a: {m: e for m, e in r.items() if m != "kd"} for a, r in RESULTS.items()}
    assert "KD" not in report.markdown_table(report.summarize(two))


def test_config_kd_temperature_is_declared_and_checked():
    from elf_jax.config import FIELD_DOCS, base_config, check_config

    c = base_config()
    assert c.eval.kd_temperature == 4.0 and "eval.kd_temperature" in FIELD_DOCS
    c.eval.modes = ("task", "front_rear_task", "kd")
    check_config(c)
    c.eval.kd_temperature = 0.0
    with pytest.raises(ValueError, match="kd_temperature"):
        check_config(c)
    with pytest.raises(ValueError, match="kd_temperature"):
        TrainProtocol(mode="kd", kd_temperature=-1.0)


def test_pipeline_rebuilds_a_bank_without_logits_for_kd(tmp_path):
    import shutil

    from elf_jax import pipeline
    from elf_jax.config import demo_config

    c = demo_config()
    c.synset.source, c.synset.ipc = "real_random", 1
    c.teacher.epochs = c.teacher.feature_epoch = 1
    c.teacher.batch_size, c.teacher.dsa_strategy = 1024, "none"
    c.teacher.override_arch, c.teacher.model_kwargs = "ConvNet", {"width": 8}
    c.eval.pool, c.eval.width, c.eval.modes = ("ConvNet",), 8, ("task", "front_rear_task")
    logs = []
    pipeline.set_logger(logs.append)
    try:
        run = pipeline.Run(c, tmp_path)
        pipeline.stage_teachers(run)
        synset = pipeline.stage_synset(run)
        bank = pipeline.stage_features(run, synset)["ConvNet"]
        path = tmp_path / "banks" / "ConvNet"
        shutil.rmtree(path)  # as saved before banks stored logits
        save_bank(path, FeatureBank(bank.features, bank.metadata))
        assert pipeline.stage_features(run, synset)["ConvNet"].logits is None  # not needed: kept
        assert not any("rebuilding" in line for line in logs)
        c.eval.modes = ("task", "front_rear_task", "kd")
        kd_run = pipeline.Run(c, tmp_path)
        rebuilt = pipeline.stage_features(kd_run, synset)["ConvNet"]
        assert any("rebuilding the bank" in line and "no teacher logits" in line for line in logs)
        np.testing.assert_allclose(rebuilt.logits, bank.logits, rtol=1e-5, atol=1e-6)
        assert load_bank(path).logits is not None
        assert pipeline.eval_request(c, None)["protocol"]["kd_temperature"] == 4.0
        shutil.rmtree(path)
        save_bank(path, FeatureBank(bank.features, bank.metadata))
        shutil.rmtree(tmp_path / "teachers")
        with pytest.raises(ValueError, match="no teacher logits.*train-teacher"):
            pipeline.stage_features(kd_run, synset)
    finally:
        pipeline.set_logger(print)
