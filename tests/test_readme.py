"""The README's Python examples run as written (on tiny settings they already use)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_four_examples():
    assert len(_python_blocks()) == 4


@pytest.mark.slow
def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in _python_blocks():
        exec(compile(block.replace("/tmp/elf_", str(tmp_path / "elf_")), "README", "exec"),
             namespace)
    assert namespace["feat"].shape == (2, 4, 4, 512)
    assert namespace["logits"].shape == (2, 10)
    summary = namespace["out"]["summary"]
    assert set(summary) == {"ConvNet", "MLP"}
    results = namespace["out"]["results"]  # the MLP learns through an adapter, ConvNet not
    assert results["MLP"]["front_rear_task"]["adapter_params"] > 0
    assert results["ConvNet"]["front_rear_task"]["adapter_params"] == 0
    assert len(summary["MLP"]["gain_ci95"]) == 2
    assert all(0.0 <= summary[a]["task"]["mean"] <= 1.0 for a in summary)
    sweep = namespace["sweep"]
    assert len(sweep["mean"]) == 2 and len(sweep["mean"][0]) == 2
    assert set(sweep["gain"][1][1]) >= {"mean", "ci95"}
    assert (tmp_path / "elf_sweep" / "grid" / "checkpoints").is_dir()
