"""Cross-architecture results as a printed table, JSON, Markdown and a PNG chart.

The input is the plain dict `cross_evaluate` returns, or the results.json the evaluation
stage writes: `{"results": {arch: {mode: {"accs": [...]}}}, "summary": ..., "request":
{"pool", "modes", "repeats", ...}, "provenance": {...}, "partial": bool, ...}`. Tables and
chart show a summary `{arch: {mode: {"mean", "std", "n"}, "gain"}}`: the report's own (as
`cross_evaluate` makes it) or, without one, `summarize` of the per-repeat accuracies.

Every format says when results are partial (how many of the requested (arch, mode)
evaluations finished; the others are shown as "missing"), shows n, and carries the
settings that produced the numbers (`settings_lines`). `notes` (e.g. the pipeline's
warning that the results were made for another config) go first in every format.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from elf_jax.elf.summary import (BASELINE_MODE, ELF_MODE, KD_MODE, paired_gain,  # noqa: F401
                                 paired_gains, summarize)

_LABELS = {BASELINE_MODE: "baseline (task)", ELF_MODE: "ELF", KD_MODE: "KD (teacher logits)"}


def summary_of(report: Mapping[str, Any]) -> dict[str, dict]:
    """The summary of the report's per-repeat accuracies, always computed from them: a
    stored summary is never shown as is (an edited or damaged one would be;
    `summary_disagreement` says when it differs)."""
    return summarize(report["results"])


def summary_disagreement(report: Mapping[str, Any]) -> list[str]:
    """A loud line when the report's stored summary differs from the one its per-repeat
    accuracies give (the tables show the latter); [] when it agrees or there is none."""
    stored = report.get("summary")
    if not isinstance(stored, Mapping) or not stored:  # none, or an older file's list
        return []
    computed = _flat(summarize(report["results"]))
    differ = [k for k, v in _flat(stored).items() if not _same_number(v, computed.get(k))]
    if not differ:
        return []
    return [f"NOTE: results.json's stored summary disagrees with its per-repeat accuracies at "
            f"{', '.join(differ[:4])}{' ...' if len(differ) > 4 else ''} (edited or damaged?): "
            "every table here is recomputed from the accuracies"]


def _same_number(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))
    return a == b


# ------------------------------------------------------------------ what was asked, what is done
def _request(report: Mapping[str, Any]) -> Mapping[str, Any]:
    # older files (and cross_evaluate's own dict) keep pool/modes/repeats at the top
    return report.get("request") or report


def requested_cells(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The (arch, mode) evaluations asked for; without a record of them, those held."""
    req = _request(report)
    if req.get("pool") and req.get("modes"):
        return [(a, m) for a in req["pool"] for m in req["modes"]]
    return [(a, m) for a, by_mode in (report.get("results") or {}).items() for m in by_mode]


