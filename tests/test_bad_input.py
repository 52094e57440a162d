"""Bad input gets one clear refusal, never a silent wrong number (issue 31's audit): config
values out of range, empty modes, misspelled fields in config files, config files that do
not load, repeated tuple flags. Imports, upstream changes and doctored results have their
cases in test_synset, test_pipeline and test_report; this file holds the config layer."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from elf_jax.config import FIELD_RANGES, check_config, demo_config

ENV = dict(os.environ, JAX_PLATFORMS="cpu")
DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo_mnist5k.py"


def _config(**changes):
    c = demo_config()
    for dotted, value in changes.items():
        section, _, name = dotted.rpartition(".")
        (c[section] if section else c)[name] = value
    return c


@pytest.mark.parametrize("field, bad, words", [
    ("synset.lr_img", -1.0, "> 0"), ("synset.lr_img", 0.0, "> 0"),
    ("synset.momentum", -0.1, "[0, 1)"), ("synset.momentum", 1.0, "[0, 1)"),
    ("eval.lr", 0.0, "> 0"), ("teacher.lr", float("nan"), "> 0"),
    ("eval.momentum", 1.5, "[0, 1)"), ("teacher.weight_decay", -1e-4, ">= 0"),
    ("eval.lambda_front", 1e300, "[0, 1e+06]"), ("eval.lambda_rear", -1.0, "[0, 1e+06]"),
    ("eval.kd_temperature", 0.0, "> 0"), ("synset.lr_lr", -1e-5, "> 0"),
])
def test_every_ranged_field_is_refused_outside_its_range(field, bad, words):
    assert field in FIELD_RANGES
    with pytest.raises(ValueError) as err:
        check_config(_config(**{field: bad}))
    assert f"config.{field}=" in str(err.value) and words in str(err.value)


def test_the_range_table_accepts_the_shipped_defaults_and_none_where_optional():
    c = demo_config()
    check_config(c)
    check_config(_config(**{"synset.lr_img": None}))  # the method's default
    with pytest.raises(ValueError, match="eval.lr=None"):
        check_config(_config(**{"eval.lr": None}))


def test_the_sweep_grid_takes_the_same_lambda_bound():
    c = demo_config()
    c.sweep.lambda_front = (0.0, 1e300)
    with pytest.raises(ValueError, match=r"sweep.lambda_front.*\[0, 1e\+06\]"):
        check_config(c)


def test_a_choice_lists_the_empty_option_visibly():
    with pytest.raises(ValueError, match=r"choose one of '', dc, mtt, pixels, pixels255"):
        check_config(_config(**{"synset.import_stats": "foo"}))


def test_empty_modes_are_refused():
    with pytest.raises(ValueError, match="eval.modes is empty"):
        check_config(_config(**{"eval.modes": ()}))


def test_a_misspelled_field_set_in_a_config_file_is_an_error():
    c = demo_config()
    c.eval.repeatz = 3
    with pytest.raises(ValueError, match=r"eval.repeatz: unknown config field.*'eval.repeats'"):
        check_config(c)


def _config_command(*args):
    return subprocess.run([sys.executable, "-m", "elf_jax.cli", "config", *args],
                          capture_output=True, text=True, env=ENV, timeout=120)


def _one_line(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("elf-jax: error:"), proc.stderr
    for w in words:
        assert w in line, (w, line)


@pytest.mark.parametrize("body, words", [
    ("def get_config(:\n    pass\n", ["line 1", "SyntaxError"]),
    ("root:x:0:0:root:/root:/bin/bash\n", ["line 1", "SyntaxError"]),  # not Python at all
    ("def get_config():\n    raise RuntimeError('no such preset')\n",
     ["line 2", "RuntimeError: no such preset"]),
    ("def get_config():\n    return 3\n", ["returned int", "ConfigDict"]),
    ("from elf_jax.config import demo_config\n\ndef get_config():\n    c = demo_config()\n"
     "    c.eval.repeatz = 3\n    return c\n", ["eval.repeatz", "'eval.repeats'"]),
])
def test_a_config_file_that_does_not_load_is_one_line_naming_file_and_line(tmp_path, body, words):
    path = tmp_path / "my_config.py"
    path.write_text(body)
    _one_line(_config_command("--config", str(path)), *words)


def test_a_repeated_tuple_flag_replaces_as_a_scalar_flag_does():
    proc = _config_command("--config.eval.pool=('ConvNet',)", "--config.eval.pool=('MLP','LeNet')",
                           "--config.eval.repeats=3", "--config.eval.repeats=4")
    assert proc.returncode == 0, proc.stderr
    values = dict(line.split("  #")[0].strip().split("=", 1) for line in proc.stdout.splitlines()
                  if line.startswith(("eval.pool=", "eval.repeats=")))
    assert values == {"eval.pool": "('MLP', 'LeNet')", "eval.repeats": "4"}


# ------------------------------------------------------------------ imports (pipeline layer)
def _import_config(path, **changes):
    c = _config(**changes)
    c.synset.source, c.synset.path = "import", str(path)
    return c


def _stage_synset(config, workdir):
    from elf_jax import pipeline

    logs: list = []
    pipeline.set_logger(logs.append)
    try:
        return pipeline.stage_synset(pipeline.Run(config, workdir)), logs
    finally:
        pipeline.set_logger(print)


def _normalized_digits(n_per_class=2):
    """Real mnist5k images in the run's space: a set that must pass every check."""
    from elf_jax.data import load

    ds = load("mnist5k", "train")
    labels = np.asarray(ds.labels)
    rows = np.concatenate([np.flatnonzero(labels == k)[:n_per_class] for k in range(10)])
    return np.asarray(ds.images)[rows], labels[rows]


