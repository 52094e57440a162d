"""`elf-jax`: the command line.

    elf-jax demo                       the whole pipeline on the embedded mnist5k (no network)
    elf-jax train-teacher --config configs/cifar10_cross.py --workdir runs/c10
    elf-jax distill       --config ... --workdir ...
    elf-jax features      --config ... --workdir ...
    elf-jax evaluate      --config ... --workdir ...
    elf-jax report        --config ... --workdir ...
    elf-jax all           --config ... --workdir ...   (every stage, as the demo)

Any config field can be overridden: `--config.eval.repeats=3`. Every stage resumes from
what the workdir already holds. `features` and `evaluate` do not run earlier stages that
take long: without the teachers they need, or without a synthetic set when the config
distills one, they stop at once and say which command to run first (`all` runs them all).
A config's `parallel` section chooses data-parallel evaluation
(`configs/imagenet64_shard_map.py`); its `distributed` section starts
`jax.distributed` for several processes (fields left empty are read from
ELF_JAX_COORDINATOR / ELF_JAX_NUM_PROCESSES / ELF_JAX_PROCESS_ID).
"""

from __future__ import annotations

import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file (its get_config()); default for `demo`: the "
    "embedded mnist5k demo config.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for all outputs of the run.")

COMMANDS = ("demo", "all", "train-teacher", "distill", "features", "evaluate", "report")


def _log(msg: str) -> None:
    print(msg, flush=True)


def _main(argv) -> None:
    from elf_jax import pipeline

    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(
            f"usage: elf-jax {{{'|'.join(COMMANDS)}}} --config FILE --workdir DIR "
            f"[--config.key=value ...]; got {' '.join(argv[1:]) or 'no command'}")
    command = argv[1]
    # orbax logs every checkpoint step at INFO; our progress lines say what matters
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    if config is None:
        if command != "demo":
            raise app.UsageError(f"`elf-jax {command}` needs --config (e.g. configs/cifar10_cross.py)")
        from elf_jax.config import demo_config

        config = demo_config()
    workdir = _WORKDIR.value or ("runs/demo" if command == "demo" else None)
    if workdir is None:
        raise app.UsageError(f"`elf-jax {command}` needs --workdir DIR")
    if "distributed" in config:  # several processes: before anything else touches JAX
        from elf_jax.parallel import distributed

        info = distributed.initialize(config.distributed)
        if info["process_count"] > 1:
            _log(f"elf-jax: process {info['process_index']} of {info['process_count']}, "
                 f"{info['local_devices']} local / {info['devices']} devices")
    pipeline.set_logger(_log)
    start = time.perf_counter()
    if command in ("demo", "all"):
        _log(f"elf-jax {command}: dataset {config.dataset}, pool {list(config.eval.pool)}, "
             f"workdir {workdir}")
    stage = {"train-teacher": pipeline.stage_teachers, "distill": pipeline.stage_synset,
             "features": pipeline.stage_features, "evaluate": pipeline.stage_evaluate,
             "report": pipeline.stage_report}.get(command, pipeline.run_all)
    stage(pipeline.Run(config, workdir))
    _log(f"elf-jax {command}: finished in {time.perf_counter() - start:.0f} s")


def run() -> None:
    """Console-script entry point; errors from bad input end the run with their message."""
    try:
        app.run(_main)
    except (ValueError, FileNotFoundError) as err:
        print(f"elf-jax: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
