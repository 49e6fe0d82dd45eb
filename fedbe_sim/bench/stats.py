"""The bench's statistics over method runs: each method's final figures and time to the target, its
seed-by-seed differences from FedBE with 95% t-intervals, forgetting by position, and the mean curves."""

from __future__ import annotations

import math
import statistics
from typing import Any

from fedbe_sim.bench.method_table import METHODS
from fedbe_sim.bench.settings import POSITION_METHODS


def by_method(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The records of each method (its seeds), methods in order of first appearance."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        grouped.setdefault(rec["method"], []).append(rec)
    return grouped


def target_accuracy(records: list[dict[str, Any]]) -> float:
    """The accuracy every method is timed to: 90% of the best mean final accuracy among the methods
    whose every seed ran (NaN when none did)."""
    finals = [
        statistics.fmean(r["rounds"][-1]["accuracy"] for r in recs)
        for recs in by_method(records).values()
        if all(r["rounds"] for r in recs)
    ]
    return 0.9 * max(finals) if finals else float("nan")


def summarise(records: list[dict[str, Any]], base: dict[str, float]) -> list[dict[str, Any]]:
    """One row per method: final figures (mean and spread over seeds) and time to 90% of the best."""
    target = target_accuracy(records)
    rows = []
    for m, recs in by_method(records).items():
        if not all(r["rounds"] for r in recs):
            rows.append({"method": m, "skipped": recs[0].get("skipped", "no rounds")})
            continue

        def stat(key: str, recs: list[dict[str, Any]] = recs) -> tuple[float, float]:
            values = [r["rounds"][-1][key] for r in recs]
            return statistics.fmean(values), (max(values) - min(values)) / 2 if len(values) > 1 else 0.0

        reach_rounds, reach_seconds = [], []
        for r in recs:
            hit = next((row for row in r["rounds"] if row["accuracy"] >= target), None)
            reach_rounds.append(hit["round"] if hit else None)
            reach_seconds.append(hit["emulated_wall_seconds"] if hit else None)
        rounds = recs[0]["rounds"]
        rows.append({
            "method": m, "seeds": len(recs), "accuracy": stat("accuracy"),
            "definition_accuracy": stat("definition_accuracy"), "perplexity": stat("perplexity"),
            "definition_retention": stat("definition_retention"), "perplexity_retention": stat("perplexity_retention"),
            "target_accuracy": target,
            "rounds_to_target": None if None in reach_rounds else statistics.fmean(reach_rounds),  # type: ignore[arg-type]
            "seconds_to_target": None if None in reach_seconds else statistics.fmean(reach_seconds),  # type: ignore[arg-type]
            "bytes_up_per_client_round": statistics.fmean(x["bytes_up_per_client"] for x in rounds),
            "bytes_down_per_client_round": statistics.fmean(x["bytes_down_per_client"] for x in rounds),
            "peak_client_memory_bytes": max(r["peak_client_memory_bytes"] for r in recs),
            "trainable_parameters": recs[0]["trainable_parameters"],
            "seconds_per_step": statistics.fmean(x["seconds_per_step"] for x in rounds),
            "emulated_wall_seconds": statistics.fmean(r["rounds"][-1]["emulated_wall_seconds"] for r in recs),
        })  # fmt: skip
        if all("perplexity_head_retention" in r["rounds"][-1] for r in recs):
            rows[-1]["perplexity_head_retention"] = stat("perplexity_head_retention")
        # questions lost / gained on the per-round probe and on the final probe (where the records hold
        # them: the earliest have neither, later ones only the first; the final probe's carry its retention)
        for probe in ("", "final_"):
            if all(f"{probe}definitions_lost" in r["rounds"][-1] for r in recs):
                for key in (f"{probe}definitions_lost", f"{probe}definitions_gained"):
                    rows[-1][key] = [int(r["rounds"][-1][key]) for r in recs]
                rows[-1][f"{probe}definition_questions"] = sum(
                    len(r["round0"][f"{probe}definition_answers"]) for r in recs
                )
        if all("final_definition_retention" in r["rounds"][-1] for r in recs):
            rows[-1]["final_definition_retention"] = stat("final_definition_retention")
        if all("privacy" in r["rounds"][-1] for r in recs):  # DP-FedAvg: the epsilon spent by the end
            rows[-1]["epsilon"] = max(r["rounds"][-1]["privacy"]["epsilon"] for r in recs)
    return rows


# two-sided 95% quantiles of Student's t by degrees of freedom (beyond the table: the normal's 1.96)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip
PAIRED_KEYS = ("accuracy", "perplexity_retention", "definition_retention", "final_definition_retention")



def t_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom: the table up to 30
    (conservative between rows), beyond it the Cornish-Fisher expansion around the normal quantile
    (within 0.0002 of the exact value from df 30 on, and above the normal quantile 1.959964)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= max(T_975):
        return T_975[max(d for d in T_975 if d <= df)]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_differences(records: list[dict[str, Any]], method: str = "fedbe") -> list[dict[str, Any]]:
    """``method`` against every other method, seed by seed (the runs share splits, profiles and
    budgets per seed, so the per-seed difference removes what the seed does to both).

    One row per other method with at least one seed in common: the seeds, and for each of
    :data:`PAIRED_KEYS` (final round) the per-seed differences ``method - other``, their mean and the
    half-width of a 95% t-interval of the mean (None with one seed). A difference whose interval
    holds 0 is not resolved by these seeds (a mean of NaN, no interval, where a seed's value is not
    finite). Where both ran the final probe on every common seed, ``final_definition_answers``
    compares their final models question by question: per seed the questions only ``method`` got
    right and those only the other got right, and the exact McNemar p of the totals; and, where both
    records hold their round 0, ``base_differs``: per seed the questions their untrained models
    answer differently (the same base weights through each method's arithmetic: the probe's floor,
    below which a difference between two methods means nothing). Empty when ``method`` has no
    finished run.
    """
    from fedbe.general_ability import answer_changes, mcnemar_p  # noqa: PLC0415

    groups = by_method(records)
    mine = {r["seed"]: r for r in groups.get(method, []) if r.get("rounds")}
    rows: list[dict[str, Any]] = []
    for other, recs in groups.items():
        if other == method:
            continue
        theirs = {r["seed"]: r for r in recs if r.get("rounds")}
        seeds = sorted(set(mine) & set(theirs))
        if not seeds:
            continue
        row: dict[str, Any] = {"method": method, "against": other, "seeds": seeds}
        for key in PAIRED_KEYS:
            if not all(key in mine[s]["rounds"][-1] and key in theirs[s]["rounds"][-1] for s in seeds):
                continue
            diffs = [float(mine[s]["rounds"][-1][key]) - float(theirs[s]["rounds"][-1][key]) for s in seeds]
            if not all(math.isfinite(d) for d in diffs):  # e.g. a retention over a zero score
                row[key] = {"differences": diffs, "mean": float("nan"), "ci95": None}
                continue
            mean = statistics.fmean(diffs)
            half = (
                t_975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
                if len(diffs) > 1
                else None
            )
            row[key] = {"differences": diffs, "mean": mean, "ci95": half}
        answers = [(mine[s]["rounds"][-1].get("final_definition_answers"),
                    theirs[s]["rounds"][-1].get("final_definition_answers")) for s in seeds]  # fmt: skip
        if all(a and b and len(a) == len(b) for a, b in answers):  # the same questions (same seed)
            # answer_changes(mine, theirs): right under mine only ("lost" by theirs), right under theirs only
            only_mine, only_theirs = (
                list(c) for c in zip(*(answer_changes(a, b) for a, b in answers), strict=True)
            )
            row["final_definition_answers"] = {
                "only_mine": only_mine, "only_theirs": only_theirs,
                "p": mcnemar_p(sum(only_mine), sum(only_theirs)), "questions": sum(len(a) for a, _ in answers),
            }  # fmt: skip
            # the probe's floor: both untrained models hold the same base weights, but with
            # --lora-base plain (the earlier runs) the LoRA methods computed them as the plain
            # 16-bit model and FedBE through freeze_base's float32 residual stream, and a near-tied
            # question can fall either way (0 everywhere with --lora-base frozen)
            bases = [(mine[s].get("round0", {}).get("final_definition_answers"),
                      theirs[s].get("round0", {}).get("final_definition_answers")) for s in seeds]  # fmt: skip
            if all(
                a and b and len(a) == len(b) == len(f) for (a, b), (f, _) in zip(bases, answers, strict=True)
            ):
                row["final_definition_answers"]["base_differs"] = [
                    sum(x != y for x, y in zip(a, b, strict=True)) for a, b in bases
                ]
        rows.append(row)
    return rows


def position_risks(summary: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Allocation risks from the position ablation: each position's loss of general ability
    (1 - perplexity retention, averaged with 1 - definition retention) relative to the worst one.

    Returns ``{"forgetting": {position: loss}, "top_risk": r, "interleaved_risk": r}`` for the
    coordinator's ``allocation`` section, or None when the position methods did not run.
    """
    rows = {r["method"]: r for r in summary if "skipped" not in r}
    if not all(m in rows for m in POSITION_METHODS):
        return None
    loss = {
        m: max(0.0, 1 - (rows[m]["perplexity_retention"][0] + rows[m]["definition_retention"][0]) / 2)
        for m in POSITION_METHODS
    }
    worst = max(loss.values())
    if worst <= 0:
        return {"forgetting": loss, "top_risk": 0.0, "interleaved_risk": 0.0}
    at = {METHODS[m].position: loss[m] for m in POSITION_METHODS}  # depth -> loss
    interleaved = max(at["bottom"], at["middle"]) / worst
    return {
        "forgetting": loss,
        "top_risk": round(at["top"] / worst, 3),
        "interleaved_risk": round(interleaved, 3),
    }


def seed_curve(record: dict[str, Any], key: str) -> tuple[list[float], list[float]]:
    """One seed's run: emulated wall-clock seconds and ``key`` after each round, round 0 (before
    training) first: the base's accuracy, or 1 for a retention."""
    first = float(record["round0"]["accuracy"]) if key == "accuracy" else 1.0
    return (
        [0.0] + [row["emulated_wall_seconds"] for row in record["rounds"]],
        [first] + [row[key] for row in record["rounds"]],
    )


def mean_curves(records: list[dict[str, Any]], method: str, key: str) -> tuple[list[float], list[float]]:
    """One method's mean over its seeds, per round (round 0 = before training): ``key`` per round
    against the mean emulated wall-clock seconds, cut to the rounds every seed has."""
    curves = [seed_curve(r, key) for r in records if r["method"] == method and r["rounds"]]
    if not curves:
        return [], []
    n = min(len(xs) for xs, _ in curves)
    return (
        [statistics.fmean(xs[i] for xs, _ in curves) for i in range(n)],
        [statistics.fmean(ys[i] for _, ys in curves) for i in range(n)],
    )