@pytest.mark.parametrize("case, words", [
    ("unit", ["no pixel below 0", "import_stats"]),           # [0, 1] pixels
    ("raw_one_negative", ["far outside", "import_stats"]),    # 0..255 and one pixel at -0.01
    ("scaled_x255", ["far outside"]),                         # a set x255, unclipped
    ("centered_255", ["far outside"]),                        # -127.5..127.5
    ("empty_class", ["no image of class 7", "every class"]),
])
def test_an_import_out_of_the_datasets_space_or_classes_is_refused(tmp_path, case, words):
    from elf_jax.synset import SyntheticSet, to_npz

    x, y = _normalized_digits()
    pixels = x * 0.3081 + 0.1307  # back to [0, 1]
    images = {"unit": pixels, "raw_one_negative": pixels * 255, "scaled_x255": x * 255,
              "centered_255": pixels * 255 - 127.5, "empty_class": x}[case].copy()
    if case == "raw_one_negative":
        images.flat[0] = -0.01
    labels = np.where(y == 7, 6, y) if case == "empty_class" else y
    to_npz(tmp_path / "set.npz", SyntheticSet(images.astype(np.float32), labels))
    with pytest.raises(ValueError) as err:
        _stage_synset(_import_config(tmp_path / "set.npz"), tmp_path / "wd")
    for w in words:
        assert w in str(err.value), (w, str(err.value))
    assert not (tmp_path / "wd" / "synset").exists()


def test_raw_pixels_are_accepted_once_their_space_is_declared(tmp_path):
    from elf_jax.synset import SyntheticSet, to_npz

    x, y = _normalized_digits()
    for space, scale in (("pixels", 1.0), ("pixels255", 255.0)):
        raw = ((x * 0.3081 + 0.1307) * scale).astype(np.float32)
        to_npz(tmp_path / f"{space}.npz", SyntheticSet(raw, y))
        s, logs = _stage_synset(_import_config(tmp_path / f"{space}.npz",
                                               **{"synset.import_stats": space}), tmp_path / space)
        np.testing.assert_allclose(s.images, x, atol=1e-4)  # converted into the run's space
        assert any("renormalized" in line for line in logs)


def _reference_folder(path, images, labels):
    """A reference repository's set folder: images_best.pt (NCHW), labels_best.pt."""
    torch = pytest.importorskip("torch")
    path.mkdir()
    torch.save(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), path / "images_best.pt")
    torch.save(torch.from_numpy(labels), path / "labels_best.pt")
    return path


def test_boolean_labels_in_a_reference_folder_are_refused(tmp_path):
    x, y = _normalized_digits()
    ref = _reference_folder(tmp_path / "ref", x, y % 2 == 1)
    with pytest.raises(ValueError, match="labels are booleans"):
        _stage_synset(_import_config(ref, **{"synset.import_stats": "dc"}), tmp_path / "wd")


