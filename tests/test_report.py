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
    # both repeats gained exactly 5 points: a zero-width interval, significant
    assert "| ConvNet | 81.00 ± 1.00 | 86.00 ± 1.00 | +5.00 [+5.00, +5.00]* |" in md
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


def test_the_summary_is_always_recomputed_from_the_accuracies():
    # a hand-edited summary (issue 31): never shown; a loud line says it disagreed
    honest = report.summarize(RESULTS)
    edited = {**honest, "ConvNet": {**honest["ConvNet"], "task": {"mean": 0.95, "std": 0.0}}}
    doctored = {"results": RESULTS, "summary": edited}
    summary = report.summary_of(doctored)
    assert summary == honest and "95.00" not in report.markdown_table(summary)
    note = report.summary_disagreement(doctored)
    assert len(note) == 1 and "ConvNet.task.mean" in note[0] and "recomputed" in note[0]
    assert "95.00" not in report.text_report(doctored, "t", note)
    assert report.summary_disagreement({"results": RESULTS, "summary": honest}) == []
    # older results.json files stored a list of rows: recomputed, nothing to compare
    old = {"results": RESULTS, "summary": [{"arch": "ConvNet"}]}
    assert report.summary_of(old)["ConvNet"]["gain"] == pytest.approx(0.05)
    assert report.summary_disagreement(old) == []


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match="no 'results'"):
        report.write_report({}, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="elf-jax evaluate"):
        report.load_report(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        report.load_report(str(bad))


PARTIAL = {"results": {"ConvNet": {"task": {"accs": [0.847]}}}, "partial": True,
           "request": {"pool": ["ConvNet", "ConvNetBN"], "modes": ["task", "front_rear_task"],
                       "repeats": 1}}


def test_partial_results_say_so_in_every_format(tmp_path):
    line = "PARTIAL: 1 of 4 evaluations (arch x mode) finished"
    text = report.text_report(PARTIAL, "t")
    assert text.startswith(line) and text.count("missing") == 5  # 3 cells, 2 gains
    paths = report.write_report(PARTIAL, str(tmp_path), "t")
    md = open(paths["markdown"]).read()
    assert md.startswith(f"**{line}") and "| ConvNetBN | missing | missing | missing |" in md
    with open(paths["plot"], "rb") as f:  # the PNG's title (also drawn) is in its metadata
        assert line.encode() in f.read()
    # a complete report has no such line, and its absent cells are "-" (not requested)
    done = report.text_report({"results": RESULTS})
    assert "PARTIAL" not in done and "missing" not in done
    with pytest.raises(ValueError, match="PARTIAL: 0 of 4"):
        report.write_report({**PARTIAL, "results": {}}, str(tmp_path))


def test_one_repeat_shows_no_spread_and_n_is_shown():
    table = report.markdown_table(report.summarize(PARTIAL["results"]), repeats=1)
    assert "84.70 (n=1)" in table and "± 0.00" not in table and "task (n=1)" in table
    rows = report.summarize(RESULTS)  # ConvNet has 2 repeats, ResNet18 1
    assert "| 70.00 (n=1) |" in report.markdown_table(rows)
    assert "task (n=2)" in report.text_table(rows)


def test_gain_spread_is_over_paired_repeats():
    accs = {"A": {"task": {"accs": [0.80, 0.90]}, "front_rear_task": {"accs": [0.81, 0.91]}}}
    g = report.paired_gains(accs)["A"]
    # the modes' own spreads are 5 points each; the paired differences do not spread at all
    assert g["mean"] == pytest.approx(0.01) and g["std"] == pytest.approx(0.0) and g["n"] == 2


def test_gain_has_a_paired_t_interval_and_says_when_it_excludes_zero():
    # differences 1, 2, 3 points: mean 2, sample sd 1, t(0.975, 2) = 4.303 -> 2 +- 2.484
    noisy = {"A": {"task": {"accs": [0.80, 0.70, 0.90]},
                   "front_rear_task": {"accs": [0.81, 0.72, 0.93]}}}
    row = report.summarize(noisy)["A"]
    lo, hi = row["gain_ci95"]
    assert lo == pytest.approx(0.02 - 0.024841, abs=1e-6) and hi == pytest.approx(0.02 + 0.024841, abs=1e-6)
    assert row["gain_significant"] is False
    assert "+2.00 [-0.48, +4.48] |" in report.markdown_table(report.summarize(noisy))
    steady = {"A": {"task": {"accs": [0.80, 0.70, 0.90]},
                    "front_rear_task": {"accs": [0.82, 0.721, 0.919]}}}
    row = report.summarize(steady)["A"]
    assert row["gain_significant"] is True and row["gain_ci95"][0] > 0
    assert "]*" in report.text_table(report.summarize(steady))
    one = report.summarize({"A": {"task": {"accs": [0.8]}, "front_rear_task": {"accs": [0.9]}}})
    assert one["A"]["gain_ci95"] is None and one["A"]["gain_significant"] is None
    assert "+10.00 |" in report.markdown_table(one)  # one repeat: no interval


def test_differences_name_each_setting():
    stored = {"repeats": 1, "pool": ["ConvNet"], "synset": {"ipc": 10, "content_hash": "a"}}
    current = {"repeats": 2, "pool": ("ConvNet",), "synset": {"ipc": 10, "content_hash": "b"}}
    assert report.differences(stored, current) == [
        "repeats: results 1, config 2", "synset.content_hash: results a, config b"]
    assert report.differences(stored, stored) == []


def test_settings_lines_carry_the_provenance():
    rep = {"results": RESULTS, "request": {
        "dataset": "mnist5k", "repeats": 2, "seed": 3, "dtype": "float32", "width_override": 32,
        "widths": {"ConvNet": 32}, "protocol": {"epochs": 100, "lr": 0.01, "dsa_strategy": "x"}},
        "provenance": {"elf_jax": "9.9", "date": "2030-01-02", "synset": {
            "source": "import", "path": "/sets/a.npz", "method": "dm", "ipc": 10,
            "content_hash": "0123456789abcdef"}, "teachers": {"ConvNetW32": {
                "for": ["ConvNet"], "snapshot_epoch": 8, "epochs": 8, "lr": 0.01,
                "test_acc": 0.951}}}}
    text = "\n".join(report.settings_lines(rep))
    for part in ("seed 3", "2 repeats", "100 epochs", "ConvNet 32", "config.eval.width=32",
                 "/sets/a.npz", "IPC 10", "0123456789ab", "teacher ConvNetW32", "95.10%",
                 "epoch-8 snapshot", "elf_jax 9.9", "2030-01-02"):
        assert part in text, part
    sub = report.plot_subtitle(rep)
    assert "seed 3" in sub and "n=2" in sub and "ConvNetW32@8" in sub
    assert report.settings_lines({"results": RESULTS}) == []  # older files: nothing invented


def test_cross_architecture_rows_are_named():
    from elf_jax.pipeline import cross_architecture

    cross = cross_architecture(("ConvNet", "ConvNetBN", "VGG11", "VGG11_L5"), "ConvNet")
    assert cross == {"ConvNet": False, "ConvNetBN": True, "VGG11": True, "VGG11_L5": True}
    assert cross_architecture(("VGG11_L5",), "VGG11") == {"VGG11_L5": False}  # an alias
    assert cross_architecture(("ConvNet",), None) is None  # an import that does not say
    rep = {"results": RESULTS, "request": {"dataset": "d", "repeats": 2},
           "provenance": {"synset": {"arch": "ConvNet"}, "cross_architecture": cross}}
    line = next(x for x in report.settings_lines(rep) if x.startswith("cross-architecture"))
    assert "ConvNetBN, VGG11, VGG11_L5; same network: ConvNet" in line


def test_seconds_add_up_over_a_resume(tmp_path):
    """A run resumed from its checkpoints reports the seconds of every process it ran in."""
    import numpy as np

    from elf_jax.models import get_model
    from elf_jax.train import TrainProtocol
    from elf_jax.train.runner import run_evaluation

    rng = np.random.default_rng(0)
    x, tx = (rng.normal(size=(n, 16, 16, 3)).astype(np.float32) for n in (6, 4))
    y, ty = (np.arange(n) % 3 for n in (6, 4))
    net, protocol = get_model("ConvNet", 3, width=8), TrainProtocol(
        epochs=2, batch_size=4, dsa_strategy="none", mode="task")
    kw = dict(repeats=1, workdir=tmp_path, checkpoint_every=1, progress=False)
    first = run_evaluation(net, protocol, x, y, tx, ty, **kw)
    assert first["resumed_from"] is None
    assert first["total_seconds"] == pytest.approx(first["seconds"], abs=0.1)
    again = run_evaluation(net, protocol, x, y, tx, ty, **kw)  # every epoch is done: resumed
    assert again["resumed_from"] is not None
    # the first process's time (mostly compilation and training) is counted in
    assert again["total_seconds"] >= again["seconds"] + 0.5 * first["seconds"]


def test_gain_panel_shows_elf_minus_kd_beside_elf_minus_task():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from elf_jax.elf.summary import KD_MODE, paired_gains
    from elf_jax.report import _gain_panel

    results = {a: {m: {"accs": [0.5 + 0.1 * i + 0.01 * j for j in range(3)]}
                   for i, m in enumerate(("task", "front_rear_task", KD_MODE))}
               for a in ("ConvNet", "MLP")}
    for vs_kd, bars in ((None, 2), (paired_gains(results, baseline=KD_MODE), 4)):
        fig, ax = plt.subplots()
        _gain_panel(ax, paired_gains(results), vs_kd)
        assert len(ax.patches) == bars
        heights = sorted(round(p.get_height(), 6) for p in ax.patches)
        assert heights[0] == (-10.0 if vs_kd else 10.0) and heights[-1] == 10.0  # ELF-KD = -10
        plt.close(fig)


def test_synset_grid_shows_each_class_in_pixels(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 8, 8, 3)).astype(np.float32)
    record = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "zca": False}
    for name, norm in (("exact.png", record), ("scaled.png", None)):
        path = report.synset_grid(images, np.arange(6) % 3, str(tmp_path / name), norm, "t")
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_set_minus_random_is_paired_and_beside_elfs_gain_on_each():
    """The random reference's tables: set - random per mode from the per-repeat pairs (repeat
    r of both from the same weights), ELF's gain on the set and on the subset; a damaged
    reference is named."""
    res = {"ConvNet": {"task": {"accs": [0.80, 0.82, 0.84]},
                       "front_rear_task": {"accs": [0.85, 0.86, 0.87]}}}
    rand = {"ConvNet": {"task": {"accs": [0.70, 0.73, 0.72]},
                        "front_rear_task": {"accs": [0.71, 0.72, 0.76]}}}
    rep = {"results": res, "reference": {"random": {"results": rand}}, "request": {"repeats": 3}}
    header, body = report.vs_random_cells(rep)
    assert header[1:] == ["task: set - random", "front_rear_task: set - random",
                          "ELF gain on the set", "ELF gain on random"]
    d = report.paired_gain([0.70, 0.73, 0.72], [0.80, 0.82, 0.84])  # +10.33 points
    assert body[0][1] == report._gain_cell({"g": d["mean"], "g_ci95": d["ci95"],
                                            "g_significant": d["significant"]}, "g")
    assert body[0][1].startswith("+10.33 [") and body[0][1].endswith("*")
    assert body[0][3].startswith("+4.00") and body[0][4].startswith("+1.33")
    md = report.markdown_report(rep)
    assert report.RANDOM_TITLE in md and "71.67" in md.split(report.RANDOM_TITLE)[1]
    assert report.RANDOM_TITLE not in report.markdown_report({"results": res})
    bad = {"results": res, "reference": {"random": {"results": {"ConvNet": {"task": {
        "accs": ["x"]}}}}}}
    assert "reference.random.results.ConvNet.task.accs" in report._malformed(bad)
