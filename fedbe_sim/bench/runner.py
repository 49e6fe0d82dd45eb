"""Running the bench: each method on each seed's federation, resumed from earlier records of the same
settings, optionally in worker processes side by side; and the start the diagnosis scripts share.

**Time.** Clients train one after another on this machine; each client's round time is its measured
training time times its profile's compute slowdown plus its transfer time over the profile's link
(:func:`fedbe_sim.bench.methods.emulated`). A round lasts as long as its slowest client (synchronous
FedAvg), and "wall seconds" are the sum of those emulated round times. FedBE clients get a deadline
(``deadline_factor`` x the median client's time to train every block) and the allocation gives slow
clients fewer, higher blocks; LoRA and full fine-tuning have no such knob: every client backpropagates
through the whole model.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fedbe import progress_bar
from fedbe.errors import ConfigError
from fedbe_sim.bench.method_table import METHODS
from fedbe_sim.bench.methods import FullMethod, Method, make_method
from fedbe_sim.bench.records import settings_digest
from fedbe_sim.bench.report import write_results
from fedbe_sim.bench.settings import PROBE_HEAD, BenchSettings
from fedbe_sim.bench.world import (
    Federation,
    build_federation,
    evaluate,
    evaluate_against,
    final_probe,
    measure_capacities,
)


def add_diagnosis_arguments(parser: Any, methods: Sequence[str]) -> None:
    """The flags the diagnosis scripts in ``benchmarks/`` share: model, seed, alpha, method and split."""
    d = BenchSettings()
    parser.add_argument("--model", default=d.model, help=f"model source (default {d.model})")
    parser.add_argument("--seed", type=int, default=0, help="the bench seed (label split); default 0")
    parser.add_argument("--alpha", type=float, default=d.alpha,
                        help=f"Dirichlet alpha of the label split, as in fedbe bench (default {d.alpha})")  # fmt: skip
    parser.add_argument(
        "--method", default="fedbe", choices=methods, help="a fedbe bench method; default fedbe"
    )
    parser.add_argument("--split", default="validation", choices=("validation", "test"),
                        help="evaluation data (default validation: choices are made there)")  # fmt: skip


def diagnosis_run(
    args: Any, say: Callable[[str], None] = print, **overrides: Any
) -> tuple[BenchSettings, Federation, Method]:
    """The bench's settings for the flags of :func:`add_diagnosis_arguments` (plus ``overrides``),
    the federation of that seed with its capacities measured, and the method on it: what the diagnosis
    scripts in ``benchmarks/`` start from, so they see exactly the bench's run."""
    settings = replace(
        BenchSettings(
            model=args.model, split=args.split, seeds=(args.seed,), methods=(args.method,), alpha=args.alpha
        ),  # fmt: skip
        **overrides,
    )
    federation = build_federation(settings, args.seed, say)
    measure_capacities(federation, say)
    return settings, federation, make_method(args.method, federation)