def missing_cells(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The requested (arch, mode) evaluations without a result."""
    results = report.get("results") or {}
    return [(a, m) for a, m in requested_cells(report) if m not in results.get(a, {})]


def partial_line(report: Mapping[str, Any]) -> str:
    """The loud line that opens a partial report; "" when every requested result is there."""
    total, missing = len(requested_cells(report)), len(missing_cells(report))
    rerun = ("rerun `elf-jax evaluate --config ... --workdir ...` (it resumes) to complete; if "
             "it stops on checkpoints made with other settings, add --overwrite=evaluate")
    if missing:
        return (f"PARTIAL: {total - missing} of {total} evaluations (arch x mode) finished; "
                f"{rerun}")
    if report.get("partial"):  # an older file without the request: the total is unknown
        return f"PARTIAL: {total} evaluations (arch x mode) finished, of a number not recorded; {rerun}"
    return ""


def differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """`key: results X, config Y` for every setting that differs (nested keys joined by
    dots; a key only one side has counts as a difference)."""
    a, b = _flat(stored), _flat(current)
    return [f"{k}: results {_short(a.get(k, '(absent)'))}, config {_short(b.get(k, '(absent)'))}"
            for k in sorted(set(a) | set(b)) if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


_ABSENT = object()


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in json.loads(json.dumps(tree)).items():  # tuples -> lists, as stored
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------ tables
def _dedupe(items) -> list:
    return list(dict.fromkeys(items))


def _modes(summary: Mapping[str, dict]) -> list[str]:
    return _dedupe(k for row in summary.values() for k, v in row.items() if isinstance(v, dict))


def _column_n(summary: Mapping[str, dict], mode: str, repeats: int | None) -> int | None:
    """The n of a mode's column: the requested repeats, else the most common n."""
    if repeats:
        return int(repeats)
    ns = [row[mode]["n"] for row in summary.values() if "n" in row.get(mode, {})]
    return max(ns, key=lambda n: (ns.count(n), n)) if ns else None


def format_accuracy(mean: float, std: float, n: int | None, n_shown: int | None = None) -> str:
    """`84.70 ± 1.20` in percent; `(n=k)` added when n is not the `n_shown` elsewhere (a
    header); one run has no spread, so it reads `84.70 (n=1)`."""
    if n == 1:
        return f"{100 * mean:.2f} (n=1)"
    text = f"{100 * mean:.2f} ± {100 * std:.2f}"
    return text if n is None or n == n_shown else f"{text} (n={n})"


def _cell(entry: dict | None, missing: bool, n_col: int | None) -> str:
    if entry is None:
        return "missing" if missing else "-"
    return format_accuracy(entry["mean"], entry["std"], entry.get("n"), n_col)


def _gain_cell(row: Mapping[str, Any], key: str = "gain") -> str:
    """`+1.23 [-0.40, +2.86]` in points: the gain (`key`: `gain`, or `gain_vs_kd`) and its
    paired 95% CI, `*` when the interval excludes zero (no interval for one repeat)."""
    cell = f"{100 * row[key]:+.2f}"
    ci = row.get(f"{key}_ci95")
    if ci:
        cell += f" [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]" + ("*" if row.get(f"{key}_significant") else "")
    return cell


def _kd_cells(summary, modes, gone, archs, title: str) -> tuple[list, list[list]]:
    """The ELF-vs-KD column (title, one cell per architecture) when the KD control was
    asked for; none otherwise, so two-mode tables read as before it existed."""
    if not ({ELF_MODE, KD_MODE} <= set(modes) or any("gain_vs_kd" in r for r in summary.values())):
        return [], [[] for _ in archs]
    cells = []
    for arch in archs:
        row = summary.get(arch, {})
        lost = (arch, KD_MODE) in gone or (arch, ELF_MODE) in gone
        cells.append([_gain_cell(row, "gain_vs_kd") if "gain_vs_kd" in row
                      else "missing" if lost else "-"])
    return [title], cells


def _cells(summary: Mapping[str, dict], gain_title: str, missing: Sequence = (),
           repeats: int | None = None, kd_title: str = "ELF - KD") -> tuple[list, list[list]]:
    """Header and body cells: architecture, one column per mode (n in its header), the gain
    if any has one, ELF's gain over the KD control when it was run; requested results that
    are not there read "missing"."""
    gone = {tuple(c) for c in missing}
    modes = _dedupe(_modes(summary) + [m for _, m in missing])
    archs = _dedupe(list(summary) + [a for a, _ in missing])
    has_gain = {BASELINE_MODE, ELF_MODE} <= set(modes) or any("gain" in r for r in summary.values())
    ns = {m: _column_n(summary, m, repeats) for m in modes}
    header = (["architecture"] + [m if ns[m] is None else f"{m} (n={ns[m]})" for m in modes]
              + ([gain_title] if has_gain else []))
    body = []
    for arch in archs:
        row = summary.get(arch, {})
        cells = [arch] + [_cell(row.get(m), (arch, m) in gone, ns[m]) for m in modes]
        if has_gain:
            lost = (arch, BASELINE_MODE) in gone or (arch, ELF_MODE) in gone
            cells.append(_gain_cell(row) if "gain" in row else "missing" if lost else "-")
        body.append(cells)
    kd_head, kd_body = _kd_cells(summary, modes, gone, archs, kd_title)
    return header + kd_head, [cells + extra for cells, extra in zip(body, kd_body)]


def markdown_table(summary: Mapping[str, dict], missing: Sequence = (),
                   repeats: int | None = None) -> str:
    """Accuracy in percent (mean ± std over n repeats) per architecture and mode, plus gain."""
    header, body = _cells(summary, "ELF gain (points) [95% CI, * excludes 0]", missing, repeats,
                          "ELF - KD (points) [95% CI, * excludes 0]")
    return _markdown(header, body)


def _markdown(header: list, body: list[list]) -> str:
    """A Markdown table of ``header`` and ``body`` cells."""
    lines = [header, ["---"] * len(header)] + body
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def text_table(summary: Mapping[str, dict], missing: Sequence = (),
               repeats: int | None = None) -> str:
    """The same table aligned for a terminal."""
    return _aligned(*_cells(summary, "ELF gain [95% CI]", missing, repeats, "ELF - KD [95% CI]"))


def _aligned(header: list, body: list[list]) -> str:
    """Columns padded to their widest cell, a dashed line under the header."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*["-" * w for w in widths])]
                     + [fmt.format(*cells) for cells in body])


def _table_args(report: Mapping[str, Any]) -> tuple:
    return summary_of(report), missing_cells(report), _request(report).get("repeats")


def _reference_results(report: Mapping[str, Any], kind: str = "random") -> Mapping[str, Any]:
    """A reference's per-repeat results ({} when it was not run)."""
    return (((report.get("reference") or {}).get(kind)) or {}).get("results") or {}


def _random_results(report: Mapping[str, Any]) -> Mapping[str, Any]:
    return _reference_results(report, "random")


#: The references' tables: the random subset's accuracies, the set against it, the full data.
RANDOM_TITLE = "Random real subset of the same IPC (same protocol and seeds)"
FULL_TITLE = "Full real training set (same protocol and seeds)"
VS_RANDOM_TITLE = ("Set minus random, points [paired 95% CI, * excludes 0]; ELF's gain on the "
                   "set and on the random subset")


def vs_random_cells(report: Mapping[str, Any]) -> tuple[list, list[list]]:
    """Per architecture: the set's accuracy minus the random subset's in each mode (repeat r
    of both from the same weights: paired), then ELF's gain on the set and on the subset.
    Cells of runs not (yet) there read "-"."""
    rand, mine = _random_results(report), report.get("results") or {}
    modes = _dedupe([m for by_mode in mine.values() for m in by_mode])
    mine_sum, rand_sum = summarize(mine), summarize(rand)
    header = ["architecture"] + [f"{m}: set - random" for m in modes] + [
        "ELF gain on the set", "ELF gain on random"]
    body = []
    for arch in mine:
        cells = [arch]
        for m in modes:
            a, b = (rand.get(arch) or {}).get(m), mine[arch].get(m)
            if a is None or b is None:
                cells.append("-")
                continue
            g = paired_gain(a["accs"], b["accs"])
            cells.append(_gain_cell({"d": g["mean"], "d_ci95": g["ci95"],
                                     "d_significant": g["significant"]}, "d"))
        for summary in (mine_sum, rand_sum):
            row = summary.get(arch) or {}
            cells.append(_gain_cell(row) if "gain" in row else "-")
        body.append(cells)
    return header, body


def _reference_parts(report: Mapping[str, Any], markdown: bool) -> list[str]:
    """The references' tables ([] without any): the random subset's and the set against it,
    the full data's."""
    rand, full = _random_results(report), _reference_results(report, "full")
    repeats = _request(report).get("repeats")
    out = []
    if rand:
        header, body = vs_random_cells(report)
        if markdown:
            out += [f"\n## {RANDOM_TITLE}\n", markdown_table(summarize(rand), (), repeats),
                    f"\n## {VS_RANDOM_TITLE}\n", _markdown(header, body)]
        else:
            out += [f"\n{RANDOM_TITLE}", text_table(summarize(rand), (), repeats),
                    f"\n{VS_RANDOM_TITLE}", _aligned(header, body)]
    if full:
        out += ([f"\n## {FULL_TITLE}\n", markdown_table(summarize(full), (), repeats)] if markdown
                else [f"\n{FULL_TITLE}", text_table(summarize(full), (), repeats)])
    return out


def text_report(report: Mapping[str, Any], title: str = "", notes: Sequence[str] = ()) -> str:
    """What a terminal shows: the loud lines (partial, notes), title, table(s) and settings."""
    loud = [line for line in (partial_line(report), *notes) if line]
    settings = [f"  {line}" for line in settings_lines(report)]
    parts = loud + ([title] if title else []) + [text_table(*_table_args(report))]
    parts += _reference_parts(report, markdown=False)
    return "\n".join(parts + (["settings:"] + settings if settings else []))


def markdown_report(report: Mapping[str, Any], title: str = "", notes: Sequence[str] = ()) -> str:
    """results.md: the loud lines first, the title, the table(s) and a Settings section."""
    loud = [f"**{line}**\n" for line in (partial_line(report), *notes) if line]
    parts = loud + ([f"# {title}\n"] if title else []) + [markdown_table(*_table_args(report))]
    parts += _reference_parts(report, markdown=True)
    settings = settings_lines(report)
    if settings:
        parts.append("\n## Settings\n\n" + "\n".join(f"- {line}" for line in settings))
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------ settings
def _cross_line(cross: Mapping[str, bool], distill_arch: Any) -> str:
    other = [a for a, c in cross.items() if c]
    same = [a for a, c in cross.items() if not c]
    return (f"cross-architecture rows (not the distillation network {distill_arch}): "
            f"{', '.join(other) or 'none'}; same network: {', '.join(same) or 'none'}")


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * float(x):.2f}%"


