"""Cross-architecture results as a printed table, JSON, Markdown and a PNG bar chart.

The input is the plain dict `cross_evaluate` returns (or the JSON it was saved as):
`{"results": {arch: {mode: {"accs": [...]}}}, "summary": ..., ...metadata}`. The table
shows its `summary` (`{arch: {mode: {"mean", "std"}, "gain"}}`, as `cross_evaluate` makes
it); a report without one gets it computed from the per-repeat accuracies.
"""

from __future__ import annotations

import json
import math
import os

from elf_jax.checkpoint import write_json_atomic
from typing import Any, Mapping, Sequence

BASELINE_MODE = "task"
ELF_MODE = "front_rear_task"


def _mean_std(accs: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (numpy's default, as the reference reports)."""
    n = len(accs)
    if n == 0:
        return math.nan, math.nan
    mean = sum(accs) / n
    var = sum((a - mean) ** 2 for a in accs) / n
    return mean, math.sqrt(var)


def summarize(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[dict]:
    """One row per architecture: mean/std per mode and the ELF gain (ELF mean - baseline mean)."""
    rows = []
    for arch, by_mode in results.items():
        row: dict[str, Any] = {"arch": arch}
        for mode, entry in by_mode.items():
            mean, std = _mean_std([float(a) for a in entry["accs"]])
            row[mode] = {"mean": mean, "std": std, "n": len(entry["accs"])}
        if BASELINE_MODE in row and ELF_MODE in row:
            row["gain"] = row[ELF_MODE]["mean"] - row[BASELINE_MODE]["mean"]
        rows.append(row)
    return rows


def summary_of(report: Mapping[str, Any]) -> dict:
    """The report's stored summary, or one computed from its per-repeat accuracies."""
    stored = report.get("summary")
    if isinstance(stored, Mapping) and stored:  # older results.json files stored a list of rows
        return dict(stored)
    return {row.pop("arch"): row for row in summarize(report["results"])}


def summary_rows(summary: Mapping[str, Mapping[str, Any]]) -> list[dict]:
    """The table rows (one per architecture) of a summary."""
    return [{"arch": arch, **entry} for arch, entry in summary.items()]


def _modes(rows: list[dict]) -> list[str]:
    seen: list[str] = []
    for row in rows:
        for key, value in row.items():
            if isinstance(value, dict) and key not in seen:
                seen.append(key)
    return seen


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "-"
    return f"{100 * entry['mean']:.2f} ± {100 * entry['std']:.2f}"


def markdown_table(rows: list[dict]) -> str:
    """Accuracy in percent (mean ± std over repeats) per architecture and mode, plus gain."""
    modes = _modes(rows)
    has_gain = any("gain" in r for r in rows)
    header = ["architecture"] + modes + (["ELF gain (points)"] if has_gain else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["arch"]] + [_cell(row.get(m)) for m in modes]
        if has_gain:
            cells.append(f"{100 * row['gain']:+.2f}" if "gain" in row else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def text_table(rows: list[dict]) -> str:
    """The same table aligned for a terminal."""
    modes = _modes(rows)
    has_gain = any("gain" in r for r in rows)
    header = ["architecture"] + modes + (["ELF gain"] if has_gain else [])
    body = []
    for row in rows:
        cells = [row["arch"]] + [_cell(row.get(m)) for m in modes]
        if has_gain:
            cells.append(f"{100 * row['gain']:+.2f}" if "gain" in row else "-")
        body.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    out += [fmt.format(*cells) for cells in body]
    return "\n".join(out)


def bar_chart(rows: list[dict], path: str, title: str = "") -> str:
    """Grouped bars (one group per architecture, one bar per mode) with std error bars."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    modes = _modes(rows)
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
    ax.set_xticklabels([r["arch"] for r in rows], rotation=20, ha="right")
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
            "run `elf-jax evaluate` first."
        )
    os.makedirs(outdir, exist_ok=True)
    summary = summary_of(report)
    rows = summary_rows(summary)
    paths = {
        "json": os.path.join(outdir, "results.json"),
        "markdown": os.path.join(outdir, "results.md"),
        "plot": os.path.join(outdir, "results.png"),
    }
    write_json_atomic(paths["json"], {**report, "summary": summary})
    with open(paths["markdown"], "w") as f:
        if title:
            f.write(f"# {title}\n\n")
        f.write(markdown_table(rows) + "\n")
    bar_chart(rows, paths["plot"], title=title)
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
