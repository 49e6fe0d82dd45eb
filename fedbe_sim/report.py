"""Results of a federated run, from the coordinator's ``metrics.jsonl``: a table, a report and plots.

Pure functions from metric records to text and figures (:func:`summarize` -> :class:`RoundSummary`,
:func:`markdown`, :func:`round_line`, the ``plot_*`` functions); the only I/O is reading the file
(:func:`read_metrics`) and saving the PNGs a caller names. Plots use matplotlib's ``Figure``
directly (Agg canvas, no pyplot state), one shared :data:`STYLE`.

Round 0 is the base model (the coordinator's ``server_eval.baseline``): its accuracy is the
zero-shot reference, its probe scores the "before" of the retention figures.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STYLE: dict[str, Any] = {
    "figsize": (9.0, 4.0),
    "dpi": 110,
    "accuracy": "#1f77b4",
    "baseline": "#7f7f7f",
    "definition": "#2ca02c",
    "perplexity": "#d62728",
    "up": "#ff7f0e",
    "down": "#1f77b4",
}


@dataclass(frozen=True)
class RoundSummary:
    """One round of a run (round 0: the base model, before any training)."""

    round: int
    accuracy: float | None = None
    definition_accuracy: float | None = None
    perplexity: float | None = None
    definition_retention: float | None = None
    perplexity_retention: float | None = None
    mean_loss: float | None = None
    updates: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    assignments: dict[str, list[int]] = field(default_factory=dict)
    trained: dict[str, list[int]] = field(default_factory=dict)  # accepted updates: client -> blocks
    blocks: tuple[int, ...] = ()  # every new block of the model in this round
    eval_examples: int = 0
    probe_questions: int = 0
    probe_texts: int = 0


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON object of a ``metrics.jsonl`` (a line being written is skipped)."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            records.append(value)
    return records


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def summarize_record(record: Mapping[str, Any]) -> RoundSummary:
    server = record.get("server_evaluation") or {}
    probes = server.get("probes") or {}
    kept = server.get("retention") or {}
    updates = record.get("updates") or {}
    losses = [u["loss"] for u in updates.values() if u.get("steps") and _number(u.get("loss")) is not None]
    blocks = {int(b) for b in (record.get("blocks") or {})}
    assignments = {c: sorted(int(b) for b in bs) for c, bs in (record.get("assignments") or {}).items()}
    blocks |= {b for bs in assignments.values() for b in bs}
    return RoundSummary(
        round=int(record["round"]),
        accuracy=_number(server.get("accuracy")),
        definition_accuracy=_number(probes.get("definition_accuracy")),
        perplexity=_number(probes.get("perplexity")),
        definition_retention=_number(kept.get("definition_retention")),
        perplexity_retention=_number(kept.get("perplexity_retention")),
        mean_loss=sum(losses) / len(losses) if losses else None,
        updates=len(updates),
        bytes_up=sum(int(v) for v in (record.get("bytes_up") or {}).values()),
        bytes_down=sum(int(v) for v in (record.get("bytes_down") or {}).values()),
        seconds=float(record.get("seconds") or 0.0),
        assignments=assignments,
        trained={c: sorted(int(b) for b in u.get("blocks", [])) for c, u in updates.items()},
        blocks=tuple(sorted(blocks)),
        eval_examples=int(server.get("examples") or 0),
        probe_questions=int(probes.get("questions") or 0),
        probe_texts=int(probes.get("texts") or 0),
    )


def summarize(records: Sequence[Mapping[str, Any]]) -> list[RoundSummary]:
    """One summary per round, in order; a round logged twice (re-run after a crash) counts once, last wins."""
    by_round = {int(r["round"]): r for r in records if isinstance(r.get("round"), int)}
    return [summarize_record(by_round[k]) for k in sorted(by_round)]


def baseline_of(rounds: Sequence[RoundSummary]) -> RoundSummary | None:
    return next((r for r in rounds if r.round == 0), None)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def round_line(r: RoundSummary, total_rounds: int | None = None) -> str:
    """One progress line for a closed round (or the base model's evaluation, round 0)."""
    probes = (
        f"; definitions {_fmt(r.definition_accuracy)}, perplexity {_fmt(r.perplexity, '.2f')}"
        if r.definition_accuracy is not None
        else ""
    )
    if r.round == 0:
        return f"round 0 (base model): zero-shot accuracy {_fmt(r.accuracy)} on {r.eval_examples} test articles{probes}"
    of = f"/{total_rounds}" if total_rounds else ""
    kept = (
        f"; retention: definitions {_fmt(r.definition_retention)}, perplexity {_fmt(r.perplexity_retention)}"
        if r.definition_retention is not None or r.perplexity_retention is not None
        else probes
    )
    return (
        f"round {r.round}{of} closed: {r.updates} updates, mean loss {_fmt(r.mean_loss, '.3f')}, "
        f"accuracy {_fmt(r.accuracy)}{kept}; {_mb(r.bytes_up)} up, {_mb(r.bytes_down)} down, {r.seconds:.0f} s"
    )


def final_line(rounds: Sequence[RoundSummary]) -> str:
    base = baseline_of(rounds)
    trained = [r for r in rounds if r.round > 0]
    if not trained:
        return "no training round finished"
    last = trained[-1]
    parts = [f"after round {last.round}: accuracy {_fmt(last.accuracy)}"]
    if base is not None:
        parts.append(f"(base model zero-shot {_fmt(base.accuracy)})")
    if last.definition_retention is not None or last.perplexity_retention is not None:
        parts[-1] += ";"
        parts.append(
            f"retention: definitions {_fmt(last.definition_retention)}, perplexity {_fmt(last.perplexity_retention)}"
        )
    return " ".join(parts)


def _blocks_text(blocks: Sequence[int]) -> str:
    return "[" + ",".join(str(b) for b in blocks) + "]" if blocks else "-"


def markdown(rounds: Sequence[RoundSummary], meta: Mapping[str, str], images: Sequence[str]) -> str:
    """The run's report: settings, one table row per round, the final comparison and the plots."""
    lines = ["# fedbe simulation report", ""]
    lines += [f"- **{k}**: {v}" for k, v in meta.items()]
    lines += ["", "## Rounds", ""]
    lines.append(
        "| round | updates | allocation (blocks per client) | mean client loss | accuracy | definition acc. "
        "| definition retention | perplexity | perplexity retention | up | down | wall |"
    )
    lines.append("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rounds:
        alloc = "base model" if r.round == 0 else "; ".join(
            f"{c} {_blocks_text(b)}" for c, b in sorted(r.assignments.items())
        )  # fmt: skip
        lines.append(
            f"| {r.round} | {r.updates} | {alloc} | {_fmt(r.mean_loss)} | {_fmt(r.accuracy)} "
            f"| {_fmt(r.definition_accuracy)} | {_fmt(r.definition_retention)} | {_fmt(r.perplexity, '.2f')} "
            f"| {_fmt(r.perplexity_retention)} | {_mb(r.bytes_up)} | {_mb(r.bytes_down)} | {r.seconds:.0f} s |"
        )
    lines += ["", "## Result", "", final_line(rounds) + ".", ""]
    all_blocks = {b for r in rounds for b in r.blocks}
    trained_blocks = {b for r in rounds for bs in r.trained.values() for b in bs}
    if all_blocks - trained_blocks:
        lines += [
            f"New blocks never trained in this run: {sorted(all_blocks - trained_blocks)} (no client was given "
            "them: see the allocation rules, e.g. `allocation.max_unprotected_risk` for the top block; they "
            "stay the identity).",
            "",
        ]
    lines.append(
        "Accuracy: the coordinator's global model on held-out BBC News test articles (5 classes, chance "
        "0.2); round 0 is the base model, zero-shot. Retention: WordNet definition accuracy after / before "
        "and quotation perplexity before / after, against round 0 (1.0 = nothing forgotten). Bytes are "
        "MQTT payloads: tasks down (the block weights a client receives, at the run's "
        "`download_level`: every block, the ones a client does not train frozen), updates up (at "
        "`upload_level`)."
    )
    if images:
        lines += ["", "## Plots", ""]
        lines += [f"![{Path(name).stem}]({name})" for name in images]
    return "\n".join(lines) + "\n"


# --- plots -----------------------------------------------------------------------------------------


def _figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] | None = None) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # noqa: PLC0415 - slow import, only when plotting

    fig = Figure(figsize=size or STYLE["figsize"], dpi=STYLE["dpi"], layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def plot_quality(rounds: Sequence[RoundSummary], path: Path) -> Path:
    """Left: downstream accuracy per round (round 0 = base model). Right: general-ability retention."""
    fig, axes = _figure(2)
    acc, ret = axes[0][0], axes[0][1]
    xs = [r.round for r in rounds if r.accuracy is not None]
    ys = [r.accuracy for r in rounds if r.accuracy is not None]
    acc.plot(xs, ys, marker="o", color=STYLE["accuracy"], label="global model")
    base = baseline_of(rounds)
    if base is not None and base.accuracy is not None:
        acc.axhline(
            base.accuracy, ls="--", color=STYLE["baseline"], label=f"base zero-shot {base.accuracy:.2f}"
        )
    acc.axhline(0.2, ls=":", color=STYLE["baseline"], lw=0.8, label="chance (5 classes)")
    for x, y in zip(xs, ys, strict=True):
        acc.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    acc.set(title="Downstream accuracy (BBC News test)", xlabel="round", ylabel="accuracy", ylim=(0, 1.05))
    acc.legend(loc="lower right", fontsize=8)
    trained = [r for r in rounds if r.definition_retention is not None or r.perplexity_retention is not None]
    if trained:
        rx = [0, *[r.round for r in trained]]
        q, t = trained[-1].probe_questions, trained[-1].probe_texts
        for key, label, color in (
            (
                "definition_retention",
                f"definition accuracy after / before ({q} questions)",
                STYLE["definition"],
            ),
            ("perplexity_retention", f"perplexity before / after ({t} quotations)", STYLE["perplexity"]),
        ):
            ry = [1.0, *[getattr(r, key) if getattr(r, key) is not None else math.nan for r in trained]]
            ret.plot(rx, ry, marker="o", color=color, label=label)
        ret.axhline(1.0, ls="--", color=STYLE["baseline"], lw=0.8)
        values = [
            v for r in trained for v in (r.definition_retention, r.perplexity_retention) if v is not None
        ]
        low, high = min([1.0, *values]), max([1.0, *values])
        pad = max(0.05, (high - low) * 0.2)
        ret.set_ylim(low - pad, high + pad)
        ret.legend(loc="lower left", fontsize=8)
    else:
        ret.text(0.5, 0.5, "no general-ability probes in this run", ha="center", va="center",
                 transform=ret.transAxes)  # fmt: skip
    ret.set(title="General-ability retention (1.0 = base model)", xlabel="round", ylabel="ratio to base")
    for ax in (acc, ret):
        ax.set_xticks([r.round for r in rounds])
        ax.grid(alpha=0.3)
    fig.savefig(path)
    return path


def allocation_grid(r: RoundSummary, clients: Sequence[str], blocks: Sequence[int]) -> list[list[float]]:
    """``[client][block]``: 2 trained (update accepted), 1 assigned without an accepted update, 0 not assigned."""
    grid = [[0.0] * len(blocks) for _ in clients]
    for ci, c in enumerate(clients):
        for b in r.assignments.get(c, []):
            grid[ci][list(blocks).index(b)] = 2.0 if b in r.trained.get(c, []) else 1.0
    return grid


def plot_allocation(rounds: Sequence[RoundSummary], path: Path) -> Path:
    """One clients x blocks heat map per round: trained (update accepted), assigned without an accepted
    update, or not assigned."""
    from matplotlib.colors import ListedColormap  # noqa: PLC0415

    trained_rounds = [r for r in rounds if r.round > 0]
    clients = sorted({c for r in trained_rounds for c in r.assignments})
    blocks = sorted({b for r in trained_rounds for b in r.blocks})
    n = max(len(trained_rounds), 1)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    width = max(3.2 * cols, 6.0) + 1.5
    fig, axes = _figure(cols, rows, (width, 0.6 + rows * (0.45 * max(len(clients), 1) + 1.2)))
    cmap = ListedColormap(["#f0f0f0", "#fdae61", "#1a9641"])
    for i, ax in enumerate(ax for row in axes for ax in row):
        if i >= len(trained_rounds):
            ax.set_visible(False)
            continue
        r = trained_rounds[i]
        grid = allocation_grid(r, clients, blocks)
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=2, aspect="auto")
        ax.set_xticks(range(len(blocks)), [str(b) for b in blocks])
        ax.set_yticks(range(len(clients)), clients if i % cols == 0 else [""] * len(clients), fontsize=8)
        ax.set_xticks([x - 0.5 for x in range(1, len(blocks))], minor=True)
        ax.set_yticks([y - 0.5 for y in range(1, len(clients))], minor=True)
        ax.grid(which="minor", color="white", lw=2)
        ax.tick_params(which="minor", length=0)
        ax.set(title=f"round {r.round}", xlabel="new block")
    from matplotlib.patches import Patch  # noqa: PLC0415

    legend = [Patch(color=cmap(2), label="trained (update accepted)"),
              Patch(color=cmap(1), label="assigned, no accepted update"),
              Patch(color=cmap(0), label="not assigned")]  # fmt: skip
    fig.legend(handles=legend, loc="outside lower center", ncols=3, fontsize=8)
    fig.suptitle("Allocation: which client trained which new block")
    fig.savefig(path)
    return path