def _protocol_line(p: Mapping[str, Any]) -> str:
    return (f"evaluation protocol: {p.get('epochs')} epochs, lr {p.get('lr')}, batch "
            f"{p.get('batch_size')}, momentum {p.get('momentum')}, weight decay "
            f"{p.get('weight_decay')}, DSA {p.get('dsa_strategy')}, feature loss "
            f"{p.get('kind')}, lambda_front {p.get('lambda_front')}, lambda_rear "
            f"{p.get('lambda_rear')}"
            + (f", KD temperature {p['kd_temperature']}" if "kd_temperature" in p else ""))


def _widths_line(req: Mapping[str, Any]) -> str:
    widths = ", ".join(f"{a} {w if w else 'n/a'}" for a, w in req["widths"].items())
    override = req.get("width_override")
    why = (f" (config.eval.width={override} sets the width of the ConvNet-family pool nets, "
           "whose default is 128)" if override else "")
    return f"pool widths: {widths}{why}"


def _synset_line(s: Mapping[str, Any]) -> str:
    origin = {"import": f"imported from {s.get('path')} (method {s.get('method')})",
              "real_random": "random real images"}
    how = origin.get(s.get("source"), f"distilled with {s.get('method')} on {s.get('arch')}, "
                                      f"iteration {s.get('iteration')}")
    return (f"synthetic set: {how}; IPC {s.get('ipc')} ({s.get('images')} images), content "
            f"hash {str(s.get('content_hash'))[:12]}")


def _teacher_line(name: str, t: Mapping[str, Any]) -> str:
    users = ", ".join(t.get("for") or [])
    if t.get("reference_buffer"):  # not trained here: the buffer is what is known of it
        return (f"teacher {name} (for {users}): epoch-{t.get('snapshot_epoch')} snapshot of "
                f"trajectory {t.get('reference_trajectory')} of the reference buffer "
                f"{t['reference_buffer']} (sha256 {str(t.get('reference_buffer_hash'))[:12]})")
    acc = f"; test accuracy {_pct(t.get('test_acc'))} after epoch {t.get('epochs')}"
    if t.get("snapshot_test_acc") is not None:
        acc += f", {_pct(t['snapshot_test_acc'])} at the snapshot"
    return (f"teacher {name} (for {users}): epoch-{t.get('snapshot_epoch')} snapshot of "
            f"{t.get('epochs')} epochs, lr {t.get('lr')}, batch {t.get('batch_size')}"
            + (acc if t.get("test_acc") is not None else "; test accuracy not recorded"))


