"""The bench's report: results.md (the table, the paired comparison, the probes' question counts),
results.json and the plots."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedbe_sim.bench.method_table import METHODS
from fedbe_sim.bench.settings import BLOCK_METHODS, PROBE_HEAD, BenchSettings
from fedbe_sim.bench.stats import (
    PAIRED_KEYS,
    by_method,
    mean_curves,
    paired_differences,
    position_risks,
    seed_curve,
    summarise,
    target_accuracy,
)

# the heading of each of PAIRED_KEYS in the paired comparison of results.md
PAIRED_COLUMNS = {"accuracy": "accuracy", "perplexity_retention": "perplexity retention",
                  "definition_retention": "definitions retention",
                  "final_definition_retention": "definitions retention, final probe"}  # fmt: skip


def paired_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The lines of the results' seed-by-seed comparison (none without rows)."""
    if not rows:
        return []
    keys = [k for k in PAIRED_KEYS if any(k in row for row in rows)]
    lines = [
        "",
        f"{rows[0]['method']} minus each method, seed by seed (mean difference ± half-width of its 95% "
        "t-interval; the per-seed differences in brackets; an interval that holds 0 is not resolved by "
        "these seeds):",
        "",
        "| against | seeds | " + " | ".join(PAIRED_COLUMNS[k] for k in keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]

    def cell(d: dict[str, Any] | None) -> str:
        if d is None:
            return "n/a"
        spread = "" if d["ci95"] is None else f" ± {d['ci95']:.3f}"
        each = " / ".join(f"{x:+.3f}" for x in d["differences"])
        return f"{d['mean']:+.4f}{spread} ({each})"

    for row in rows:
        seeds = ",".join(str(s) for s in row["seeds"])
        lines.append(f"| {row['against']} | {seeds} | " + " | ".join(cell(row.get(k)) for k in keys) + " |")
    both = [row for row in rows if "final_definition_answers" in row]
    if both:

        def split(row: dict[str, Any]) -> str:
            d = row["final_definition_answers"]
            each = ", ".join(f"{a}/{b}" for a, b in zip(d["only_mine"], d["only_theirs"], strict=True))
            floor = (f"; their untrained models, the same base weights, already answer {sum(d['base_differs'])} "
                     "differently" if "base_differs" in d else "")  # fmt: skip
            return (f"against {row['against']} {sum(d['only_mine'])} / {sum(d['only_theirs'])} of "
                    f"{d['questions']} (p {d['p']:.2f}; by seed {each}{floor})")  # fmt: skip

        lines += [
            "",
            f"Final probe, question by question (the same questions, each method's final model): right under "
            f"{rows[0]['method']} only / under the other only, exact McNemar p (below 0.05 one is resolved ahead): "
            + "; ".join(split(row) for row in both)
            + ".",
        ]
    return lines


def _pm(v: tuple[float, float], fmt: str) -> str:
    return format(v[0], fmt) + (f" ± {format(v[1], fmt)}" if v[1] else "")


def results_markdown(summary: list[dict[str, Any]], base: dict[str, float], settings: BenchSettings,
                     command: str, paired: list[dict[str, Any]] | None = None) -> str:  # fmt: skip
    lines = [
        "# fedbe bench results", "",
        f"Command: `{command}`", "",
        f"Model {settings.model}, {settings.clients} clients ({', '.join(settings.profiles[: settings.clients])}), "
        f"Dirichlet alpha {settings.alpha}, {settings.rounds} rounds x {settings.steps} steps x batch "
        f"{settings.batch_size} x {settings.max_tokens} tokens, seeds {list(settings.seeds)}, evaluated on the "
        f"{settings.split} split. Base model: accuracy {base['accuracy']:.3f}, definition choice "
        f"{base['definition_accuracy']:.3f}, general perplexity {base['perplexity']:.2f}.", "",
        "| method | accuracy | definitions (retention) | perplexity (retention) | rounds / emulated s to target "
        "| up / down per client-round | peak client memory | trainable params | s/step here |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in summary:
        if "skipped" in row:
            lines.append(f"| {row['method']} | skipped: {row['skipped']} | | | | | | | |")
            continue
        reach = (
            "not reached" if row["rounds_to_target"] is None
            else f"{row['rounds_to_target']:.1f} / {row['seconds_to_target']:.0f} s"
        )  # fmt: skip
        lines.append(
            f"| {row['method']} | {_pm(row['accuracy'], '.3f')} | {_pm(row['definition_accuracy'], '.3f')} "
            f"({_pm(row['definition_retention'], '.3f')}) | {_pm(row['perplexity'], '.2f')} "
            f"({_pm(row['perplexity_retention'], '.3f')}) | {reach} | "
            f"{row['bytes_up_per_client_round'] / 1e6:.2f} / {row['bytes_down_per_client_round'] / 1e6:.2f} MB | "
            f"{row['peak_client_memory_bytes'] / 2**20:.0f} MiB | {row['trainable_parameters'] / 1e6:.2f}M | "
            f"{row['seconds_per_step']:.2f} |"
        )
    heads = [r for r in summary if "perplexity_head_retention" in r]
    if heads:
        lines += [
            "",
            f"Perplexity retention on the first {PROBE_HEAD} of the {settings.probe_texts} quotations (the "
            "smaller probe of earlier runs, the same texts): "
            + ", ".join(f"{r['method']} {_pm(r['perplexity_head_retention'], '.3f')}" for r in heads)
            + ".",
        ]
    private = [r for r in summary if "epsilon" in r]
    if private:
        lines += [
            "",
            f"Differential privacy (DP-FedAvg in the coordinator's close_round, the new-block methods): noise "
            f"multiplier {settings.dp_noise_multiplier:g}, clip norm {settings.dp_clip_norm:g}; epsilon at delta "
            f"{settings.dp_delta:g} after the last round (sampling rate 1: every client every round): "
            + ", ".join(f"{r['method']} {r['epsilon']:.4g}" for r in private)
            + ".",
        ]
    from fedbe.general_ability import mcnemar_p  # noqa: PLC0415

    def changed(r: dict[str, Any], probe: str = "") -> str:
        """``lost / gained (p; by seed)`` of ``probe`` ("" the per-round one, "final_" the final one)."""
        lost_each, gained_each = r[f"{probe}definitions_lost"], r[f"{probe}definitions_gained"]
        lost, gained = sum(lost_each), sum(gained_each)
        each = ", ".join(f"{a}/{b}" for a, b in zip(lost_each, gained_each, strict=True))
        return f"{lost} / {gained} (p {mcnemar_p(lost, gained):.2f}; by seed {each})"

    changes = [r for r in summary if r.get("definition_questions")]  # none without questions
    if changes:
        lines += [
            "",
            "Definition questions lost / gained against the method's own model before training, over "
            f"{changes[0]['definition_questions']} question-seeds (exact McNemar p: how likely a split at least "
            "this uneven is if a changed answer is as likely lost as gained; below 0.05, the loss or gain "
            "is resolved): " + "; ".join(f"{r['method']} {changed(r)}" for r in changes) + ".",
        ]
    finals = [r for r in summary if r.get("final_definition_questions")]
    if finals:

        def final(r: dict[str, Any]) -> str:
            return f"{r['method']} {_pm(r['final_definition_retention'], '.4f')}, {changed(r, 'final_')}"

        lines += [
            "",
            f"Final probe (the definition questions above and {settings.final_probe_questions} more a seed, "
            f"{finals[0]['final_definition_questions']} question-seeds, scored before training and after the "
            "last round): definitions retention, questions lost / gained: "
            + "; ".join(final(r) for r in finals)
            + ".",
        ]
    risks = position_risks(summary)
    if risks is not None:
        lines += [
            "",
            "Forgetting by position (one new block, plain cross-entropy; loss of general ability = 1 - mean of "
            "the two retentions): "
            + ", ".join(f"{METHODS[m].position} {v:.3f}" for m, v in risks["forgetting"].items())
            + ". "
            f"For the coordinator: `allocation: {{top_risk: {risks['top_risk']}, interleaved_risk: "
            f"{risks['interleaved_risk']}}}`.",
        ]
    lines += paired_markdown(paired or [])
    target = next((r["target_accuracy"] for r in summary if "target_accuracy" in r), float("nan"))
    lines += [
        "",
        f"Target = 90% of the best final accuracy = {target:.3f}. Retention: definition accuracy after / before "
        "and perplexity before / after (1.0 = nothing forgotten). Emulated seconds: each round lasts as long as "
        "its slowest client (measured training time x profile slowdown + transfer over the profile's link). "
        "Memory: model tensors + tensors saved for backward + gradient and AdamW moments of the trained "
        "parameters, measured on one step.",
    ]
    return "\n".join(lines) + "\n"


def plot_results(records: list[dict[str, Any]], base: dict[str, float], out: Path) -> list[Path]:
    """Two figures: accuracy and both retentions per round, and accuracy against emulated time.

    Each method is drawn as its mean over the seeds (bold, labelled with the seed count), each seed
    faint behind it, so methods can be compared at a glance and the spread is still visible. The
    time plot marks the target (90% of the best mean final accuracy, as in the table).
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    runs = by_method([r for r in records if r["rounds"]])
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(runs)}
    several = any(len(recs) > 1 for recs in runs.values())

    def label(m: str) -> str:
        return m if len(runs[m]) == 1 else f"{m} (mean of {len(runs[m])} seeds)"

    written = []
    panels = [("accuracy", "BBC test accuracy", base["accuracy"]),
              ("definition_retention", "definition-choice retention (after / before)", 1.0),
              ("perplexity_retention", "perplexity retention (before / after)", 1.0)]  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, (key, title, ref) in zip(axes, panels, strict=True):
        for m, recs in runs.items():
            if len(recs) > 1:
                for rec in recs:
                    _, ys = seed_curve(rec, key)
                    ax.plot(range(len(ys)), ys, color=colours[m], alpha=0.2, lw=1)
            _, ys = mean_curves(records, m, key)
            ax.plot(range(len(ys)), ys, marker="o", color=colours[m], label=label(m), lw=2)
        ax.axhline(ref, color="grey", lw=0.8, ls="--")
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("fedbe bench: downstream accuracy and general-ability retention per round (round 0 = base"
                 + ("; faint lines: single seeds)" if several else ")"))  # fmt: skip
    fig.tight_layout()
    path = out / "accuracy_retention.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    longest = 0.0
    for m, recs in runs.items():
        if len(recs) > 1:
            for rec in recs:
                xs, ys = seed_curve(rec, "accuracy")
                ax.plot(xs, ys, color=colours[m], alpha=0.2, lw=1)
                longest = max(longest, xs[-1])
        xs, ys = mean_curves(records, m, "accuracy")
        ax.plot(xs, ys, marker="o", color=colours[m], label=label(m), lw=2)
        longest = max(longest, xs[-1])
    target = target_accuracy(records)
    if math.isfinite(target):
        ax.axhline(
            target, color="black", lw=0.8, ls=":", label=f"target {target:.3f} (90% of the best mean final)"
        )
    if longest > 1000:  # full fine-tuning's rounds can dwarf the others: compress beyond 100 s
        ax.set_xscale("symlog", linthresh=100)
        ax.set_xlabel("emulated wall-clock seconds (slowest client per round; linear to 100 s, log beyond)")
    else:
        ax.set_xlabel("emulated wall-clock seconds (slowest client per round; mean over seeds per round)")
    ax.set_ylabel("BBC test accuracy")
    ax.set_title("accuracy versus emulated wall-clock time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "accuracy_vs_time.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def write_results(records: list[dict[str, Any]], base_scores: dict[str, float], settings: BenchSettings,
                  out: Path, command: str, say: Callable[[str], None] = print,
                  started: float | None = None) -> dict[str, Any]:  # fmt: skip
    """results.json, results.md and the plots of finished method runs (``records``), to ``out``."""
    started = time.perf_counter() if started is None else started
    summary = summarise(records, base_scores)
    paired = paired_differences(records, next((m for m in settings.methods if m in BLOCK_METHODS), "fedbe"))
    results = {"settings": asdict(settings), "command": command, "base": base_scores, "summary": summary,
               "paired": paired, "position_risks": position_risks(summary),
               "records": records, "seconds": time.perf_counter() - started}  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    md = results_markdown(summary, base_scores, settings, command, paired)
    (out / "results.md").write_text(md)
    plot_results(records, base_scores, out)
    say(md)
    say(
        f"wrote {out / 'results.json'}, {out / 'results.md'} and plots in {time.perf_counter() - started:.0f} s"
    )
    return results
