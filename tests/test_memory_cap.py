"""Bounded host memory: the streamed pipeline runs under a memory cap that the in-memory one
exceeds.

A local stand-in for ImageNet-64 (tests/_standin.py: 64x64x3, 10 classes, 9,000 train and
1,000 test images; 442 MB as float32, several times the budget) runs the pipeline of
configs/imagenet64.py, shrunk (a width-8 teacher for 1 epoch, 2 DM iterations, IPC 1, one
width-8 pool net, 2 evaluation epochs), with `data_mode=stream`, in a child process whose
resident memory is capped: a watchdog thread kills it (exit 3) the moment its RSS exceeds
the cap, and the kernel's peak (VmHWM) is read after the run. The cap is the peak of the
same pipeline on the small stand-in (imports, compilations, the compute buffers of the same
batch shapes: what does not grow with the data) plus `BUDGET_MB`. Then, under the same cap,
the child loads the large split in memory as `data_mode=memory` would, and is killed.
"""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))
import _standin  # noqa: E402
import _xla  # noqa: E402

BUDGET_MB = int(os.environ.get("ELF_JAX_TEST_BUDGET_MB", 100))
CAP_EXIT = 3


# ------------------------------------------------------------------------- in the child
def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := current RSS
        f.write("5")


def _enforce(cap_mb: float) -> None:
    """Kills this process (exit `CAP_EXIT`) the moment its resident memory exceeds `cap_mb`."""
    def watch():
        while True:
            rss = _status_mb("VmRSS")
            if rss > cap_mb:
                print(f"MEMORY CAP: resident {rss:.0f} MB > cap {cap_mb:.0f} MB", file=sys.stderr,
                      flush=True)
                os._exit(CAP_EXIT)
            threading.Event().wait(0.002)

    threading.Thread(target=watch, daemon=True).start()


def _config(size: str, data_dir: str, mode: str, module: str = "imagenet64"):
    """`configs/<module>.py` shrunk to the stand-in `size`."""
    import importlib

    sys.path.insert(0, str(ROOT / "configs"))
    c = importlib.import_module(module).get_config()
    c.dataset, c.data_dir, c.data_mode = f"elf_standin_{size}", data_dir, mode
    c.teacher.epochs = c.teacher.feature_epoch = 1
    c.teacher.override_arch, c.teacher.model_kwargs = "ConvNetD4", {"width": 8}
    c.teacher.batch_size = 64
    c.synset.iterations, c.synset.ipc, c.synset.batch_real = 2, 1, 16
    c.synset.model_kwargs = {"width": 8}
    c.eval.width, c.eval.pool = 8, ["ConvNetD4BN"]
    c.eval.epochs, c.eval.repeats = 2, 1
    return c


def _child(data_dir: str, workdir: str) -> None:
    _standin.register()
    from elf_jax import pipeline
    from elf_jax.data.stream import open_split

    def run_all(size, mode="stream"):
        run = pipeline.Run(_config(size, data_dir, mode), Path(workdir) / size)
        pipeline.run_all(run)
        return json.loads((run.workdir / "results.json").read_text())

    run_all("small")  # what does not grow with the data: imports, compilations, buffers
    cap = _status_mb("VmHWM") + BUDGET_MB
    _reset_peak()
    _enforce(cap)
    results = run_all("large")["results"]
    accs = {a: {m: r["mean"] for m, r in v.items()} for a, v in results.items()}
    print("RESULT " + json.dumps({"cap_mb": cap, "peak_mb": _status_mb("VmHWM"), "accs": accs}),
          flush=True)
    print("IN MEMORY", flush=True)  # what data_mode=memory does first: the killed part
    open_split("elf_standin_large", "train", mode="memory", data_dir=data_dir, cache=False)
    print("IN MEMORY LOADED", flush=True)


# ------------------------------------------------------------------------- the test
def test_streamed_pipeline_runs_under_a_cap_the_in_memory_one_exceeds(tmp_path, capsys):
    from elf_jax.data import tfds_source
    from elf_jax.data.stream import float32_gb

    _standin.register()
    for info in _standin.INFOS.values():  # prepared once, here (the child reads them)
        tfds_source.ensure_prepared(info, str(tmp_path / "data"))
    large_mb = float32_gb(_standin.INFOS["large"], _standin.SIZES["large"]["train"]) * 1e3
    assert large_mb > 4 * BUDGET_MB

    # at XLA's default code generation: the claim is about the memory of what users run (with
    # the tests' fast-compile settings, tests/_xla.py, the large run's peak reached the cap)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": _xla.default_codegen_flags()}
    child = subprocess.run([sys.executable, str(HERE), str(tmp_path / "data"), str(tmp_path / "wd")],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    lines = child.stdout.splitlines()
    assert any(l.startswith("RESULT ") for l in lines), child.stderr[-4000:]
    s = json.loads([l for l in lines if l.startswith("RESULT ")][-1][7:])
    with capsys.disabled():
        print(f"\n[memory cap] train split {large_mb:.0f} MB as float32; streamed pipeline peak "
              f"{s['peak_mb']:.0f} MB under a cap of {s['cap_mb']:.0f} MB (warm-up peak + "
              f"{BUDGET_MB} MB); accuracies {s['accs']}")
    assert s["peak_mb"] <= s["cap_mb"]
    assert set(s["accs"]) == {"ConvNetD4BN"}
    # the in-memory load, under the same cap, is killed before it completes
    assert "IN MEMORY" in lines and "IN MEMORY LOADED" not in lines
    assert child.returncode == CAP_EXIT and "MEMORY CAP" in child.stderr, child.stderr[-3000:]


def _mesh_child(data_dir: str, workdir: str) -> None:
    _standin.register()
    import jax

    from elf_jax import pipeline

    config = _config("small", data_dir, "stream", "imagenet64_shard_map")
    run = pipeline.Run(config, Path(workdir))
    pipeline.run_all(run)
    results = json.loads((run.workdir / "results.json").read_text())["results"]
    accs = {a: {m: r["mean"] for m, r in v.items()} for a, v in results.items()}
    print("RESULT " + json.dumps({"devices": jax.device_count(), "accs": accs,
                                  "strategy": results["ConvNetD4BN"]["task"]["strategy"]}))


@pytest.mark.slow  # tests/test_parallel_e2e.py runs this config streamed on 8 devices
def test_imagenet64_shard_map_config_streams_on_a_mesh(tmp_path):
    """configs/imagenet64_shard_map.py, shrunk, streamed, end to end on two devices."""
    from elf_jax.data import tfds_source

    _standin.register()
    tfds_source.ensure_prepared(_standin.INFOS["small"], str(tmp_path / "data"))
    flags = os.environ.get("XLA_FLAGS", "")  # the tests' own (conftest.py), and 2 devices
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=2"}
    child = subprocess.run([sys.executable, str(HERE), "mesh", str(tmp_path / "data"),
                            str(tmp_path / "wd")], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=900)
    assert child.returncode == 0, child.stderr[-4000:]
    s = json.loads([l for l in child.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
    assert s["devices"] == 2 and "data=2" in s["strategy"]
    assert set(s["accs"]["ConvNetD4BN"]) == {"task", "front_rear_task"}
    out = child.stdout + child.stderr
    assert "[data] elf_standin_small train: streamed" in out
    assert "[data] elf_standin_small test: streamed" in out


if __name__ == "__main__":
    if sys.argv[1] == "mesh":
        _mesh_child(*sys.argv[2:4])
    else:
        _child(*sys.argv[1:3])