def _time_line(results: Mapping[str, Any]) -> str:
    entries = [e for by_mode in results.values() for e in by_mode.values()]
    now = sum(float(e.get("seconds") or 0) for e in entries)
    totals = [e.get("total_seconds") for e in entries]
    if any(t is None for t in totals):
        return (f"training time: {now:.0f} s in this process (the total is unknown for runs "
                "resumed from checkpoints that predate its record)")
    return f"training time: {sum(totals):.0f} s over all processes ({now:.0f} s in the last)"


def settings_lines(report: Mapping[str, Any]) -> list[str]:
    """One short line per setting group that produced the results ([] when not recorded)."""
    req, prov = report.get("request") or {}, report.get("provenance") or {}
    if "dataset" not in req:  # not a request the pipeline stored: nothing to say
        return []
    lines = [f"dataset {req.get('dataset')}; {req.get('repeats')} repeats per evaluation, "
             f"seed {req.get('seed')}, dtype {req.get('dtype')}"]
    if req.get("protocol"):
        lines.append(_protocol_line(req["protocol"]))
    if req.get("widths"):
        lines.append(_widths_line(req))
    if prov.get("synset"):
        lines.append(_synset_line(prov["synset"]))
    if prov.get("validation"):
        lines.append(_choices_line(prov["validation"], prov.get("chosen_on") or {}))
    lines += [_teacher_line(n, t) for n, t in (prov.get("teachers") or {}).items()]
    if prov.get("cross_architecture"):
        lines.append(_cross_line(prov["cross_architecture"], (prov.get("synset") or {}).get("arch")))
    adapters = _adapters_line(report.get("results") or {})
    if adapters:
        lines.append(adapters)
    lrs = _lr_grid_line(report.get("results") or {})
    if lrs:
        lines.append(lrs)
    if report.get("results") and "seconds" in _first_entry(report["results"]):
        lines.append(_time_line(report["results"]))
    if report.get("budget"):
        lines.append(_budget_line(report["budget"]))
    if prov:
        lines.append(f"produced by elf_jax {prov.get('elf_jax')} on {prov.get('date')}")
    return lines


def _choices_line(validation: Mapping[str, Any], chosen_on: Mapping[str, Any]) -> str:
    """Which split each choice read, and what the validation split held out."""
    split = chosen_on.get("synset")
    if split is None:
        chose = "nothing chosen (the final set, an import or a random subset)"
    elif split == "test":
        chose = "the best set chosen on the TEST split (the reference's way)"
    else:
        chose = f"the best set chosen on the {split} split"
    if not validation.get("fraction"):
        held = "no validation split (validation.fraction 0: the test split chooses)"
    else:
        size = f"{validation['size']:,} training images" if "size" in validation else "images"
        rows = f", rows #{validation['rows_sha256'][:8]}" if validation.get("rows_sha256") else ""
        held = (f"validation: {size} held out ({validation['fraction']:g} of each class, seed "
                f"{validation.get('seed')}{rows}), never trained on")
    return f"choices: {chose}; {held}; the test split reports"


def _lr_grid_line(results: Mapping[str, Any]) -> str:
    """The lr each (arch, mode) chose from `eval.lr_grid`, and on which split ("" when none
    was chosen)."""
    chosen = {(a, m): e["lr_tuning"] for a, by_mode in results.items()
              for m, e in by_mode.items() if isinstance(e.get("lr_tuning"), Mapping)}
    if not chosen:
        return ""
    t = next(iter(chosen.values()))
    per_arch: dict[str, list] = {}
    for (a, m), tu in chosen.items():
        per_arch.setdefault(a, []).append(f"{m} {tu['chosen']:g}")
    return (f"evaluation lr chosen on the {t.get('on')} split from {tuple(t['grid'])} "
            f"({t.get('repeats')} run(s) per lr, each mode its own): "
            + "; ".join(f"{a} {', '.join(v)}" for a, v in per_arch.items()))


def _mb(n: Any) -> str:
    return f"{n / 1e6:.2f} MB" if isinstance(n, (int, float)) else "?"


def _budget_line(b: Mapping[str, Any]) -> str:
    """What the numbers cost: storage, teacher passes, evaluation steps and time."""
    banks = ", ".join(f"{t} {_mb(n)}" for t, n in (b.get("bank_bytes") or {}).items()) or "none"
    passes = "; ".join(
        f"{t}: {p.get('bank')} for the bank" + (f", {p['training']:,} training"
                                                 if p.get("training") else "")
        for t, p in (b.get("teacher_forward_passes") or {}).items())
    return (f"budget: synthetic set {_mb(b.get('synset_bytes'))}, soft labels "
            f"{_mb(b.get('soft_label_bytes'))}, banks {banks}; teacher image passes "
            f"{passes or 'none'}; evaluation {b.get('eval_steps', 0):,} SGD steps in "
            f"{b.get('eval_seconds', 0):.0f} s on {', '.join(b.get('devices') or ['?'])}"
            + (f"; choosing the lr {b['lr_grid_steps']:,} steps in {b.get('lr_grid_seconds', 0):.0f} s"
               if b.get("lr_grid_steps") else ""))


def _adapters_line(results: Mapping[str, Any]) -> str:
    """The pool nets whose ELF runs learned through a feature adapter, with its size ("" for
    none: every front had the teacher feature's shape)."""
    sizes = {arch: max(int(e.get("adapter_params") or 0) for e in by_mode.values())
             for arch, by_mode in results.items()}
    used = [f"{arch} ({n:,} params)" for arch, n in sizes.items() if n]
    return ("feature adapters (front <-> teacher feature shape, trained with the net; "
            f"elf_jax.models.adapter): {', '.join(used)}") if used else ""


