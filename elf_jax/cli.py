"""`elf-jax`: the command line (`elf-jax --help` lists the commands, `elf-jax COMMAND --help`
explains one).

Errors from bad input (config values, paths, files, a busy workdir, a diverged training)
end the run with one line on stderr and exit code 2; `--debug` shows the traceback instead.
Ctrl-C stops cleanly (exit 130): what was checkpointed stays, and the same command resumes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
import zipfile
from pathlib import Path

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file (its get_config()).", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for all outputs of the run.")
_OVERWRITE = flags.DEFINE_list("overwrite", [], "Stages to recompute (comma separated).")
_DEBUG = flags.DEFINE_bool("debug", False, "Show Python tracebacks for errors.")

# command: (what it does, example)
COMMANDS = {
    "demo": ("every stage on the embedded real mnist5k, offline (2 CPU cores: ~3.5 min Intel, "
             "~7 min AMD); "
             "--config defaults to the demo config, --workdir to runs/demo",
             "elf-jax demo --workdir runs/demo --config.eval.repeats=1"),
    "all": ("every stage in order: teachers, synthetic set, feature banks, evaluation, report",
            "elf-jax all --config configs/cifar10_cross.py --workdir runs/c10"),
    "train-teacher": ("train the teacher(s) the pool needs on the real training set",
                      "elf-jax train-teacher --config configs/cifar10_cross.py --workdir runs/c10"),
    "distill": ("make the synthetic set: distill (dc|dsa|dm|mtt|tesla), import, or real_random",
                "elf-jax distill --config configs/distill_dm.py --workdir runs/dm"),
    "features": ("build each teacher's feature bank on the synthetic set",
                 "elf-jax features --config configs/cifar10_cross.py --workdir runs/c10"),
    "evaluate": ("train the pool on the synthetic set with and without ELF; writes "
                 "results.json as each (architecture, mode) finishes, then prints the table "
                 "and writes results.md/png as `report` does",
                 "elf-jax evaluate --config configs/cifar10_cross.py --workdir runs/c10 "
                 "--config.eval.repeats=3"),
    "report": ("print the results table and write results.{json,md,png}",
               "elf-jax report --config configs/cifar10_cross.py --workdir runs/c10"),
    "sweep": ("train config.sweep's lambda_front x lambda_rear grid in the ELF mode (one "
              "compiled program per architecture) and the task baseline; writes "
              "sweep.{json,md,png} (tables, heatmap)",
              "elf-jax sweep --config configs/sweep_mnist5k.py --workdir runs/demo"),
    "config": ("print every config field with its value and a one-line description",
               "elf-jax config --config configs/cifar10_cross.py --config.eval.repeats=3"),
}

FLAGS_HELP = """\
flags:
  --config FILE           a configs/*.py file whose get_config() gives the settings
                          (`demo` and `config` default to the demo's)
  --workdir DIR           where every stage writes; a rerun resumes from what it holds
  --config.FIELD=VALUE    override one field, e.g. --config.eval.repeats=3,
                          --config.eval.pool="('ConvNet','VGG11')"; `elf-jax config` lists them;
                          a field given twice takes the last value (tuples too)
  --overwrite=STAGE,...   recompute teacher | synset | features | evaluate | sweep
                          (removes that stage's outputs, and those computed from them, first)
  --debug                 show Python tracebacks instead of one-line errors
  --help                  this help"""


def usage(command: str | None = None) -> str:
    """The help text: every command, or one command in detail."""
    if command in COMMANDS:
        what, example = COMMANDS[command]
        reads = f"config fields it reads:\n{_fields_read(command)}\n\n" if command != "config" else ""
        return (f"usage: elf-jax {command} [flags]\n\n{what}.\n\nexample:\n  {example}\n\n"
                f"{reads}{FLAGS_HELP}\n")
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {what}" for name, (what, _) in COMMANDS.items())
    return (f"usage: elf-jax COMMAND [--config FILE] [--workdir DIR] [--config.FIELD=VALUE ...]\n\n"
            f"commands:\n{rows}\n\n{FLAGS_HELP}\n\nexamples:\n  elf-jax demo\n"
            f"  {COMMANDS['all'][1]} --config.eval.repeats=3\n"
            "  elf-jax evaluate --help\n")


# The config sections (or single fields) each command reads; the data and run settings
# (dataset, data_dir, data_mode, stream_above_gb, zca, stats, seed, dtype) are read by all
# that train or load data.
_DATA = ("dataset", "data_dir", "data_mode", "stream_above_gb", "zca", "stats", "seed", "dtype",
         "validation")
_READS = {
    "train-teacher": _DATA + ("teacher", "parallel", "distributed"),
    "distill": _DATA + ("synset",),
    "features": _DATA + ("teacher", "synset", "bank", "eval.pool", "eval.modes", "eval.width",
                         "eval.model_kwargs", "eval.adapter"),
    "evaluate": _DATA + ("teacher", "synset", "bank", "eval", "parallel", "distributed"),
    "sweep": _DATA + ("teacher", "synset", "bank", "eval", "sweep", "parallel", "distributed"),
    "report": ("(results.json, and the config to say whether the results are its own: the "
               "evaluate fields)",),
}
_READS["all"] = _READS["demo"] = _DATA + ("teacher", "synset", "bank", "eval", "parallel",
                                          "distributed")


def _fields_read(command: str) -> str:
    """The config fields `command` reads, wrapped: a section name stands for its fields
    (`elf-jax config` prints each with its value and meaning)."""
    import textwrap

    names = [n if n.startswith("(") or "." in n or n in _DATA else f"{n}.*"
             for n in _READS[command]]
    return textwrap.fill(", ".join(names), 92, initial_indent="  ", subsequent_indent="  ")


class UsageError(ValueError):
    """A command line that cannot run; the message says what to type instead."""


def _log(msg: str) -> None:
    print(msg, flush=True)


def _command(argv) -> str | None:
    """The first positional argument (the command), if any."""
    rest = [a for a in argv[1:] if not a.startswith("-")]
    # `--config FILE` / `--workdir DIR` take the next word
    for i, a in enumerate(argv[1:-1], 1):
        if a in ("--config", "--workdir", "--overwrite") and argv[i + 1] in rest:
            rest.remove(argv[i + 1])
    return rest[0] if rest else None


def _with_default_config(argv: list[str], command: str | None) -> list[str]:
    """`demo` and `config` without --config read the demo config, so that their
    `--config.x=y` overrides parse."""
    if command in ("demo", "config") and _config_path(argv) is None:
        from elf_jax import config as config_module

        return [argv[0], f"--config={config_module.__file__}", *argv[1:]]
    return argv


def _config_path(argv) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _parse_flags(argv):
    """absl parsing with every failure as one `UsageError` line (an unknown config field gets
    the nearest declared name; a config file that does not load gets its file and line)."""
    path = _config_path(argv)
    if path is not None and not Path(path.split(":", 1)[0]).is_file():
        raise UsageError(f"--config {path}: no such file (config files are in configs/)")
    argv = _last_of_each_override(argv)
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as err:  # ml_collections: an undeclared field
        if path is not None and _raised_in(err, path):
            raise UsageError(_config_file_error(path, err)) from None
        raise UsageError(_unknown_field(str(err), argv)) from None
    except flags.Error as err:
        raise UsageError(f"{err}".splitlines()[0] + "; `elf-jax --help` lists the flags") from None
    except Exception as err:  # the config file itself: not Python, or get_config() failed
        if path is None or "--debug" in argv:
            raise
        raise UsageError(_config_file_error(path, err)) from None


def _last_of_each_override(argv: list[str]) -> list[str]:
    """`argv` with only the last `--config.FIELD=VALUE` of each field: a repeated override
    replaces the earlier one, for tuple fields too (ml_collections would concatenate
    repeated tuple flags: `--config.eval.pool=('ConvNet',)` then `=('MLP',)` made both)."""
    last = {a.split("=", 1)[0]: i for i, a in enumerate(argv)
            if a.startswith("--config.") and "=" in a}
    return [a for i, a in enumerate(argv) if not (
        a.startswith("--config.") and "=" in a and last[a.split("=", 1)[0]] != i)]


def _config_file(path: str) -> Path:
    return Path(path.split(":", 1)[0]).resolve()


def _raised_in(err: BaseException, path: str) -> bool:
    """Whether `err` was raised by code of the config file `path` (or is its syntax error)."""
    if isinstance(err, SyntaxError):
        return bool(err.filename) and Path(err.filename).resolve() == _config_file(path)
    tb = err.__traceback__
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).resolve() == _config_file(path):
            return True
        tb = tb.tb_next
    return False


def _config_file_error(path: str, err: BaseException) -> str:
    """One line for a config file that does not load: where (file and line) and why."""
    line = err.lineno if isinstance(err, SyntaxError) else None
    tb = err.__traceback__
    while tb is not None:  # the innermost frame in the config file
        if Path(tb.tb_frame.f_code.co_filename).resolve() == _config_file(path):
            line = tb.tb_lineno
        tb = tb.tb_next
    where = f"{path}, line {line}" if line else path
    why = err.msg if isinstance(err, SyntaxError) else str(err).splitlines()[0] if str(err) else ""
    return (f"--config {where}: {type(err).__name__}{': ' + why if why else ''} (a config file "
            "is Python whose get_config() returns an ml_collections.ConfigDict; --debug shows "
            "the traceback)")


def _unknown_field(message: str, argv) -> str:
    """'unknown config field ...' with ml_collections' suggestion, for `message` (its
    KeyError/AttributeError text: the bad key, maybe 'Did you mean "x" instead of "y"?')."""
    message = message.encode().decode("unicode_escape")
    bad = re.search(r"'([^'\\]+)'", message)
    near = re.search(r'Did you mean "([^"]+)"', message)
    arg = next((a for a in argv if a.startswith("--config.") and bad and bad.group(1) in a), "")
    where = f" in {arg.split('=', 1)[0]}" if arg else ""
    hint = f"; did you mean {near.group(1)!r}?" if near else ""
    return (f"unknown config field {bad.group(1) if bad else '?'!r}{where}{hint} "
            "(`elf-jax config --config FILE` lists every field)")


def _main(argv) -> None:
    from elf_jax import pipeline

    positional = argv[1:]
    if len(positional) != 1 or positional[0] not in COMMANDS:
        raise UsageError(f"unknown command {' '.join(positional) or '(none)'}; choose one of "
                         f"{', '.join(COMMANDS)} (`elf-jax --help`)")
    command = positional[0]
    # orbax logs every checkpoint step at INFO; our progress lines say what matters
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    if config is None:
        raise UsageError(f"`elf-jax {command}` needs --config FILE (e.g. configs/cifar10_cross.py)")
    if not isinstance(config, ml_collections.ConfigDict):
        raise UsageError(f"--config {flags.FLAGS['config'].config_filename}: get_config() returned "
                         f"{type(config).__name__}, not an ml_collections.ConfigDict (start from "
                         "elf_jax.config.base_config())")
    if command == "config":
        from elf_jax.config import check_config, describe

        print(describe(config))
        check_config(config)
        return
    workdir = _WORKDIR.value or ("runs/demo" if command == "demo" else None)
    if workdir is None:
        raise UsageError(f"`elf-jax {command}` needs --workdir DIR")
    run = pipeline.Run(config, workdir)  # checks every config value first
    from elf_jax import workdir as workdir_lib

    workdir_lib.check_usable(run.workdir, create=command != "report")
    if "distributed" in config:  # several processes: before anything else touches JAX
        from elf_jax.parallel import distributed

        info = distributed.initialize(config.distributed)
        if info["process_count"] > 1:
            _log(f"elf-jax: process {info['process_index']} of {info['process_count']}, "
                 f"{info['local_devices']} local / {info['devices']} devices")
    import jax

    pipeline.set_logger(_log)
    lock = (workdir_lib.locked(run.workdir, command) if jax.process_index() == 0
            else contextlib.nullcontext())
    with lock:
        _run(pipeline, run, command)


def _run(pipeline, run, command: str) -> None:
    if _OVERWRITE.value:
        pipeline.overwrite(run, _OVERWRITE.value, command)
    start = time.perf_counter()
    if command in ("demo", "all"):
        _log(f"elf-jax {command}: dataset {run.config.dataset}, pool {list(run.config.eval.pool)}, "
             f"workdir {run.workdir}")
    stage = {"train-teacher": pipeline.stage_teachers, "distill": pipeline.stage_synset,
             "features": pipeline.stage_features,
             # the table as `report` prints it (and results.md/png), from the fresh results
             "evaluate": lambda r: pipeline.stage_report(r, pipeline.stage_evaluate(r)),
             "report": pipeline.stage_report,
             "sweep": pipeline.stage_sweep}.get(command, pipeline.run_all)
    stage(run)
    _log(f"elf-jax {command}: finished in {time.perf_counter() - start:.0f} s")
    if (run.workdir / "tb").is_dir() and command != "report":
        _log(f"curves: tensorboard --logdir {run.workdir / 'tb'}")


def _user_errors() -> tuple:
    """Exceptions that mean bad input or a state the user must act on (not our bugs)."""
    from elf_jax.interop.torch import TorchNotInstalled
    from elf_jax.train.runner import TrainingDiverged

    return (ValueError, OSError, zipfile.BadZipFile, TrainingDiverged, TorchNotInstalled)


def _on_interrupt(signum, frame) -> None:
    """Ctrl-C: say what is kept and leave at once. Not a KeyboardInterrupt: one raised inside
    a garbage-collection callback (JAX has one) is printed and ignored, and checkpoint
    threads can hang the interpreter's exit; checkpoints are written atomically, so stopping
    anywhere is safe (the SIGKILL tests), and the kernel drops the workdir lock."""
    workdir = _WORKDIR.value if flags.FLAGS.is_parsed() else None
    print(f"\nelf-jax: interrupted. Finished stages and the last checkpoint of the running "
          f"one are kept{f' in {workdir}' if workdir else ''}: run the same command again "
          "to resume.", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130)


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    argv = list(sys.argv if argv is None else argv)
    command = _command(argv)
    if any(a in ("--help", "-h", "--helpshort", "--helpfull", "help") for a in argv[1:]):
        print(usage(command), end="")
        sys.exit(0)
    debug = "--debug" in argv or "--debug=true" in argv
    if not debug:
        signal.signal(signal.SIGINT, _on_interrupt)
    try:
        app.run(_main, argv=_with_default_config(argv, command), flags_parser=_parse_flags)
    except _user_errors() as err:
        if debug:
            raise
        # our own messages say what to do; a system error may need the traceback
        hint = " (--debug shows the traceback)" if isinstance(err, OSError) else ""
        print(f"elf-jax: error: {err}{hint}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
