"""Bounded host memory: the streamed pipeline runs under a memory cap that the in-memory one
exceeds.

A local stand-in for ImageNet-64 (tests/_standin.py: 64x64x3, 10 classes, 9,000 train and
500 test images; 442 MB as float32, several times the budget) runs the pipeline of
configs/imagenet64.py, shrunk (1 teacher epoch, 2 DM iterations, IPC 1, width 8, two pool
nets, 2 evaluation epochs), with `data_mode=stream`, in a child process whose resident
memory is capped: a watchdog thread kills the process (exit 3) as soon as its RSS exceeds
the cap, and the kernel's peak (VmHWM) is checked after the run. The cap is the RSS after
the same pipeline ran on the small stand-in (imports, compilations, thread pools: what does
not grow with the data) plus `BUDGET_MB`. The in-memory path (`data_mode=memory`), capped the
same way, is killed while loading the split.
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

BUDGET_MB = 100
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


def _config(size: str, data_dir: str, mode: str):
    sys.path.insert(0, str(ROOT / "configs"))
    import imagenet64

    c = imagenet64.get_config()
    c.dataset, c.data_dir, c.data_mode = f"elf_standin_{size}", data_dir, mode
    c.teacher.epochs = c.teacher.feature_epoch = 1
    c.synset.iterations, c.synset.ipc, c.synset.batch_real = 2, 1, 16
    c.synset.model_kwargs = {"width": 8}
    c.eval.width, c.eval.pool = 8, ["ConvNetD4", "ConvNetD4BN"]
    c.eval.epochs, c.eval.repeats = 2, 1
    return c


def _child(mode: str, data_dir: str, workdir: str) -> None:
    _standin.register()
    from elf_jax import pipeline

    def run_all(size):
        run = pipeline.Run(_config(size, data_dir, mode), Path(workdir) / size)
        pipeline.run_all(run)
        return json.loads((run.workdir / "results.json").read_text())

    out = {}
    if mode == "stream":
        run_all("small")  # what does not grow with the data: imports, compilations, pools
    base = _status_mb("VmRSS")
    _enforce(base + BUDGET_MB)
    _reset_peak()
    if mode == "stream":
        results = run_all("large")["results"]
        out["accs"] = {a: {m: r["mean"] for m, r in v.items()} for a, v in results.items()}
    else:
        from elf_jax.data.stream import open_split

        open_split("elf_standin_large", "train", mode="memory", data_dir=data_dir, cache=False)
    out.update(base_mb=base, peak_mb=_status_mb("VmHWM"))
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------- the test
def _run_child(mode, data_dir, workdir):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(HERE), mode, str(data_dir), str(workdir)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_streamed_pipeline_runs_under_a_cap_the_in_memory_one_exceeds(tmp_path, capsys):
    from elf_jax.data import tfds_source
    from elf_jax.data.stream import float32_gb

    _standin.register()
    for info in _standin.INFOS.values():  # prepared once, here (the children read it)
        tfds_source.ensure_prepared(info, str(tmp_path / "data"))
    large_mb = float32_gb(_standin.INFOS["large"], _standin.SIZES["large"]["train"]) * 1e3
    assert large_mb > 4 * BUDGET_MB

    streamed = _run_child("stream", tmp_path / "data", tmp_path / "stream")
    assert streamed.returncode == 0, streamed.stderr[-4000:]
    s = json.loads([l for l in streamed.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
    grew = s["peak_mb"] - s["base_mb"]
    with capsys.disabled():
        print(f"\n[memory cap] train split {large_mb:.0f} MB as float32; streamed pipeline: "
              f"resident {s['base_mb']:.0f} MB after the warm-up, peak +{grew:.0f} MB "
              f"(budget {BUDGET_MB} MB); accuracies {s['accs']}")
    assert grew <= BUDGET_MB
    assert set(s["accs"]) == {"ConvNetD4", "ConvNetD4BN"}

    in_memory = _run_child("memory", tmp_path / "data", tmp_path / "memory")
    assert in_memory.returncode == CAP_EXIT, (in_memory.returncode, in_memory.stderr[-3000:])
    assert "MEMORY CAP" in in_memory.stderr


if __name__ == "__main__":
    _child(*sys.argv[1:4])