def plot_bytes(rounds: Sequence[RoundSummary], path: Path) -> Path:
    """Megabytes sent to the clients (tasks) and back (updates) per round."""
    fig, axes = _figure(1, 1, (7.0, 3.6))
    ax = axes[0][0]
    trained = [r for r in rounds if r.round > 0]
    xs = [r.round for r in trained]
    down = [r.bytes_down / 1e6 for r in trained]
    up = [r.bytes_up / 1e6 for r in trained]
    ax.bar(
        [x - 0.2 for x in xs], down, width=0.4, color=STYLE["down"], label="down (tasks: fp32 block weights)"
    )
    ax.bar([x + 0.2 for x in xs], up, width=0.4, color=STYLE["up"], label="up (updates: int8 deltas)")
    for x, d, u in zip(xs, down, up, strict=True):
        ax.annotate(
            f"{d:.0f}", (x - 0.2, d), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=8
        )
        ax.annotate(
            f"{u:.0f}", (x + 0.2, u), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=8
        )
    ax.set(title="Traffic per round", xlabel="round", ylabel="MB")
    ax.set_xticks(xs)
    ax.set_ylim(0, max([*down, *up, 1.0]) * 1.15)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)
    return path


def write_plots(rounds: Sequence[RoundSummary], folder: Path) -> list[Path]:
    """The three plots of a run, as PNGs in ``folder``."""
    return [
        plot_quality(rounds, folder / "accuracy_retention.png"),
        plot_allocation(rounds, folder / "allocation.png"),
        plot_bytes(rounds, folder / "bytes.png"),
    ]