def _first_entry(results: Mapping[str, Any]) -> Mapping[str, Any]:
    return next(iter(next(iter(results.values()), {}).values()), {})


def plot_subtitle(report: Mapping[str, Any]) -> str:
    """The settings in one line for the PNG (the Markdown has them in full)."""
    req, prov = report.get("request") or {}, report.get("provenance") or {}
    if not req:
        return ""
    p, s = req.get("protocol") or {}, prov.get("synset") or {}
    teachers = [f"{n}@{t.get('snapshot_epoch')} ({_pct(t.get('test_acc'))})"
                for n, t in (prov.get("teachers") or {}).items()]
    parts = [("seed", f"seed {req.get('seed')}"), ("repeats", f"n={req.get('repeats')}"),
             (s, f"{s.get('method')} IPC {s.get('ipc')} #{str(s.get('content_hash'))[:8]}"),
             (teachers, f"teacher {', '.join(teachers)}"),
             (p, f"{p.get('epochs')} ep, lr {p.get('lr')}"),
             (req.get("width_override"), f"width {req.get('width_override')}"),
             (report.get("budget"), "budget: set "
              f"{_mb((report.get('budget') or {}).get('synset_bytes'))}, "
              f"{(report.get('budget') or {}).get('eval_steps', 0):,} eval steps"),
             (prov, f"elf_jax {prov.get('elf_jax')} {str(prov.get('date'))[:10]}")]
    # a part only when its source is recorded (older files lack some)
    return "; ".join(text for have, text in parts
                     if (req.get(have) is not None if isinstance(have, str) else have))


# ------------------------------------------------------------------ the chart
def _zoomed(lo: float, hi: float) -> tuple[float, float]:
    # not from 0: gains of 1-3 points must be visible next to accuracies of 80-90%
    pad = max(0.5, 0.15 * (hi - lo))
    return max(0.0, lo - pad), min(100.0, hi + pad)


def _arch_axis(ax, archs: Sequence[str]) -> None:
    ax.set_xticks(range(len(archs)))
    ax.set_xticklabels(archs, rotation=20, ha="right")
    ax.set_xlim(-0.5, len(archs) - 0.5)


def _accuracy_panel(ax, summary, modes, missing, repeats) -> None:
    """Mean ± std per architecture and mode as points (bars would imply a 0 baseline)."""
    archs = _dedupe(list(summary) + [a for a, _ in missing])
    step = 0.6 / max(len(modes), 1)

    def x(arch, mode):
        return archs.index(arch) + (modes.index(mode) - (len(modes) - 1) / 2) * step

    values = []
    for mode in modes:
        n = _column_n(summary, mode, repeats)
        pts = [(x(a, mode), 100 * summary[a][mode]["mean"],
                100 * summary[a][mode].get("std", 0.0))
               for a in archs if mode in summary.get(a, {})]
        if pts:
            xs, ms, ss = zip(*pts)
            label = _LABELS.get(mode, mode) + ("" if n is None else f" (n={n})")
            ax.errorbar(xs, ms, yerr=ss, fmt="o", capsize=3, label=label)
            values += [m - s for m, s in zip(ms, ss)] + [m + s for m, s in zip(ms, ss)]
    if values:
        ax.set_ylim(*_zoomed(min(values), max(values)))
    for a, m in missing:  # say so where the point would be
        ax.annotate("missing", (x(a, m), 0.03), xycoords=("data", "axes fraction"),
                    rotation=90, ha="center", va="bottom", fontsize="x-small", color="red")
    _arch_axis(ax, archs)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    # above the axes, so it never covers a point
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=2, fontsize="small",
              frameon=False)


def _gain_bars(ax, gains: Mapping[str, dict], archs: list, offset: float, width: float,
               **style) -> None:
    """One bar per architecture that has a paired gain, with its 95% interval and `n=`."""
    xs = [j + offset for j, a in enumerate(archs) if a in gains]
    have = [a for a in archs if a in gains]
    means = [100 * gains[a]["mean"] for a in have]
    ci = [gains[a].get("ci95") or [gains[a]["mean"]] * 2 for a in have]
    below = [m - 100 * c[0] for m, c in zip(means, ci)]
    above = [100 * c[1] - m for m, c in zip(means, ci)]
    if "color" not in style:
        style["color"] = ["tab:green" if m >= 0 else "tab:red" for m in means]
    ax.bar(xs, means, width, yerr=[below, above], capsize=3, **style)
    for x, a in zip(xs, have):
        mark = "*" if gains[a].get("significant") else ""
        ax.annotate(f"n={gains[a]['n']}{mark}", (x, 1.0), xycoords=("data", "axes fraction"),
                    ha="center", va="bottom", fontsize="x-small")


def _gain_panel(ax, gains: Mapping[str, dict], vs_kd: Mapping[str, dict] | None = None) -> None:
    """ELF - baseline per architecture (points) with the paired 95% confidence interval
    (Student's t; `*` above a bar whose interval excludes zero); one repeat: no interval.
    With the KD control (`vs_kd`), ELF - KD as a second, hatched bar beside it."""
    archs = _dedupe(list(gains) + list(vs_kd or {}))
    if vs_kd:
        _gain_bars(ax, gains, archs, -0.2, 0.38, label="ELF - task")
        _gain_bars(ax, vs_kd, archs, 0.2, 0.38, color="tab:gray", hatch="//",
                   label="ELF - KD")
        ax.legend(fontsize="x-small", frameon=False)
    else:
        _gain_bars(ax, gains, archs, 0.0, 0.5)
    ax.axhline(0.0, color="black", linewidth=0.8)
    _arch_axis(ax, archs)
    ax.set_ylabel("ELF gain (points, paired 95% CI)")
    ax.grid(axis="y", alpha=0.3)


