"""Reference teacher and expert buffers as pipeline inputs (issue 13): a bank from snapshot
``feature_epoch`` of a trajectory of the reference's ``replay_buffer_<n>.pt`` (what its
``ELF_eval.py`` loads), and MTT experts from one or many buffer files in the reference's
``--load_all`` order. The buffers are fabricated with torch in the reference's parameter
order (``tests/torch_reference_nets.py``), on the embedded ``mnist5k`` (the teacher: our
ConvNet pads a 1-channel input as the reference's only at 28x28) and 8x8 ``digits``."""

from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from elf_jax import pipeline  # noqa: E402
from elf_jax.config import base_config  # noqa: E402
from elf_jax.distill.mtt import load_expert_array  # noqa: E402
from elf_jax.interop.torch import replay_buffer_files  # noqa: E402

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from torch_reference_nets import get_reference_network  # noqa: E402

pytestmark = pytest.mark.torch
ARCH, SHAPE, K = "ConvNetW32", (8, 8, 1), 10
MNIST = (28, 28, 1)


def _buffer(path, n_traj=2, n_epochs=3, seed=0, shape=SHAPE, arch=ARCH):
    """A reference buffer: list[trajectory], trajectory = list[epoch parameter lists]; the
    nets are kept so that a test can compute the reference's features."""
    trajs, nets = [], []
    for t in range(n_traj):
        torch.manual_seed(100 * seed + t)
        net = get_reference_network(arch, shape[2], K, shape[:2])
        epochs = [[p.detach().clone() for p in net.parameters()]]
        for _ in range(n_epochs - 1):
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            epochs.append([p.detach().clone() for p in net.parameters()])
        trajs.append(epochs)
        nets.append(net)
    torch.save(trajs, path)
    return trajs


def _reference_features(params, images):
    """The reference feature model on NHWC images: its conv trunk with `params` loaded."""
    net = get_reference_network(ARCH, images.shape[3], K, images.shape[1:3]).eval()
    torch.nn.utils.vector_to_parameters(torch.cat([p.reshape(-1) for p in params]),
                                        net.parameters())
    with torch.no_grad():
        out = net.features(torch.from_numpy(np.transpose(images, (0, 3, 1, 2))))
    return np.transpose(out.numpy(), (0, 2, 3, 1))


def _config(buffer, **teacher):
    c = base_config()
    c.dataset = "mnist5k"
    c.synset.source, c.synset.ipc = "real_random", 1
    c.teacher.arch, c.teacher.reference_buffer, c.teacher.feature_epoch = ARCH, str(buffer), 2
    c.teacher.update(teacher)
    c.eval.pool, c.eval.width = ("ConvNet",), 32  # a width-32 front: the teacher's feature
    return c


def test_bank_from_a_reference_teacher_buffer(tmp_path):
    logs = []
    pipeline.set_logger(logs.append)
    buf = tmp_path / "replay_buffer_0.pt"
    trajs = _buffer(buf, shape=MNIST)
    run = pipeline.Run(_config(buf), tmp_path / "wd")
    assert run.teachers == {"ConvNet": ARCH}
    pipeline.check_prerequisites(run, "features")  # nothing to train first
    pipeline.stage_teachers(run)
    assert not (tmp_path / "wd" / "teachers").exists()
    synset = pipeline.stage_synset(run)
    bank = pipeline.stage_features(run, synset)["ConvNet"]
    # the reference's choice: the LAST trajectory, snapshot feature_epoch
    want = _reference_features(trajs[-1][2], synset.images)
    np.testing.assert_allclose(bank.features, want, rtol=1e-4, atol=1e-5)
    m = bank.metadata
    assert m["reference_buffer"] == str(buf.absolute()) and m["reference_trajectory"] == -1
    assert len(m["reference_buffer_hash"]) == 64 and m["snapshot_epoch"] == 2
    req = pipeline.eval_request(run.config, None)["teacher"]
    assert req["reference_buffer"] == str(buf.absolute()) and req["reference_trajectory"] == -1
    prov = pipeline._provenance(run, synset, {"ConvNet": bank})["teachers"][ARCH]
    assert prov["reference_buffer_hash"] == m["reference_buffer_hash"]

    # unchanged: reused; another trajectory or a changed file: rebuilt, the log says why
    logs.clear()
    again = pipeline.stage_features(run, synset)["ConvNet"]
    assert not any("rebuilding" in line for line in logs)
    np.testing.assert_array_equal(again.features, bank.features)
    first = pipeline.stage_features(pipeline.Run(_config(buf, reference_trajectory=0),
                                                 tmp_path / "wd"), synset)["ConvNet"]
    assert any("reference_trajectory" in line for line in logs)
    np.testing.assert_allclose(first.features, _reference_features(trajs[0][2], synset.images),
                               rtol=1e-4, atol=1e-5)
    logs.clear()
    trajs = _buffer(buf, seed=1, shape=MNIST)  # the same path and trajectory, new content
    changed = pipeline.stage_features(pipeline.Run(_config(buf, reference_trajectory=0),
                                                   tmp_path / "wd"), synset)["ConvNet"]
    assert any("reference_buffer_hash" in line for line in logs)
    np.testing.assert_allclose(changed.features, _reference_features(trajs[0][2], synset.images),
                               rtol=1e-4, atol=1e-5)
    pipeline.set_logger(print)