def test_a_reimport_with_the_same_pixels_keeps_what_the_new_files_carry(tmp_path):
    """Issue 27: a .pt folder whose pixels an .npz imported before keeps its learned lr and
    its path (it was 'reusing ... unchanged', the lr dropped, the old path recorded)."""
    pytest.importorskip("torch")
    from elf_jax.interop import export_reference_synset
    from elf_jax.synset import SyntheticSet, load_synset, to_npz

    x, y = _normalized_digits()
    to_npz(tmp_path / "set.npz", SyntheticSet(x, y))
    export_reference_synset(SyntheticSet(x, y, lr=0.05), tmp_path / "ref")
    wd = tmp_path / "wd"
    first, _ = _stage_synset(_import_config(tmp_path / "set.npz"), wd)
    assert first.lr is None
    # the .pt folder in the run's space (dc), so the pixels are the same as the .npz's
    second, logs = _stage_synset(_import_config(tmp_path / "ref", **{"synset.import_stats": "dc"}),
                                 wd)
    assert second.content_hash() == first.content_hash() and second.lr == pytest.approx(0.05)
    assert not any("unchanged" in line for line in logs) and any("replacing" in line for line in logs)
    saved = load_synset(wd / "synset")
    assert saved.lr == pytest.approx(0.05)
    assert saved.metadata["request"]["path"] == str((tmp_path / "ref").absolute())
    third, logs = _stage_synset(_import_config(tmp_path / "ref", **{"synset.import_stats": "dc"}),
                                wd)
    assert any("unchanged" in line for line in logs) and third.lr == pytest.approx(0.05)