def run_method(federation: Federation, name: str, say: Callable[[str], None]) -> dict[str, Any]:
    started, settings = time.perf_counter(), federation.settings
    method = make_method(name, federation)
    record: dict[str, Any] = {"method": name, "seed": federation.seed, "rounds": []}
    if isinstance(method, FullMethod):
        estimate = method.estimate_seconds()
        if estimate > settings.full_ft_budget_seconds:
            say(f"  {name}: skipped — an estimated {estimate:.0f} s of training exceeds the budget of "
                f"{settings.full_ft_budget_seconds:.0f} s (--full-ft-budget)")  # fmt: skip
            record["skipped"] = (
                f"estimated {estimate:.0f} s > budget {settings.full_ft_budget_seconds:.0f} s"
            )
            return record
    trainable = sum(t.numel() for params in method.global_state.values() for t in params.values())
    record["trainable_parameters"] = trainable
    # Round 0: this method's model before training (the expanded model, or LoRA with B = 0, is exactly
    # the base at this precision); retention is measured against it.
    with torch.no_grad():
        untrained = method.eval_model()
        before = evaluate(federation, untrained)
    before.update(final_probe(federation, untrained, before))
    record["round0"] = before
    if not federation.base_scores:
        federation.base_scores = before
    final = (f" (final probe {before['final_definition_accuracy']:.4f} of {len(before['final_definition_answers'])})"
             if "final_definition_answers" in before else "")  # fmt: skip
    say(f"  {name} before training: accuracy {before['accuracy']:.3f}, definitions "
        f"{before['definition_accuracy']:.3f}{final}, perplexity {before['perplexity']:.2f}")  # fmt: skip
    wall = 0.0
    for r in range(1, settings.rounds + 1):
        results = method.round(r)
        round_seconds = max((x.emulated_seconds for x in results), default=0.0)
        wall += round_seconds
        model = method.eval_model()
        scores = evaluate_against(federation, model, before)
        if r == settings.rounds:
            scores.update(final_probe(federation, model, scores, before))
        row: dict[str, Any] = {
            "round": r, **scores, "emulated_round_seconds": round_seconds, "emulated_wall_seconds": wall,
            "train_seconds": sum(x.train_seconds for x in results),
            "bytes_up_per_client": statistics.fmean(x.bytes_up for x in results) if results else 0,
            "bytes_down_per_client": statistics.fmean(x.bytes_down for x in results) if results else 0,
            "clients": len(results), "loss": statistics.fmean(x.loss for x in results) if results else float("nan"),
            "assignments": {x.client_id: list(x.blocks) for x in results},
            "client_seconds": {x.client_id: [round(x.emulated_seconds, 4), round(x.transfer_seconds, 4)]
                               for x in results},  # emulated round seconds, of which transfer
            "base_forwards": sum(x.base_forwards for x in results),
            "withdrawn_blocks": list(method.withdrawn),
            "seconds_per_step": sum(x.train_seconds for x in results)
            / max(1, settings.steps * len(results)),
            **method.round_info,
        }  # fmt: skip
        record["rounds"].append(row)
        say(
            f"  {name} round {r}/{settings.rounds}: accuracy {scores['accuracy']:.3f}, definitions "
            f"{scores['definition_accuracy']:.3f}, perplexity {scores['perplexity']:.2f}"
            + (
                f" (first {PROBE_HEAD} quotations {scores['perplexity_head']:.2f})"
                if "perplexity_head" in scores
                else ""
            )
            + f", loss {row['loss']:.3f}, {row['seconds_per_step']:.2f} s/step here, "
            f"emulated round {round_seconds:.0f} s"
            + (f"; blocks {list(method.withdrawn)} left untrained (label skew)" if method.withdrawn else "")
            + ("; NO CLIENT TRAINED this round" if not results else "")
        )
        if "final_definition_retention" in scores:
            say(f"  {name} final probe: definitions {scores['final_definition_accuracy']:.4f} of "
                f"{len(scores['final_definition_answers'])} (retention {scores['final_definition_retention']:.4f}; "
                f"{scores['final_definitions_lost']} lost, {scores['final_definitions_gained']} gained)")  # fmt: skip
    record["peak_client_memory_bytes"] = method.peak_memory
    record["seconds"] = time.perf_counter() - started
    del method
    return record


def previous_records(path: Path, settings: BenchSettings) -> dict[tuple[str, int], dict[str, Any]]:
    """Method runs of the same settings (as each method depends on them) from an earlier run in the same folder."""
    if not path.is_file():
        return {}
    done = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not (isinstance(rec, dict) and isinstance(rec.get("method"), str) and "seed" in rec):
            continue
        if rec.get("settings_digest") == settings_digest(settings, rec["method"]):
            done[(rec["method"], int(rec["seed"]))] = rec
    return done