def test_reference_teacher_refusals_name_what_to_do(tmp_path):
    buf = tmp_path / "replay_buffer_0.pt"
    with pytest.raises(FileNotFoundError, match="reference_buffer: .*does not exist"):
        pipeline.check_prerequisites(pipeline.Run(_config(buf), tmp_path / "wd"), "features")
    _buffer(buf, n_traj=1, n_epochs=2, shape=MNIST)
    for teacher, match in [({"feature_epoch": 2}, "snapshots 0..1, so epoch 2"),
                           ({"reference_trajectory": 1}, "holds 1 trajectories"),
                           ({"arch": "ConvNetW64", "feature_epoch": 1},
                            "layout matches: ConvNetW32")]:
        c = _config(buf, **teacher)
        c.eval.width = 64 if teacher.get("arch") else 32
        run = pipeline.Run(c, tmp_path / "wd")
        with pytest.raises(ValueError, match=match):
            pipeline.stage_features(run, pipeline.stage_synset(run))
    c = _config(buf, reference_trajectory=True)
    with pytest.raises(ValueError, match="reference_trajectory=True: must be an int"):
        pipeline.Run(c, tmp_path / "wd")


def test_experts_from_many_buffer_files_in_the_reference_order(tmp_path):
    d = tmp_path / "buffers"
    d.mkdir()
    files = [_buffer(d / f"replay_buffer_{n}.pt", n_traj=t, seed=n)
             for n, t in enumerate((2, 1, 2))]
    (d / "replay_buffer_4.pt").write_bytes(b"")  # after a gap: the reference stops at 3
    flat = [t for f in files for t in f]  # file 0's trajectories, then file 1's, ...

    def vec(epoch):
        return torch.cat([p.reshape(-1) for p in epoch]).numpy()

    kw = dict(arch="ConvNet", num_classes=K, image_shape=SHAPE, model_kwargs={"width": 32},
              epochs_needed=1)
    arr, unravel = load_expert_array(str(d), **kw)
    assert arr.shape[:2] == (5, 2)
    from elf_jax.interop.torch import variables_to_flat_params

    for i, traj in enumerate(flat):  # each trajectory, in order, snapshots 0..1
        for e in (0, 1):
            got = variables_to_flat_params("ConvNet", unravel(arr[i, e]), K, SHAPE, width=32)
            np.testing.assert_array_equal(np.asarray(got), vec(traj[e]))
    names = [p.name for p in replay_buffer_files(str(d))]
    assert names == ["replay_buffer_0.pt", "replay_buffer_1.pt", "replay_buffer_2.pt"]
    glob_order = replay_buffer_files(str(d / "replay_buffer_[0-2].pt"))
    assert [p.name for p in glob_order] == names
    comma = f"{d / 'replay_buffer_2.pt'},{d / 'replay_buffer_0.pt'}"
    arr2, _ = load_expert_array(comma, **kw)
    np.testing.assert_array_equal(arr2, arr[[3, 4, 0, 1]])
    assert load_expert_array(str(d), max_files=1, **kw)[0].shape[0] == 2
    np.testing.assert_array_equal(load_expert_array(str(d), max_experts=3, **kw)[0], arr[:3])
    with pytest.raises(FileNotFoundError, match="neither expert trajectories of ours"):
        load_expert_array(str(tmp_path), **kw)
    with pytest.raises(FileNotFoundError, match="no expert buffer file matches"):
        load_expert_array(str(d / "nope_*.pt"), **kw)


def test_mtt_distills_from_a_buffer_directory(tmp_path):
    from elf_jax.config import mnist5k_distill_config
    from elf_jax.distill import distill_from_config

    d = tmp_path / "buffers"
    d.mkdir()
    for n in range(2):
        _buffer(d / f"replay_buffer_{n}.pt", n_traj=1, n_epochs=2, seed=n, arch="ConvNetD1W8",
                shape=MNIST)
    c = mnist5k_distill_config("mtt")
    s = c.synset
    s.experts, s.model_kwargs, s.ipc, s.iterations = str(d), {}, 1, 1
    s.model_kwargs = {"width": 8, "depth": 1}  # seconds to compile on a CPU
    s.syn_steps, s.expert_epochs, s.max_start_epoch, s.dsa_strategy = 1, 1, 1, "none"
    s.eval_every, s.eval_epochs, s.eval_repeats, s.lr_teacher = 1, 1, 1, 0.02
    out = distill_from_config(c, tmp_path / "run")
    assert out.images.shape == (10,) + MNIST and np.isfinite(out.images).all()
    # the best set is chosen as the reference's distill_MTT.py does: trained with its lr
    assert out.metadata["history"][-1]["eval_lr"] == pytest.approx(out.lr) != 0.01
