"""The command line explains itself: help, one-line errors for bad input, a workdir lock,
--overwrite, Ctrl-C. Each case drives the real `elf-jax` in a subprocess; none trains long."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from elf_jax.workdir import locked

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo_mnist5k.py")
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "elf_jax.cli", *args], capture_output=True,
                          text=True, env=ENV, timeout=timeout)


def _one_line_error(proc, *words):
    """rc 2, no traceback, one error line (the last on stderr; progress bars may precede
    it) naming `words`."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback (most recent call last)" not in proc.stderr, proc.stderr
    errors = [ln for ln in lines if ln.startswith("elf-jax: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def test_help_lists_the_commands_and_exits_0():
    top = _cli("--help")
    assert top.returncode == 0, top.stderr
    for command in ("demo", "all", "train-teacher", "distill", "features", "evaluate", "report",
                    "--config.FIELD=VALUE", "--overwrite", "--workdir"):
        assert command in top.stdout
    one = _cli("evaluate", "--help")
    assert one.returncode == 0 and "usage: elf-jax evaluate" in one.stdout
    assert "example:" in one.stdout and "--config" in one.stdout


def test_config_lists_every_field_with_overrides_applied():
    proc = _cli("config", "--config.eval.repeats=3")  # the demo config by default
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("eval.repeats="))
    assert line.startswith("eval.repeats=3") and "#" in line
    assert "(undocumented)" not in proc.stdout


@pytest.mark.parametrize("args, words", [
    (["all", "--config", DEMO, "--config.eval.repeets=1"], ["repeets", "'repeats'"]),
    (["all", "--config", DEMO, "--config.evl.repeats=1"], ["evl", "'eval'"]),
    (["all", "--config", "/no/such/config.py"], ["/no/such/config.py", "no such file"]),
    (["all", "--config", DEMO, "--config.eval.repeats=0"], ["eval.repeats=0", ">= 1"]),
    (["all", "--config", DEMO, "--config.eval.repeats=abc"], ["eval.repeats=abc"]),
    (["train-teacher", "--config", DEMO, "--config.dtype=fp32"], ["dtype", "float32"]),
    (["all", "--config", DEMO, "--config.eval.pool=('ConvNett',)"], ["ConvNett", "ConvNet"]),
    (["all", "--config", DEMO, "--config.teacher.feature_epoch=9"], ["feature_epoch=9", "epochs=8"]),
    (["all", "--config", DEMO, "--config.eval.kind=kl"], ["eval.kind", "ce"]),
    (["all", "--config", DEMO, "--config.eval.modes=('front_rear_tsak',)"], ["front_rear_task"]),
    (["all", "--config", DEMO, "--config.synset.source=import"], ["synset.path"]),
    (["demo", "--config.eval.lr=-0.01"], ["lr"]),  # demo takes overrides too
    (["frobnicate"], ["frobnicate", "evaluate"]),
    (["evaluate", "--workdir", "x"], ["--config"]),
])
def test_bad_input_is_one_line(tmp_path, args, words):
    _one_line_error(_cli(*args, "--workdir", str(tmp_path / "wd")), *words)
    assert not (tmp_path / "wd").exists()  # refused before anything was written


def test_unusable_workdirs_are_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    _one_line_error(_cli("all", "--config", DEMO, "--workdir", str(afile)), "is a file")
    _one_line_error(_cli("all", "--config", DEMO, "--workdir", str(afile / "sub")),
                    "cannot create")
    _one_line_error(_cli("report", "--config", DEMO, "--workdir", str(tmp_path / "none")),
                    "no workdir")


def test_a_busy_workdir_is_refused_naming_the_holder(tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    with locked(wd, "evaluate"):
        proc = _cli("evaluate", "--config", DEMO, "--workdir", str(wd))
    _one_line_error(proc, "in use by `elf-jax evaluate`", f"pid {os.getpid()}")
    # released: the same command now gets past the lock (to its own missing prerequisites)
    _one_line_error(_cli("evaluate", "--config", DEMO, "--workdir", str(wd)), "train-teacher")


def test_overwrite_removes_a_stage_and_what_was_computed_from_it(tmp_path):
    wd = tmp_path / "wd"
    for rel in ("teachers/ConvNet/x", "distill/synset_best", "banks/ConvNet", "eval/ConvNet"):
        (wd / rel).mkdir(parents=True)
    (wd / "results.json").write_text("{}")
    # a stage the command does not compute is refused, nothing removed
    _one_line_error(_cli("report", "--config", DEMO, "--workdir", str(wd), "--overwrite=teacher"),
                    "does not compute")
    _one_line_error(_cli("all", "--config", DEMO, "--workdir", str(wd), "--overwrite=bank"),
                    "--overwrite=bank", "features")
    assert (wd / "teachers").exists() and (wd / "results.json").exists()

    from elf_jax import pipeline
    from elf_jax.config import demo_config

    # a distilled set is not recomputed by features / evaluate / sweep: refused before any
    # stage of the list is removed (it used to delete the set, then refuse to run)
    for command in ("features", "evaluate", "sweep"):
        with pytest.raises(ValueError, match="nothing was removed.*elf-jax distill"):
            pipeline.overwrite(pipeline.Run(demo_config(), wd), ["features", "synset"], command)
        assert all((wd / rel).exists() for rel in ("distill", "banks", "eval", "results.json"))
    # the banks stand in for a teacher this workdir no longer has: removing them would stop
    # `evaluate` (no teacher to rebuild them from), so it is refused before removing anything
    with pytest.raises(FileNotFoundError, match="no teacher ConvNetW32.*nothing was removed"):
        pipeline.overwrite(pipeline.Run(demo_config(), wd), ["features"], "evaluate")
    assert all((wd / rel).exists() for rel in ("distill", "banks", "eval", "results.json"))
    (wd / "teachers/ConvNetW32/expert_000/trajectory/8").mkdir(parents=True)  # a teacher
    removed = pipeline.overwrite(pipeline.Run(demo_config(), wd), ["features"], "evaluate")
    assert sorted(p.name for p in removed) == ["banks", "eval", "results.json"]
    assert (wd / "teachers").exists() and (wd / "distill").exists()
    removed = pipeline.overwrite(pipeline.Run(demo_config(), wd), ["teacher"], "all")
    assert [p.name for p in removed] == ["teachers"] and (wd / "distill").exists()


def test_a_diverged_evaluation_is_one_line(tmp_path):
    proc = _cli("evaluate", "--config", DEMO, "--workdir", str(tmp_path / "wd"),
                "--config.synset.source=real_random", "--config.synset.ipc=2",
                "--config.eval.modes=('task',)", "--config.eval.pool=('ConvNet',)",
                "--config.eval.epochs=3", "--config.eval.repeats=1", "--config.eval.lr=1e30")
    _one_line_error(proc, "diverged")


def test_ctrl_c_exits_cleanly_and_releases_the_workdir(tmp_path):
    wd = tmp_path / "wd"
    proc = subprocess.Popen(
        [sys.executable, "-m", "elf_jax.cli", "train-teacher", "--config", DEMO, "--workdir",
         str(wd), "--config.teacher.epochs=50", "--config.teacher.feature_epoch=50"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 240
    while not (wd / ".elf_jax.lock").exists() or not (wd / "teachers").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.5)
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out[-2000:], err[-2000:])
    assert "interrupted" in err and "Traceback" not in err, err
    holder = json.loads((wd / ".elf_jax.lock").read_text())
    assert holder["command"] == "train-teacher"
    with locked(wd, "report"):  # the lock went with the process
        pass


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.py")), ids=lambda p: p.stem)
def test_every_shipped_config_is_declared_documented_and_valid(path):
    import importlib.util

    from elf_jax.config import FIELD_DOCS, base_config, check_config, fields

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert "Command" in module.__doc__ or "elf-jax" in module.__doc__  # says how to run it
    undocumented = [k for k in fields(config) if k not in FIELD_DOCS]
    assert not undocumented
    # a config file may add the parallel/distributed sections, nothing else undeclared
    extra = {k for k in fields(config) if k not in fields(base_config())}
    assert all(k.split(".")[0] in ("parallel", "distributed") for k in extra), extra
    check_config(config)


def _docstring_commands(text: str) -> list[list[str]]:
    """Every `elf-jax ...` command line of a docstring, continuation lines joined, as words
    (comments and `...` placeholders dropped)."""
    import re
    import shlex

    text = text.replace("\\\n", " ")
    commands = []
    for match in re.finditer(r"elf-jax [^`\n]*", text):
        words = shlex.split(match.group(0).split("#")[0], posix=True)
        commands.append([w for w in words if w != "..."])
    return commands


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.py")), ids=lambda p: p.stem)
def test_every_config_docstring_command_runs_as_written(path):
    """Each command a config's docstring gives names a real command, this file and fields
    that exist with values check_config accepts (parsed as the CLI would, not run)."""
    import ast
    import importlib.util

    from elf_jax.cli import COMMANDS
    from elf_jax.config import check_config

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    commands = _docstring_commands(module.__doc__)
    assert commands, "the docstring gives no `elf-jax` command"
    for words in commands:
        assert all(c in COMMANDS for c in words[1].split("|")), words
        config = module.get_config()
        for i, w in enumerate(words):
            if w == "--config":
                assert (ROOT / words[i + 1]).resolve() == path, words
            elif w.startswith("--config="):
                assert (ROOT / w.split("=", 1)[1]).resolve() == path, words
            elif w.startswith("--config."):
                name, _, value = w[len("--config."):].partition("=")
                try:
                    value = ast.literal_eval(value)
                except (ValueError, SyntaxError):
                    pass  # a bare string, as absl reads it
                config.update_from_flattened_dict({name: value})
        check_config(config)


def test_each_commands_help_lists_fields_that_exist():
    from elf_jax import cli
    from elf_jax.config import base_config, fields

    declared = fields(base_config())
    for command in cli.COMMANDS:
        if command == "config":
            continue
        assert "config fields it reads:" in cli.usage(command)
        for name in cli._READS[command]:
            assert name.startswith("(") or name in declared or any(
                f.startswith(name + ".") for f in declared), (command, name)