def run_bench(settings: BenchSettings, out: Path, command: str = "fedbe bench",
              say: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    records: list[dict[str, Any]] = []
    base_scores: dict[str, float] = {}
    done = previous_records(out / "records.jsonl", settings)
    if done:
        say(f"resuming: {len(done)} method run(s) of these settings already in {out / 'records.jsonl'}")
    with (out / "records.jsonl").open("w") as handle:
        for rec in done.values():
            handle.write(json.dumps(rec) + "\n")
    for seed in settings.seeds:
        federation: Federation | None = None
        for i, name in enumerate(settings.methods, 1):
            if (name, seed) in done:
                rec = done[(name, seed)]
                say(f"[seed {seed}] method {i}/{len(settings.methods)}: {name} (from the previous run)")
            else:
                if federation is None:
                    federation = build_federation(settings, seed, say)
                    measure_capacities(federation, say)
                    first = next((r for (m, s_), r in done.items() if s_ == seed and r.get("round0")), None)
                    if first is not None:
                        federation.base_scores = first["round0"]
                say(f"[seed {seed}] method {i}/{len(settings.methods)}: {name} "
                    f"({time.perf_counter() - started:.0f} s elapsed)")  # fmt: skip
                torch.manual_seed(seed)
                rec = run_method(federation, name, say)
                rec["settings_digest"] = settings_digest(settings, name)
                with (out / "records.jsonl").open("a") as handle:
                    handle.write(json.dumps(rec) + "\n")
            if not base_scores and rec.get("round0"):
                base_scores = rec["round0"]
            records.append(rec)
    return write_results(records, base_scores, settings, out, command, say, started)


# rough run time of a method relative to fedbe's (those not listed: 1), from the table
METHOD_COST = {name: spec.cost for name, spec in METHODS.items() if spec.cost != 1.0}


def balanced_parts(methods: Sequence[str], jobs: int) -> list[tuple[str, ...]]:
    """Methods split over ``jobs`` workers, greedily by rough cost (:data:`METHOD_COST`), order kept."""
    loads: list[float] = [0.0] * jobs
    parts: list[list[str]] = [[] for _ in range(jobs)]
    for name in sorted(methods, key=lambda m: -METHOD_COST.get(m, 1.0)):
        k = loads.index(min(loads))
        parts[k].append(name)
        loads[k] += METHOD_COST.get(name, 1.0)
    return [tuple(m for m in methods if m in part) for part in parts if part]


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _job(settings: BenchSettings, out: Path, command: str, job: int, threads: int) -> None:
    """One worker of ``--jobs``: its share of the methods, with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    # the workers share the parent's terminal: a bar each would draw over one another
    os.environ[progress_bar.ENV] = "off"
    run_bench(settings, out, command, say=lambda text: print(f"[job {job}] {text}", flush=True))


def run_bench_jobs(settings: BenchSettings, out: Path, jobs: int, command: str = "fedbe bench",
                   say: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Run the methods in ``jobs`` worker processes that share the cores evenly, then report as one run.

    Every worker builds the same federation (same seed: identical shards, profiles and evaluation items)
    and measures its own step times with the same number of threads, so the emulated times stay
    comparable between methods of different workers as long as the workers run side by side. Each
    worker writes ``out/job-K/``; their records are merged into ``out/records.jsonl`` and the table
    is rendered from them (an interrupted run resumes, per worker).
    """
    import multiprocessing  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    previous = previous_records(out / "records.jsonl", settings)
    # a method is done when every requested seed of it is (a run extended to more seeds trains the new ones)
    todo = [m for m in settings.methods if any((m, seed) not in previous for seed in settings.seeds)]
    parts = balanced_parts(todo, jobs)
    for k, part in enumerate(parts if len(parts) > 1 else []):
        # each worker resumes from its own folder: give it the finished seeds of its methods, whichever
        # worker ran them before
        job_records = out / f"job-{k}" / "records.jsonl"
        mine = {**previous_records(job_records, settings),
                **{key: rec for key, rec in previous.items() if key[0] in part}}  # fmt: skip
        job_records.parent.mkdir(parents=True, exist_ok=True)
        job_records.write_text("".join(json.dumps(rec) + "\n" for rec in mine.values()))
    threads = max(1, (os.cpu_count() or 1) // max(1, len(parts)))
    if len(parts) > 1:
        say(f"running {len(todo)} method(s) in {len(parts)} worker processes, {threads} thread(s) each: "
            + "; ".join(",".join(p) for p in parts))  # fmt: skip
        ctx = multiprocessing.get_context("spawn")
        workers = []
        for k, part in enumerate(parts):
            proc = ctx.Process(target=_job, args=(replace(settings, methods=part), out / f"job-{k}", command, k,
                                                  threads))  # fmt: skip
            proc.start()
            workers.append(proc)
        # SIGTERM (kill, a service stop) ends the workers too, as Ctrl-C does, instead of orphaning them
        on_main = threading.current_thread() is threading.main_thread()
        old_handler = signal.signal(signal.SIGTERM, _interrupt) if on_main else None
        try:
            for proc in workers:
                proc.join()
        except KeyboardInterrupt:
            for proc in workers:
                proc.terminate()
            for proc in workers:
                proc.join(10)
            raise
        finally:
            if on_main:
                signal.signal(signal.SIGTERM, old_handler)
        failed = [k for k, proc in enumerate(workers) if proc.exitcode != 0]
        if failed:
            raise ConfigError(
                f"bench worker(s) {failed} failed (see their messages above); finished methods are kept "
                f"in {out}/job-K/records.jsonl and the same command resumes"
            )
        with (out / "records.jsonl").open("a") as handle:
            for k in range(len(parts)):
                for rec in previous_records(out / f"job-{k}" / "records.jsonl", settings).values():
                    handle.write(json.dumps(rec) + "\n")
    return run_bench(settings, out, command, say)