def bar_chart(summary: Mapping[str, dict], path: str, title: str = "",
              gains: Mapping[str, dict] | None = None, missing: Sequence = (),
              repeats: int | None = None, vs_kd: Mapping[str, dict] | None = None) -> str:
    """Two panels: accuracy per architecture and mode on a zoomed axis, and the ELF gain
    per architecture (`gains`, `paired_gains`) with its spread, beside ELF's gain over the
    KD control when it ran (`vs_kd`); the title also goes into the PNG's metadata."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    archs = _dedupe(list(summary) + [a for a, _ in missing])
    modes = _dedupe(_modes(summary) + [m for _, m in missing])
    panels = 2 if gains else 1
    fig, axes = plt.subplots(1, panels, figsize=(panels * max(4.0, 1.2 * len(archs) + 1.5), 4.4),
                             layout="constrained", squeeze=False)
    _accuracy_panel(axes[0][0], summary, modes, missing, repeats)
    if gains:
        _gain_panel(axes[0][1], gains, vs_kd)
    fig.suptitle(title, fontsize="small")
    fig.savefig(path, dpi=120, metadata={"Title": title})
    plt.close(fig)
    return path


# ------------------------------------------------------------------ files
def write_report(report: Mapping[str, Any], outdir: str, title: str = "",
                 notes: Sequence[str] = ()) -> dict[str, str]:
    """Write results.json, results.md and results.png into `outdir`; return their paths.
    `notes` are loud lines for the Markdown and the PNG title, not stored in the JSON."""
    if "results" not in report or not report["results"]:
        raise ValueError(
            "The report has no 'results' (expected {arch: {mode: {'accs': [...]}}}); "
            f"{partial_line(report) or 'run `elf-jax evaluate` first'}.")
    from elf_jax.checkpoint import write_json_atomic  # here: the tables need no jax

    os.makedirs(outdir, exist_ok=True)
    summary, missing, repeats = _table_args(report)
    paths = {key: os.path.join(outdir, f"results.{ext}")
             for key, ext in (("json", "json"), ("markdown", "md"), ("plot", "png"))}
    write_json_atomic(paths["json"], {**report, "summary": summary})
    with open(paths["markdown"], "w") as f:
        f.write(markdown_report(report, title, notes))
    heading = [line for line in (partial_line(report), *notes) if line]
    chart_title = "\n".join(heading + [title, plot_subtitle(report)]).strip()
    bar_chart(summary, paths["plot"], chart_title, paired_gains(report["results"]), missing,
              repeats, paired_gains(report["results"], baseline=KD_MODE))
    return paths


def synset_grid(images, labels, path: str, normalization=None, title: str = "",
                per_class: int = 10) -> str:
    """A PNG of the synthetic set: one row per class, its first `per_class` images (as
    MTT and DC-BENCH show a set). `normalization` (the set's record: mean/std) maps the
    images back to pixels; without one, or for ZCA-whitened images (no inverse kept), each
    image is min-max scaled on its own (the title says so)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    images, labels = np.asarray(images, np.float32), np.asarray(labels)
    hard = labels if labels.ndim == 1 else labels.argmax(-1)
    classes = sorted(set(int(c) for c in hard))
    exact = bool(normalization) and not normalization.get("zca")
    if exact:
        images = np.clip(images * np.asarray(normalization["std"], np.float32)
                         + np.asarray(normalization["mean"], np.float32), 0.0, 1.0)
    else:
        lo = images.min(axis=(1, 2, 3), keepdims=True)
        hi = images.max(axis=(1, 2, 3), keepdims=True)
        images = (images - lo) / np.maximum(hi - lo, 1e-12)
    cols = min(per_class, max(int(np.sum(hard == c)) for c in classes))
    fig, axes = plt.subplots(len(classes), cols, figsize=(cols * 0.8, len(classes) * 0.8),
                             squeeze=False)
    for i, c in enumerate(classes):
        rows = np.flatnonzero(hard == c)[:cols]
        for j in range(cols):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(rows):
                img = images[rows[j]]
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            if j == 0:
                ax.set_title(str(c), fontsize=6, loc="left")
    how = "" if exact else " (each image min-max scaled)"
    fig.suptitle(f"{title}{how}", fontsize=8)
    fig.savefig(path, dpi=100, metadata={"Title": title})
    plt.close(fig)
    return path


def load_report(path: str) -> dict:
    """Read a results.json written by `write_report` or by the evaluation stage."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"No results file at {path}: run `elf-jax evaluate` first.")
    with open(path) as f:
        try:
            report = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); re-run `elf-jax evaluate`.")
    bad = _malformed(report)
    if bad:
        raise ValueError(f"{path} is malformed ({bad}): edited or damaged? Re-run `elf-jax "
                         "evaluate` (finished runs are read back from their checkpoints).")
    return report


# What each part of a results/sweep file must be (the reader indexes into them).
_SHAPE = {"results": "dict of dicts", "request": "dict", "provenance": "dict", "synset": "dict",
          "teachers": "dict"}


def _malformed(report: Any) -> str:
    """What is wrong with the structure of a loaded results.json / sweep.json ("" if
    nothing): a part of another type, or per-repeat accuracies that are not numbers."""
    if not isinstance(report, dict):
        return f"a {type(report).__name__} instead of a JSON object"
    for key, shape in _SHAPE.items():
        value = report.get(key)
        if value is None:
            continue
        if not isinstance(value, dict) or (shape == "dict of dicts" and not all(
                isinstance(v, dict) for v in value.values())):
            return f"'{key}' is not a {shape}"
    prov = report.get("provenance") or {}
    for key in ("teachers", "synset"):
        if prov.get(key) is not None and not isinstance(prov[key], dict):
            return f"'provenance.{key}' is not a dict"
    ref = report.get("reference")
    if ref is not None and not (isinstance(ref, dict) and all(
            isinstance(v, dict) and isinstance(v.get("results", {}), dict) for v in ref.values())):
        return "'reference' is not a dict of {'results': ...} per reference"
    return (_malformed_results(report.get("results") or {}, "results")
            or next((m for kind in (ref or {}) for m in [_malformed_results(
                _reference_results(report, kind), f"reference.{kind}.results")] if m), ""))


def _malformed_results(results: Mapping[str, Any], where: str) -> str:
    for arch, by_mode in results.items():
        if not isinstance(by_mode, dict):
            return f"'{where}.{arch}' is not a dict"
        for mode, entry in by_mode.items():
            accs = entry.get("accs") if isinstance(entry, dict) else None
            if isinstance(entry, dict) and "accs" in entry and not (
                    isinstance(accs, list) and all(isinstance(a, (int, float)) for a in accs)):
                return f"'{where}.{arch}.{mode}.accs' is not a list of numbers"
    return ""


# ------------------------------------------------------------------ lambda sweeps
# sweep.json (`elf-jax sweep`): {"results": {arch: elf_jax.elf.sweep.lambda_sweep's dict
# without the per-epoch losses}, "request": {..., "sweep": {"lambda_front", "lambda_rear",
# "mode", "baseline"}}, "provenance", "partial"}. Tables: rows lambda_front, columns
# lambda_rear; cells mean ± std (n in the title), and the paired gain over the baseline.
def _lam(v: float) -> str:
    return f"{float(v):g}"


def _sweep_grids(arch: str, e: Mapping[str, Any]) -> list[tuple[str, list, list[list]]]:
    """``[(title, header, body)]``: the accuracy grid, then (with a baseline) the gains."""
    corner = "lambda_front \\ lambda_rear"
    header = [corner] + [_lam(v) for v in e["lambda_rear"]]
    n = int(e.get("repeats") or len(e["accs"][0][0]))
    acc = [[_lam(f)] + [format_accuracy(m, s, n, n) for m, s in zip(e["mean"][i], e["std"][i])]
           for i, f in enumerate(e["lambda_front"])]
    split = e.get("evaluated_on", "test")  # sweeps before the validation split: test
    out = [(f"{arch}, mode {e['mode']}: {split} accuracy % (mean ± std, n={n})", header, acc)]
    b = e.get("baseline")
    if b:
        gains = [[_lam(f)] + [_gain_cell({"gain": g["mean"], "gain_ci95": g.get("ci95"),
                                          "gain_significant": g.get("significant")})
                              for g in e["gain"][i]] for i, f in enumerate(e["lambda_front"])]
        base = format_accuracy(b["mean"], b["std"], len(b["accs"]))
        out.append((f"{arch}: gain over the baseline (task: {base}), points "
                    "[paired 95% CI, * excludes 0]", header, gains))
    return out


def sweep_partial_line(report: Mapping[str, Any]) -> str:
    """The loud line of a sweep.json that does not hold every requested architecture."""
    pool = (report.get("request") or {}).get("pool") or list(report.get("results") or {})
    done = [a for a in pool if a in (report.get("results") or {})]
    if len(done) == len(pool) and not report.get("partial"):
        return ""
    missing = [a for a in pool if a not in done]
    return (f"PARTIAL: {len(done)} of {len(pool)} architectures swept (missing: "
            f"{', '.join(missing) or 'none'}); rerun `elf-jax sweep --config ... --workdir ...` "
            "(it resumes) to complete")


def _sweep_settings(report: Mapping[str, Any]) -> list[str]:
    req = report.get("request") or {}
    lines = settings_lines({"request": req, "provenance": report.get("provenance") or {}})
    sw = req.get("sweep")
    if sw:
        points = len(sw["lambda_front"]) * len(sw["lambda_rear"])
        lines.insert(1, f"sweep: mode {sw['mode']}, lambda_front {sw['lambda_front']} x "
                        f"lambda_rear {sw['lambda_rear']} = {points} points x "
                        f"{req.get('repeats')} repeats per architecture in one compiled program; "
                        + ("baseline: mode task, repeat r from the same weights as repeat r of "
                           "every point" if sw.get("baseline") else "no baseline"))
    entries = list((report.get("results") or {}).values())
    entries += [e["baseline"] for e in entries if e.get("baseline")]
    if entries:
        now = sum(float(e.get("seconds") or 0) for e in entries)
        totals = [e.get("total_seconds") for e in entries]
        lines.append(f"training time: {now:.0f} s in this process" + (
            "" if any(t is None for t in totals) else
            f", {sum(totals):.0f} s over all processes"))
    return lines


def sweep_text(report: Mapping[str, Any], title: str = "", notes: Sequence[str] = ()) -> str:
    """What a terminal shows of a sweep: loud lines, title, the grids and the settings."""
    parts = [line for line in (sweep_partial_line(report), *notes) if line]
    parts += [title] if title else []
    for arch, e in (report.get("results") or {}).items():
        parts += [f"\n{t}\n{_aligned(h, b)}" for t, h, b in _sweep_grids(arch, e)]
    settings = _sweep_settings(report)
    return "\n".join(parts + (["\nsettings:"] + [f"  {s}" for s in settings] if settings else []))


def sweep_markdown(report: Mapping[str, Any], title: str = "", notes: Sequence[str] = ()) -> str:
    """sweep.md: loud lines, title, one table per grid, a Settings section."""
    parts = [f"**{line}**\n" for line in (sweep_partial_line(report), *notes) if line]
    parts += [f"# {title}\n"] if title else []
    for arch, e in (report.get("results") or {}).items():
        for t, header, body in _sweep_grids(arch, e):
            parts.append(f"## {t}\n\n{_markdown(header, body)}\n")
    settings = _sweep_settings(report)
    if settings:
        parts.append("## Settings\n\n" + "\n".join(f"- {s}" for s in settings))
    return "\n".join(parts) + "\n"


def _heat(ax, values, e, text, cmap, vmin, vmax, title, dark):
    """A grid as an image, every cell labelled (white where `dark(normalized value)`)."""
    im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower", aspect="auto")
    for i in range(len(e["lambda_front"])):
        for j in range(len(e["lambda_rear"])):
            ax.text(j, i, text(i, j), ha="center", va="center", fontsize="x-small",
                    color="white" if dark(float(im.norm(values[i][j]))) else "black")
    ax.set_xticks(range(len(e["lambda_rear"])), [_lam(v) for v in e["lambda_rear"]])
    ax.set_yticks(range(len(e["lambda_front"])), [_lam(v) for v in e["lambda_front"]])
    ax.set_xlabel("lambda_rear")
    ax.set_ylabel("lambda_front")
    ax.set_title(title, fontsize="small")
    return im


def sweep_heatmap(report: Mapping[str, Any], path: str, title: str = "") -> str:
    """One column per architecture: the mean accuracy over the grid, and (with a baseline)
    the paired gain over it on a scale centred at zero; every cell carries its numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    results = report.get("results") or {}
    archs = list(results)
    rows = 2 if any(e.get("baseline") for e in results.values()) else 1
    w = max([len(e["lambda_rear"]) for e in results.values()] + [2])
    h = max([len(e["lambda_front"]) for e in results.values()] + [2])
    cols = max(len(archs), 1)
    fig, axes = plt.subplots(rows, cols, squeeze=False, layout="constrained",
                             figsize=(cols * (1.2 * w + 2), rows * (0.6 * h + 2) + 0.8))
    for c, arch in enumerate(archs):
        e = results[arch]
        mean, std = 100 * np.asarray(e["mean"]), 100 * np.asarray(e["std"])
        im = _heat(axes[0][c], mean, e, lambda i, j: f"{mean[i, j]:.1f}\n±{std[i, j]:.1f}",
                   "viridis", None, None, f"{arch} {e['mode']}: accuracy % (n={e['repeats']})",
                   lambda v: v < 0.5)
        fig.colorbar(im, ax=axes[0][c], shrink=0.8)
        if rows == 2 and e.get("gain"):
            g = [[100 * x["mean"] for x in row] for row in e["gain"]]
            lim = max(0.5, float(np.max(np.abs(g))))

            def cell(i, j, e=e, g=g):
                ci = e["gain"][i][j].get("ci95")
                star = "*" if e["gain"][i][j].get("significant") else ""
                return f"{g[i][j]:+.1f}{star}" + (
                    f"\n[{100 * ci[0]:+.1f},{100 * ci[1]:+.1f}]" if ci else "")

            b = e["baseline"]
            im = _heat(axes[1][c], np.asarray(g), e, cell, "RdBu", -lim, lim,
                       f"gain over task ({100 * b['mean']:.1f}), points, paired 95% CI",
                       lambda v: abs(v - 0.5) > 0.3)
            fig.colorbar(im, ax=axes[1][c], shrink=0.8)
        elif rows == 2:
            axes[1][c].axis("off")
    import textwrap

    chars = int(fig.get_figwidth() * 11)  # about what fits at this font size
    fig.suptitle("\n".join(textwrap.fill(line, chars) for line in title.splitlines()),
                 fontsize="small")
    fig.savefig(path, dpi=120, metadata={"Title": title})
    plt.close(fig)
    return path


def write_sweep_report(report: Mapping[str, Any], outdir: str, title: str = "",
                       notes: Sequence[str] = ()) -> dict[str, str]:
    """sweep.json, sweep.md and sweep.png in `outdir`; returns their paths."""
    if not report.get("results"):
        raise ValueError("the sweep has no results yet: run `elf-jax sweep` first")
    from elf_jax.checkpoint import write_json_atomic

    os.makedirs(outdir, exist_ok=True)
    paths = {key: os.path.join(outdir, f"sweep.{ext}")
             for key, ext in (("json", "json"), ("markdown", "md"), ("plot", "png"))}
    write_json_atomic(paths["json"], dict(report))
    with open(paths["markdown"], "w") as f:
        f.write(sweep_markdown(report, title, notes))
    heading = [line for line in (sweep_partial_line(report), *notes) if line]
    chart_title = "\n".join(heading + [title, plot_subtitle(report)]).strip()
    sweep_heatmap(report, paths["plot"], chart_title)
    return paths
