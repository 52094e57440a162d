"""The summary of a cross-architecture evaluation: per architecture, mean/std/n of the test
accuracy per loss mode and the ELF gain with its paired 95% confidence interval, made once
by `cross_evaluate` and read by the report. Repeat r of the baseline and of ELF start from
the same weights, so the gain is judged on the per-repeat differences (a paired t
interval), not on two independent spreads. When the knowledge-distillation control ``kd`` was
run too, ELF's gain over it is given the same way (``gain_vs_kd``): does ELF give more than
the teacher's logits alone?"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

__all__ = ["BASELINE_MODE", "ELF_MODE", "KD_MODE", "paired_gain", "paired_gains", "summarize",
           "t_interval"]

BASELINE_MODE = "task"
ELF_MODE = "front_rear_task"
KD_MODE = "kd"  # elf_jax.losses.KD_MODE (not imported: the report needs no jax)


def _mean_std(accs: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (numpy's default, as the reference reports)."""
    n = len(accs)
    if n == 0:
        return math.nan, math.nan
    mean = sum(accs) / n
    var = sum((a - mean) ** 2 for a in accs) / n
    return mean, math.sqrt(var)


def summarize(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict]:
    """Per architecture: mean/std/n per mode and the ELF gain (ELF mean - baseline mean),
    with the 95% confidence interval of the paired gain (`gain_ci95`, None for one repeat)
    and whether it excludes zero (`gain_significant`)."""
    summary = {}
    paired = paired_gains(results)
    for arch, by_mode in results.items():
        row: dict[str, Any] = {}
        for mode, entry in by_mode.items():
            mean, std = _mean_std([float(a) for a in entry["accs"]])
            row[mode] = {"mean": mean, "std": std, "n": len(entry["accs"])}
        if BASELINE_MODE in row and ELF_MODE in row:
            row["gain"] = row[ELF_MODE]["mean"] - row[BASELINE_MODE]["mean"]
            row["gain_ci95"] = paired[arch]["ci95"]
            row["gain_significant"] = paired[arch]["significant"]
        if KD_MODE in row and ELF_MODE in row:  # only when the KD control was run
            row.update(_vs_kd(row, by_mode))
        summary[arch] = row
    return summary


def _vs_kd(row: Mapping[str, Any], by_mode: Mapping[str, Any]) -> dict:
    """ELF mean - KD mean and the paired interval of the per-repeat differences."""
    g = paired_gains({"_": by_mode}, baseline=KD_MODE)["_"]
    return {"gain_vs_kd": row[ELF_MODE]["mean"] - row[KD_MODE]["mean"],
            "gain_vs_kd_ci95": g["ci95"], "gain_vs_kd_significant": g["significant"]}


def t_interval(values: Sequence[float], level: float = 0.95) -> list[float] | None:
    """The ``level`` confidence interval of the mean of ``values`` (Student's t with n-1
    degrees of freedom and the sample standard deviation); None for fewer than 2 values."""
    n = len(values)
    if n < 2:
        return None
    from scipy.stats import t

    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return [mean - half, mean + half]


def paired_gains(results: Mapping[str, Mapping[str, Mapping[str, Any]]],
                 baseline: str = BASELINE_MODE, treatment: str = ELF_MODE) -> dict[str, dict]:
    """Per architecture with both modes: mean/std/n of the per-repeat ``treatment`` -
    ``baseline`` differences (ELF - task by default; repeat r of both modes starts from the
    same weights, so the pairs share the initialization and their spread is the gain's own)."""
    return {arch: paired_gain(by_mode[baseline]["accs"], by_mode[treatment]["accs"])
            for arch, by_mode in results.items() if baseline in by_mode and treatment in by_mode}


def paired_gain(baseline: Sequence[float], treated: Sequence[float]) -> dict:
    """Mean/std/n of the per-repeat differences ``treated[r] - baseline[r]`` with their 95% t
    interval (``ci95``, None for one pair) and whether it excludes zero (``significant``)."""
    diffs = [float(e) - float(b) for b, e in zip(baseline, treated)]
    mean, std = _mean_std(diffs)
    ci = t_interval(diffs)
    return {"mean": mean, "std": std, "n": len(diffs), "ci95": ci,
            "significant": None if ci is None else bool(ci[0] > 0 or ci[1] < 0)}
