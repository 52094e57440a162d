"""The README's Python examples run as written (on tiny settings they already use)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_three_examples():
    assert len(_python_blocks()) == 3


@pytest.mark.slow
def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in _python_blocks():
        exec(compile(block.replace("/tmp/elf_teacher", str(tmp_path / "teacher")), "README", "exec"),
             namespace)
    assert namespace["feat"].shape == (2, 4, 4, 512)
    assert namespace["logits"].shape == (2, 10)
    summary = namespace["out"]["summary"]
    assert set(summary) == {"ConvNet", "ConvNetBN"}
    assert all(0.0 <= summary[a]["task"]["mean"] <= 1.0 for a in summary)
