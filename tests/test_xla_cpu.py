"""elf_jax's XLA:CPU setting (elf_jax/xla_cpu.py): added to XLA_FLAGS on import unless the
user set YNN fusions or opted out, and in effect in a fresh process that imports elf_jax
(its convolutions run as XLA's own, not as YNNPACK fusions: the profiler's trace says
which ran)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from elf_jax import xla_cpu

ROOT = Path(__file__).resolve().parents[1]
_COMPILED = """
import glob, gzip, json, tempfile
import elf_jax, jax, jax.numpy as jnp
from jax import lax
x, k = jnp.ones((8, 32, 32, 64)), jnp.ones((3, 3, 64, 64))  # large enough for YNNPACK
f = jax.jit(lambda x, k: lax.conv_general_dilated(
    x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")))
f(x, k).block_until_ready()
with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):  # what ran: YNN fusions or XLA's
        f(x, k).block_until_ready()
    events = json.load(gzip.open(glob.glob(d + "/**/*.trace.json.gz", recursive=True)[0]))
names = [e.get("name", "") for e in events["traceEvents"] if isinstance(e, dict)]
print("YNN" if any("ynn" in n.lower() for n in names) else "XLA")
"""


def test_apply_defaults(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    xla_cpu.apply_defaults()
    assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2",
                                               xla_cpu.MULTI_THREADED_CONVS]
    assert not xla_cpu.ynn_convolutions()
    xla_cpu.apply_defaults()  # once only
    assert os.environ["XLA_FLAGS"].count(xla_cpu.YNN_FUSION) == 1
    own = f"{xla_cpu.YNN_FUSION}=+LIBRARY_FUSION_TYPE_DOT"  # the user's choice wins
    monkeypatch.setenv("XLA_FLAGS", own)
    xla_cpu.apply_defaults()
    assert os.environ["XLA_FLAGS"] == own and xla_cpu.ynn_convolutions()
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("ELF_JAX_XLA_CPU_DEFAULTS", "0")  # opted out
    xla_cpu.apply_defaults()
    assert os.environ["XLA_FLAGS"] == "" and xla_cpu.ynn_convolutions()
    monkeypatch.setenv("ELF_JAX_XLA_CPU_DEFAULTS", "off")  # not a value: one clear line
    with pytest.raises(ValueError, match="ELF_JAX_XLA_CPU_DEFAULTS='off': use 1"):
        xla_cpu.apply_defaults()


def test_in_effect_in_a_fresh_process():
    def compiled(**env):
        base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        out = subprocess.run([sys.executable, "-c", _COMPILED], env={**base, **env,
                             "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)},
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()[-1]

    assert compiled() == "XLA"
    assert compiled(ELF_JAX_XLA_CPU_DEFAULTS="0") == "YNN"  # XLA's default: YNNPACK
