import math
import os

import pytest

from elf_jax import report


RESULTS = {
    "ConvNet": {"task": {"accs": [0.80, 0.82]}, "front_rear_task": {"accs": [0.85, 0.87]}},
    "ResNet18": {"task": {"accs": [0.70]}, "front_rear_task": {"accs": [0.65]}},
}


def test_summary_means_stds_and_gain():
    rows = report.summarize(RESULTS)
    conv = rows["ConvNet"]
    assert conv["task"]["mean"] == pytest.approx(0.81)
    assert conv["task"]["std"] == pytest.approx(0.01)
    assert conv["gain"] == pytest.approx(0.05)
    assert rows["ResNet18"]["gain"] == pytest.approx(-0.05)
    assert rows["ResNet18"]["task"]["std"] == 0.0


def test_tables_show_percent_and_signed_gain():
    rows = report.summarize(RESULTS)
    md = report.markdown_table(rows)
    assert "| ConvNet | 81.00 ± 1.00 | 86.00 ± 1.00 | +5.00 |" in md
    assert "-5.00" in report.text_table(rows)


def test_write_report_files(tmp_path):
    paths = report.write_report({"results": RESULTS, "dataset": "mnist5k"}, str(tmp_path), "t")
    for p in paths.values():
        assert os.path.getsize(p) > 0
    with open(paths["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    loaded = report.load_report(paths["json"])
    assert loaded["dataset"] == "mnist5k"
    assert math.isclose(loaded["summary"]["ConvNet"]["gain"], 0.05)


def test_stored_summary_is_used():
    stored = {"ConvNet": {"task": {"mean": 0.5, "std": 0.0}}}
    summary = report.summary_of({"results": RESULTS, "summary": stored})
    assert "50.00 ± 0.00" in report.markdown_table(summary)
    # older results.json files stored a list of rows: recomputed from the accuracies
    old = report.summary_of({"results": RESULTS, "summary": [{"arch": "ConvNet"}]})
    assert old["ConvNet"]["gain"] == pytest.approx(0.05)


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match="no 'results'"):
        report.write_report({}, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="elf-jax evaluate"):
        report.load_report(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        report.load_report(str(bad))