def test_an_empty_import_directory_is_not_called_a_corrupt_set(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no synthetic set to import") as err:
        _stage_synset(_import_config(tmp_path / "empty"), tmp_path / "wd")
    assert "corrupt" not in str(err.value) and "delete" not in str(err.value)  # the user's input


def test_nan_in_an_import_is_not_called_a_diverged_distillation(tmp_path):
    x, y = _normalized_digits()
    x[0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", images=x, labels=y)
    with pytest.raises(ValueError, match="NaN/Inf.*diverged distillation or a damaged export"):
        _stage_synset(_import_config(tmp_path / "nan.npz"), tmp_path / "wd")


def test_a_reference_teacher_is_reported_by_its_buffer_not_as_none():
    from elf_jax import report

    teacher = {"for": ["ConvNet"], "snapshot_epoch": 2, "reference_buffer": "/r/replay_buffer_0.pt",
               "reference_trajectory": -1, "reference_buffer_hash": "ab" * 32}
    lines = report.settings_lines({"results": {}, "request": {"dataset": "cifar10"},
                                   "provenance": {"teachers": {"ConvNet": teacher}}})
    line = next(ln for ln in lines if ln.startswith("teacher ConvNet"))
    assert "None" not in line and "replay_buffer_0.pt" in line and "trajectory -1" in line


# ------------------------------------------------------------------ --overwrite (lost work)
def _tree(root):
    """{relative path: bytes} of every file under root (and the directories, as None)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def _full_workdir(wd, with_teacher=True):
    files = ["distill/synset_best/tree", "synset/tree", "banks/ConvNetW32/tree",
             "eval/ConvNet/task/checkpoints/1", "sweep/ConvNet/x", "results.json", "results.md",
             "results.png", "sweep.json", "sweep.md", "sweep.png", "tb/teacher/t/events",
             "tb/distill/dm/events", "tb/evaluate/ConvNet_task_r0/events"]
    if with_teacher:
        files.append("teachers/ConvNetW32/expert_000/trajectory/8/tree")
    for i, rel in enumerate(files):
        (wd / rel).parent.mkdir(parents=True, exist_ok=True)
        (wd / rel).write_bytes(f"{rel} {i}".encode())


@pytest.mark.parametrize("source", ["distill", "real_random"])
@pytest.mark.parametrize("with_teacher", [True, False], ids=["teacher", "bank_only"])
def test_overwrite_refuses_before_removing_or_removes_only_what_it_recomputes(
        tmp_path, source, with_teacher):
    """Every command x stage (issue 31): a refusal leaves the workdir byte-identical; an
    accepted --overwrite removes exactly that stage's and its downstream stages' outputs."""
    import copy
    import shutil

    from elf_jax import pipeline

    template = tmp_path / "template"
    _full_workdir(template, with_teacher)
    before = _tree(template)
    checked = pipeline.Run(_config(**{"synset.source": source}), template)
    assert checked.teachers  # found once, kept by the copies below
    for command in pipeline.COMMAND_STAGES:
        for stage in pipeline.STAGE_PATHS:
            wd = tmp_path / f"{command}-{stage}"
            shutil.copytree(template, wd)
            run = copy.copy(checked)  # the config checked (and its teachers found) once
            run.workdir = wd
            try:
                pipeline.overwrite(run, [stage], command)
            except (ValueError, FileNotFoundError) as err:
                assert "nothing was removed" in str(err) or "does not compute" in str(err), err
                assert _tree(wd) == before, (command, stage)
            else:
                gone = {rel for name in (stage,) + pipeline.DOWNSTREAM[stage]
                        for rel in pipeline.STAGE_PATHS[name]}
                kept = {k: v for k, v in before.items()
                        if not any(k == g or k.startswith(g + "/") for g in gone)}
                assert _tree(wd) == kept, (command, stage)
                assert stage in pipeline._recomputable(run, command)
            shutil.rmtree(wd)


def test_use_learned_lr_on_a_set_without_one_is_refused_before_training(tmp_path):
    """Issue 27: it trained with eval.lr and recorded use_learned_lr True."""
    from elf_jax import pipeline
    from elf_jax.synset import SyntheticSet

    config = _config(**{"eval.use_learned_lr": True, "eval.modes": ("task",)})
    x, y = _normalized_digits()
    with pytest.raises(ValueError, match="carries no learned lr"):
        pipeline.stage_evaluate(pipeline.Run(config, tmp_path), SyntheticSet(x, y), banks={})
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "eval").exists()


def test_uint8_and_nchw_npz_imports_are_converted_or_named(tmp_path):
    x, y = _normalized_digits()
    raw = np.round((x * 0.3081 + 0.1307) * 255).astype(np.uint8)
    np.savez(tmp_path / "u8.npz", images=raw, labels=y)
    with pytest.raises(ValueError, match="no pixel below 0.*pixels255"):
        _stage_synset(_import_config(tmp_path / "u8.npz"), tmp_path / "a")
    s, _ = _stage_synset(_import_config(tmp_path / "u8.npz", **{"synset.import_stats": "pixels255"}),
                         tmp_path / "b")
    np.testing.assert_allclose(s.images, x, atol=0.01)  # the 8-bit rounding of the same pixels
    np.savez(tmp_path / "nchw.npz", images=x.transpose(0, 3, 1, 2), labels=y)
    with pytest.raises(ValueError, match=r"looks NCHW.*transpose\(0, 2, 3, 1\)"):
        _stage_synset(_import_config(tmp_path / "nchw.npz"), tmp_path / "c")


# ------------------------------------------------------------------ no bare tracebacks
def test_npz_metadata_that_is_not_an_object_is_one_clear_error(tmp_path):
    from elf_jax.synset import from_npz

    x, y = _normalized_digits()
    np.savez(tmp_path / "m.npz", images=x, labels=y, metadata_json=np.asarray("[1, 2]"))
    with pytest.raises(ValueError, match="metadata_json holds a list, not a JSON object"):
        from_npz(tmp_path / "m.npz")


@pytest.mark.parametrize("edit, words", [
    (lambda r: r.update(request=["a"]), "'request' is not a dict"),
    (lambda r: r.update(results={"ConvNet": ["task"]}), "'results' is not a dict of dicts"),
    (lambda r: r["results"]["ConvNet"]["task"].update(accs="0.5"), "accs' is not a list"),
    (lambda r: r.update(provenance={"teachers": []}), "'provenance.teachers' is not a dict"),
])
def test_a_results_file_edited_out_of_shape_is_one_clear_error(tmp_path, edit, words):
    import json

    from elf_jax import report

    r = {"dataset": "mnist5k", "results": {"ConvNet": {"task": {"accs": [0.5, 0.6]}}},
         "request": {"dataset": "mnist5k"}}
    edit(r)
    (tmp_path / "results.json").write_text(json.dumps(r))
    with pytest.raises(ValueError, match="is malformed") as err:
        report.load_report(str(tmp_path / "results.json"))
    assert words in str(err.value)


@pytest.mark.parametrize("kwargs, words", [
    ({"heads": 0}, "heads=0 must be an int >= 1"), ({"dim": -64}, "dim=-64 must be an int >= 1"),
    ({"dim": 64, "heads": 3}, "divisible by heads=3"), ({"split_block": 9}, "split_block"),
])
def test_model_sizes_are_checked_where_the_model_is_built(kwargs, words):
    c = _config(**{"eval.model_kwargs": {"ViT": kwargs}})
    with pytest.raises(ValueError, match="config.eval.model_kwargs.ViT") as err:
        check_config(c)
    assert words in str(err.value)


def test_a_pt_import_without_torch_is_one_line(tmp_path):
    ref = _reference_folder(tmp_path / "ref", *_normalized_digits())
    hide = tmp_path / "no_torch"
    hide.mkdir()
    (hide / "torch.py").write_text("raise ImportError('no torch here')\n")  # torch absent
    env = dict(ENV, PYTHONPATH=str(hide))
    proc = subprocess.run(
        [sys.executable, "-m", "elf_jax.cli", "evaluate", "--workdir", str(tmp_path / "wd"),
         "--config", str(DEMO), "--config.synset.source=import", f"--config.synset.path={ref}",
         "--config.eval.modes=('task',)"], capture_output=True, text=True, env=env, timeout=120)
    _one_line(proc, "needs torch", "pip install")
