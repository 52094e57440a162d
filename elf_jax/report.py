"""Cross-architecture results as a printed table, JSON, Markdown and a PNG bar chart.

The input is the plain dict `cross_evaluate` returns (or the JSON it was saved as):
`{"results": {arch: {mode: {"accs": [...]}}}, "summary": ..., ...metadata}`. Tables and
chart show a summary `{arch: {mode: {"mean", "std"}, "gain"}}`: the report's own (as
`cross_evaluate` makes it) or, without one, `summarize` of the per-repeat accuracies.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from elf_jax.elf.summary import BASELINE_MODE, ELF_MODE, summarize  # noqa: F401

def summary_of(report: Mapping[str, Any]) -> dict[str, dict]:
    """The report's stored summary, or one computed from its per-repeat accuracies."""
    stored = report.get("summary")
    if isinstance(stored, Mapping) and stored:  # older results.json files stored a list
        return dict(stored)
    return summarize(report["results"])


def _modes(summary: Mapping[str, dict]) -> list[str]:
    seen: list[str] = []
    for row in summary.values():
        for key, value in row.items():
            if isinstance(value, dict) and key not in seen:
                seen.append(key)
    return seen


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "-"
    return f"{100 * entry['mean']:.2f} ± {100 * entry['std']:.2f}"


def _cells(summary: Mapping[str, dict], gain_title: str) -> tuple[list, list[list]]:
    """Header and body cells: architecture, one column per mode, the gain if any has one."""
    modes = _modes(summary)
    has_gain = any("gain" in r for r in summary.values())
    header = ["architecture"] + modes + ([gain_title] if has_gain else [])
    body = []
    for arch, row in summary.items():
        cells = [arch] + [_cell(row.get(m)) for m in modes]
        if has_gain:
            cells.append(f"{100 * row['gain']:+.2f}" if "gain" in row else "-")
        body.append(cells)
    return header, body


def markdown_table(summary: Mapping[str, dict]) -> str:
    """Accuracy in percent (mean ± std over repeats) per architecture and mode, plus gain."""
    header, body = _cells(summary, "ELF gain (points)")
    lines = [header, ["---"] * len(header)] + body
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def text_table(summary: Mapping[str, dict]) -> str:
    """The same table aligned for a terminal."""
    header, body = _cells(summary, "ELF gain")
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    return "\n".join(out + [fmt.format(*cells) for cells in body])


def bar_chart(summary: Mapping[str, dict], path: str, title: str = "") -> str:
    """Grouped bars (one group per architecture, one bar per mode) with std error bars."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    modes, rows = _modes(summary), list(summary.values())
    n_arch = len(rows)
    width = 0.8 / max(len(modes), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * n_arch + 1), 3.6))
    for i, mode in enumerate(modes):
        xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(n_arch)]
        means = [100 * r[mode]["mean"] if mode in r else 0.0 for r in rows]
        stds = [100 * r[mode]["std"] if mode in r else 0.0 for r in rows]
        label = {"task": "baseline (task)", "front_rear_task": "ELF"}.get(mode, mode)
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=label)
    ax.set_xticks(range(n_arch))
    ax.set_xticklabels(list(summary), rotation=20, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(report: Mapping[str, Any], outdir: str, title: str = "") -> dict[str, str]:
    """Write results.json, results.md and results.png into `outdir`; return their paths."""
    if "results" not in report or not report["results"]:
        raise ValueError(
            "The report has no 'results' (expected {arch: {mode: {'accs': [...]}}}); "
            "run `elf-jax evaluate` first.")
    from elf_jax.checkpoint import write_json_atomic  # here: the tables need no jax

    os.makedirs(outdir, exist_ok=True)
    summary = summary_of(report)
    paths = {key: os.path.join(outdir, f"results.{ext}")
             for key, ext in (("json", "json"), ("markdown", "md"), ("plot", "png"))}
    write_json_atomic(paths["json"], {**report, "summary": summary})
    with open(paths["markdown"], "w") as f:
        if title:
            f.write(f"# {title}\n\n")
        f.write(markdown_table(summary) + "\n")
    bar_chart(summary, paths["plot"], title=title)
    return paths


def load_report(path: str) -> dict:
    """Read a results.json written by `write_report` or by the evaluation stage."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"No results file at {path}: run `elf-jax evaluate` first.")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); re-run `elf-jax evaluate`.")
