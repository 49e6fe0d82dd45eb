"""``fedbe bench`` end to end on a tiny model: every output file, consistent metrics, and the pure parts."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest
import torch

from fedbe import general_ability
from fedbe.errors import ConfigError
from fedbe_sim import bench


def test_bad_settings_are_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match="unknown method"):
        bench.BenchSettings(methods=("fedbe", "lora-magic"))
    with pytest.raises(ConfigError, match="split"):
        bench.BenchSettings(split="train")
    with pytest.raises(ConfigError, match="alpha"):
        bench.BenchSettings(alpha=0.0)
    for name, value in (("deadline_factor", 0.0), ("distill_sample", -1), ("distill_rows", -1),
                        ("distill_top_k", -1), ("lora_distill_lambda", -1.0),
                        ("distill_lambda", float("nan")), ("server_lr", 0.0), ("lr_decay", -0.5),
                        ("lora_lr_decay", 0.0), ("block_average", "blocks"),
                        ("max_block_divergence", float("nan"))):  # fmt: skip
        with pytest.raises(ConfigError, match=name):
            bench.BenchSettings(**{name: value})
    with pytest.raises(ConfigError, match="no device profile"):
        bench.resolve_profile("toaster-9000")
    with pytest.raises(ConfigError, match="--placement: invalid placement 'bottom'"):
        bench.BenchSettings(placement="bottom")
    with pytest.raises(ConfigError, match="lists 2 base layers for 6 new blocks"):
        bench.BenchSettings(placement="4,9")


def _record(method: str, accs: list[float], seconds: list[float]) -> dict:
    rounds = []
    for i, (a, t) in enumerate(zip(accs, seconds, strict=True), 1):
        rounds.append({
            "round": i, "accuracy": a, "definition_accuracy": 0.6, "perplexity": 40.0,
            "definition_retention": 1.0, "perplexity_retention": 1.0, "emulated_wall_seconds": t,
            "bytes_up_per_client": 10, "bytes_down_per_client": 20, "seconds_per_step": 1.0,
        })  # fmt: skip
    return {
        "method": method,
        "seed": 0,
        "rounds": rounds,
        "peak_client_memory_bytes": 1,
        "trainable_parameters": 5,
    }


def test_time_to_target_is_the_first_round_at_90_percent_of_the_best_final_accuracy() -> None:
    records = [
        _record("a", [0.5, 0.8, 0.9], [10, 20, 30]),  # best final 0.9 -> target 0.81
        _record("b", [0.82, 0.85, 0.86], [50, 100, 150]),
        _record("c", [0.3, 0.4, 0.5], [1, 2, 3]),
        {"method": "full-ft", "seed": 0, "rounds": [], "skipped": "estimated 999 s > budget 10 s"},
    ]
    rows = {r["method"]: r for r in bench.summarise(records, {})}
    assert rows["a"]["target_accuracy"] == pytest.approx(0.81)
    assert (rows["a"]["rounds_to_target"], rows["a"]["seconds_to_target"]) == (3, 30)
    assert (rows["b"]["rounds_to_target"], rows["b"]["seconds_to_target"]) == (1, 50)
    assert rows["c"]["rounds_to_target"] is None
    assert "skipped" in rows["full-ft"]
    base = {"accuracy": 0.3, "definition_accuracy": 0.6, "perplexity": 40.0}
    md = bench.results_markdown(list(rows.values()), base, bench.BenchSettings(), "fedbe bench")
    assert "not reached" in md and "skipped: estimated 999 s" in md
    assert "first 48 of the" not in md  # no record scored a head probe
    a1, a2 = _record("a", [0.9], [10]), _record("a", [0.8], [10])
    a2["seed"] = 1
    a1["rounds"][-1]["perplexity_head_retention"], a2["rounds"][-1]["perplexity_head_retention"] = 0.99, 1.01
    rows = bench.summarise([a1, a2, _record("b", [0.9], [10])], {})
    assert rows[0]["perplexity_head_retention"] == pytest.approx((1.0, 0.01))
    assert "perplexity_head_retention" not in rows[1]  # b's records have none
    md = bench.results_markdown(rows, base, bench.BenchSettings(), "fedbe bench")
    assert "first 48 of the 192 quotations" in md and "a 1.000 ± 0.010" in md and ", b " not in md


def test_lost_and_gained_questions_are_summed_over_seeds_and_reported_with_mcnemar() -> None:
    def rec(seed: int, method: str, before: str, after: str) -> dict:
        r = _record(method, [0.9], [10]) | {"seed": seed, "round0": {"definition_answers": before}}
        lost, gained = general_ability.answer_changes(before, after)
        r["rounds"][-1] |= {
            "definition_answers": after,
            "definitions_lost": lost,
            "definitions_gained": gained,
        }
        return r

    records = [
        rec(0, "a", "1100", "0101"),
        rec(1, "a", "0000", "1111"),
        rec(0, "b", "", ""),
        rec(1, "b", "", ""),
    ]
    rows = {r["method"]: r for r in bench.summarise(records, {})}
    assert (rows["a"]["definitions_lost"], rows["a"]["definitions_gained"]) == ([1, 0], [1, 4])
    assert rows["a"]["definition_questions"] == 8 and rows["b"]["definition_questions"] == 0
    base = {"accuracy": 0.3, "definition_accuracy": 0.6, "perplexity": 40.0}
    md = bench.results_markdown(list(rows.values()), base, bench.BenchSettings(), "fedbe bench")
    p = general_ability.mcnemar_p(1, 5)
    assert "over 8 question-seeds" in md and f"a 1 / 5 (p {p:.2f}; by seed 1/1, 0/4)" in md
    assert "; b " not in md  # a probe without questions has nothing to report
    # records without per-question answers: no line
    md = bench.results_markdown(
        bench.summarise([_record("a", [0.9], [10])], {}), base, bench.BenchSettings(), "x"
    )
    assert "lost / gained" not in md


def test_mean_curves_average_each_round_over_the_seeds_and_cut_to_the_shortest(tmp_path) -> None:
    one = _record("a", [0.6, 0.8, 0.9], [10, 20, 30]) | {"round0": {"accuracy": 0.5}}
    two = _record("a", [0.8, 1.0], [30, 60]) | {"seed": 1, "round0": {"accuracy": 0.7}}
    other = _record("b", [0.1, 0.1], [1, 2]) | {"round0": {"accuracy": 0.1}}
    xs, ys = bench.mean_curves([one, two, other], "a", "accuracy")
    assert xs == pytest.approx([0.0, 20.0, 40.0])  # round 3 only one seed has: dropped
    assert ys == pytest.approx([0.6, 0.7, 0.9])
    xs, ys = bench.mean_curves([one, two], "a", "perplexity_retention")
    assert ys == pytest.approx([1.0, 1.0, 1.0])  # round 0 of a retention is 1 by definition
    assert bench.mean_curves([one], "missing", "accuracy") == ([], [])
    written = bench.plot_results([one, two, other], {"accuracy": 0.5}, tmp_path)
    assert [p.name for p in written] == ["accuracy_retention.png", "accuracy_vs_time.png"]
    assert all(p.stat().st_size > 10_000 for p in written)


def test_quick_bench_on_a_tiny_model_writes_consistent_results(tmp_path) -> None:
    settings = bench.BenchSettings(
        model="tiny:llama", methods=("fedbe", "fedit", "ffa-lora"), clients=3, rounds=2, steps=2,
        distill_rows=0,  # every row distilled: the cache check below counts whole batches
        examples_per_client=8, eval_examples=10, probe_questions=8, final_probe_questions=6, probe_texts=6,
        max_tokens=64,
        profiles=("rtx-4090-24gb", "cpu-laptop", "jetson-orin-nano-8gb"),
    )  # fmt: skip
    messages: list[str] = []
    results = bench.run_bench(settings, tmp_path, say=messages.append)
    # progress names the final probe before training and after the last round, for every method
    assert sum("before training" in m and "(final probe " in m and " of 14)" in m for m in messages) == 3
    assert sum("final probe: definitions" in m and " of 14 (retention " in m for m in messages) == 3
    for name in (
        "results.json",
        "results.md",
        "records.jsonl",
        "accuracy_retention.png",
        "accuracy_vs_time.png",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in on_disk["summary"]] == ["fedbe", "fedit", "ffa-lora"]
    assert all(r["definition_questions"] == 8 for r in on_disk["summary"])
    assert all(r["final_definition_questions"] == 14 for r in on_disk["summary"])
    assert (
        "Final probe (the definition questions above and 6 more a seed, 14 question-seeds"
        in (tmp_path / "results.md").read_text()
    )
    assert (
        "Definition questions lost / gained against the method's own model"
        in (tmp_path / "results.md").read_text()
    )
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == 3
    for rec in results["records"]:
        assert [row["round"] for row in rec["rounds"]] == [1, 2]  # one line per round
        for row in rec["rounds"]:
            for key in ("accuracy", "definition_accuracy"):
                assert 0.0 <= row[key] <= 1.0
            # per-question answers: their mean is the accuracy, and lost / gained count the changes from round 0
            answers, first = row["definition_answers"], rec["round0"]["definition_answers"]
            assert len(answers) == len(first) == 8
            assert answers.count("1") / 8 == pytest.approx(row["definition_accuracy"])
            lost = sum(a == "1" and b == "0" for a, b in zip(first, answers, strict=True))
            gained = sum(a == "0" and b == "1" for a, b in zip(first, answers, strict=True))
            assert (row["definitions_lost"], row["definitions_gained"]) == (lost, gained)
            assert first.count("1") - lost + gained == answers.count("1")
            assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1
            assert row["bytes_up_per_client"] > 0 and row["bytes_down_per_client"] > 0
            assert row["emulated_wall_seconds"] > 0
            # per client: emulated seconds and their transfer part; the round lasts as long as the slowest
            per_client = row["client_seconds"]
            assert sorted(per_client) == sorted(row["assignments"])
            assert all(0 <= transfer < total for total, transfer in per_client.values())
            assert max(total for total, _ in per_client.values()) == pytest.approx(
                row["emulated_round_seconds"], abs=0.01
            )
        assert rec["peak_client_memory_bytes"] > 0
        # the final probe: round 0 and the last round, the per-round answers followed by 6 more questions
        first, last = rec["round0"]["final_definition_answers"], rec["rounds"][-1]["final_definition_answers"]
        assert len(first) == len(last) == 8 + 6 and "final_definition_answers" not in rec["rounds"][0]
        assert (
            first[:8] == rec["round0"]["definition_answers"]
            and last[:8] == rec["rounds"][-1]["definition_answers"]
        )
        assert rec["rounds"][-1]["final_definition_accuracy"] == pytest.approx(last.count("1") / 14)
        assert (
            rec["rounds"][-1]["final_definitions_lost"],
            rec["rounds"][-1]["final_definitions_gained"],
        ) == (general_ability.answer_changes(first, last))
    fedbe_rec, fedit_rec, ffa_rec = results["records"]
    # FFA-LoRA trains and sends only B: half of FedIT's adapter
    assert ffa_rec["trainable_parameters"] * 2 == fedit_rec["trainable_parameters"]
    # distillation with a cache: the base runs once per distinct batch, not every step of every round
    # (each client has 2 batches: at most 2 base forwards per client over the whole run)
    forwards = sum(row["base_forwards"] for row in fedbe_rec["rounds"])
    steps = sum(row["clients"] for row in fedbe_rec["rounds"]) * 2
    assert 0 < forwards <= 2 * 3 and forwards < steps
    md = (tmp_path / "results.md").read_text()
    assert all(m in md for m in ("fedbe", "fedit", "ffa-lora"))


def test_position_ablation_becomes_allocation_risks() -> None:
    def row(method: str, ppl: float, defs: float) -> dict:
        return {"method": method, "perplexity_retention": (ppl, 0.0), "definition_retention": (defs, 0.0)}

    summary = [row("pos-bottom", 0.98, 1.0), row("pos-middle", 0.96, 0.98), row("pos-top", 0.6, 0.8)]
    risks = bench.position_risks(summary)
    assert risks is not None
    assert risks["top_risk"] == 1.0
    assert risks["interleaved_risk"] == pytest.approx(0.03 / 0.3, abs=1e-3)
    assert bench.position_risks(summary[:2]) is None


def test_a_client_given_a_block_it_never_trained_compresses_with_a_zero_residual() -> None:
    import types

    import torch

    method = bench.Method("fedbe-random", types.SimpleNamespace(settings=bench.BenchSettings()))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)
    first = {0: {"w": torch.randn(4, 8, generator=g)}}
    method.compress("c", first)
    second = {0: {"w": torch.randn(4, 8, generator=g)}, 1: {"w": torch.randn(4, 8, generator=g)}}
    decoded, nbytes = method.compress("c", second)  # block 1 is new to this client
    assert set(decoded) == {0, 1} and nbytes > 0
    assert torch.allclose(decoded[1]["w"], second[1]["w"], atol=0.05)


def test_an_interrupted_run_resumes_only_runs_of_the_same_settings(tmp_path) -> None:
    settings = bench.BenchSettings()
    digest = bench.settings_digest(settings, "fedbe")
    other = bench.settings_digest(bench.BenchSettings(rounds=9), "fedit")
    assert digest != other != bench.settings_digest(settings, "fedit")
    assert digest == bench.settings_digest(bench.BenchSettings(methods=("fedit",), seeds=(3,)), "fedbe")
    lines = [
        json.dumps({"method": "fedbe", "seed": 0, "settings_digest": digest, "rounds": []}),
        json.dumps({"method": "fedit", "seed": 0, "settings_digest": other, "rounds": []}),
        json.dumps({"seed": 1, "settings_digest": digest}),
        "{not json",
    ]
    (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n")
    done = bench.previous_records(tmp_path / "records.jsonl", settings)
    assert list(done) == [("fedbe", 0)]
    assert bench.previous_records(tmp_path / "missing.jsonl", settings) == {}


def test_fedbe_only_settings_change_the_digest_of_the_block_methods_only() -> None:
    """A change of FedBE's own knobs retrains FedBE, its ablations and the position methods, not
    the LoRA baselines or full FT (which read lora_lr, lora_lr_decay, lora_distill_lambda instead)."""
    default = bench.BenchSettings()
    changes = {"lr": 1.5e-3, "lr_decay": 0.7, "distill_lambda": 6.0, "deadline_factor": 0.4,
               "max_block_divergence": 0.3, "label_balance": False, "block_average": "trainers",
               "server_lr": 0.5}  # fmt: skip
    assert set(changes) == set(bench.PINNED_FOR_BASELINES)
    digest = bench.settings_digest
    for field, value in changes.items():
        changed = replace(default, **{field: value})
        for method in ("fedbe", "fedbe-plain", "fedbe-interleave", "pos-top"):
            assert digest(changed, method) != digest(default, method), (field, method)
        for method in ("fedit", "fedit-distill", "ffa-lora", "full-ft"):
            assert digest(changed, method) == digest(default, method), (field, method)
    for field, value in {"lora_lr": 1e-3, "lora_lr_decay": 1.0, "lora_distill_lambda": 1.0}.items():
        assert digest(replace(default, **{field: value}), "fedit-distill") != digest(default, "fedit-distill")


# A results.json's settings as this fedbe writes them (every setting, lists for tuples), and the
# digest each method's records carry under them: the records of a published run resume and merge
# only while these stay the same.
FIXED_RUN: dict[str, Any] = {
    "model": "smollm2-135m", "methods": ["fedbe", "fedit"], "seeds": [0, 1, 2],
    "profiles": ["rtx-4090-24gb", "cpu-laptop", "jetson-orin-nano-8gb", "jetson-xavier-nx"],
    "clients": 4, "rounds": 4, "steps": 4, "batch_size": 4, "max_tokens": 128, "lr": 0.002, "lora_lr": 0.002,
    "full_ft_lr": 0.0003, "lora_rank": 16, "blocks": 6, "placement": "interleave-mid-top", "alpha": 0.5,
    "examples_per_client": 48, "eval_examples": 100, "probe_questions": 400, "final_probe_questions": 1600,
    "probe_texts": 192, "split": "test", "distill_lambda": [3.0, 3.0, 12.0], "lora_distill_lambda": 3.0,
    "distill_top_k": 32, "distill_sample": 128, "distill_rows": 1, "deadline_factor": 0.6,
    "max_block_divergence": 1.0, "label_balance": True, "block_average": "round", "server_lr": 1.0,
    "lr_decay": 0.5, "lora_lr_decay": 0.5, "download_level": "int8", "full_ft_budget_seconds": 600.0,
    "precision": "bf16", "lora_base": "frozen", "dp_noise_multiplier": None, "dp_clip_norm": 5.0, "dp_delta": 1e-5,
}  # fmt: skip
_BLOCKS, _ELSEWHERE, _LORA = "597fb984dbc43d2e", "a551f381e3237edd", "199f141880a06ccc"
FIXED_DIGESTS = {
    "fedbe": _BLOCKS, "fedbe-plain": _BLOCKS, "fedbe-exact": _BLOCKS, "fedbe-random": _BLOCKS, "fedbe-all": _BLOCKS,
    # their own placement (interleave, or one block) leaves --placement out of their digest
    "fedbe-interleave": _ELSEWHERE, "pos-bottom": _ELSEWHERE, "pos-middle": _ELSEWHERE, "pos-top": _ELSEWHERE,
    "fedit": _LORA, "fedit-distill": _LORA, "ffa-lora": _LORA,
    "full-ft": "99c874714e90fdae",  # reads neither FedBE's knobs nor lora_base
}  # fmt: skip


@pytest.mark.parametrize("method", bench.ALL_METHODS)
def test_the_records_of_a_fixed_run_keep_their_digests(method: str) -> None:
    """A run's records resume and merge under the settings in its results.json: a change of the
    digest's rules (which settings count, what they are pinned to, a new setting not in
    DEFAULTS_BEFORE_ADDED) would orphan the records every published table was built from."""
    assert set(FIXED_DIGESTS) == set(bench.ALL_METHODS)
    assert set(FIXED_RUN) == {f.name for f in fields(bench.BenchSettings)}
    settings = bench.settings_from_dict(json.loads(json.dumps(FIXED_RUN)), "results.json")
    assert bench.settings_digest(settings, method) == FIXED_DIGESTS[method]
    # the methods and seeds a run holds are not part of what one method run depends on
    others = replace(settings, methods=(method,), seeds=(7,))
    assert bench.settings_digest(others, method) == FIXED_DIGESTS[method]


def test_a_placement_changes_the_digest_only_of_the_methods_that_use_it(tmp_path) -> None:
    """Runs from before --placement existed (all interleave) keep their digest, and LoRA records
    resume under any placement: a run with new blocks elsewhere retrains only the block methods."""
    import hashlib
    from dataclasses import asdict

    # the FedBE knobs at the values LoRA digests pin, so "before" is also a LoRA digest
    pinned = replace(bench.BenchSettings(), **bench.PINNED_FOR_BASELINES, lora_base="plain")
    data = asdict(pinned)
    del data["methods"], data["seeds"], data["placement"]
    del data["lora_base"]  # added later; "plain" (the LoRA base before) is not in the digest
    for key in ("dp_noise_multiplier", "dp_clip_norm", "dp_delta"):  # added later; DP off is not either
        del data[key]
    before = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
    middle = replace(pinned, placement="middle")
    assert bench.settings_digest(replace(pinned, placement="interleave")) == before
    assert bench.settings_digest(replace(pinned, placement="interleave"), "fedbe") == before
    assert bench.settings_digest(pinned, "fedbe") != before  # interleave-mid-top
    assert bench.settings_digest(middle, "fedbe") != before
    assert bench.settings_digest(middle, "fedbe") != bench.settings_digest(
        replace(pinned, placement="2,7,12,17,22,27"), "fedbe"
    )
    for method in ("fedit", "fedit-distill", "ffa-lora", "full-ft", "pos-top", "fedbe-interleave"):
        assert bench.settings_digest(middle, method) == before, method
    lines = [json.dumps({"method": m, "seed": 0, "settings_digest": before, "rounds": []})
             for m in ("fedbe", "fedit", "fedbe-interleave")]  # fmt: skip
    (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n")
    assert list(bench.previous_records(tmp_path / "records.jsonl", middle)) == [
        ("fedit", 0),
        ("fedbe-interleave", 0),
    ]


def test_fedbe_puts_its_blocks_where_placement_says_and_positions_stay_single() -> None:
    world = _tiny_world(blocks=2)  # 4 base layers: groups [0, 1] and [2, 3]
    assert bench.BlockMethod("fedbe", world).registry.new_layer_indices == (2, 4)  # after 1 and 2
    interleave = replace(world, settings=replace(world.settings, placement="interleave"))
    assert bench.BlockMethod("fedbe", interleave).registry.new_layer_indices == (2, 5)  # after 1 and 3
    middle = replace(world, settings=replace(world.settings, placement="middle"))
    assert bench.BlockMethod("fedbe", middle).registry.new_layer_indices == (1, 4)  # after 0 and 2
    explicit = replace(world, settings=replace(world.settings, placement="1,2"))
    assert bench.BlockMethod("fedbe-plain", explicit).registry.new_layer_indices == (2, 4)
    assert bench.BlockMethod("pos-top", middle).registry.new_layer_indices == (4,)  # its own position
    assert bench.BlockMethod("fedbe-interleave", middle).registry.new_layer_indices == (2, 5)


def test_jobs_split_the_methods_over_workers_and_report_them_as_one_run(tmp_path) -> None:
    settings = bench.BenchSettings(
        model="tiny:llama", methods=("fedbe-plain", "fedit", "ffa-lora"), clients=2, rounds=1, steps=1,
        examples_per_client=4, eval_examples=6, probe_questions=4, final_probe_questions=3, probe_texts=4,
        max_tokens=48, profiles=("rtx-4090-24gb", "cpu-laptop"),
    )  # fmt: skip
    results = bench.run_bench_jobs(settings, tmp_path, jobs=2, say=lambda _m: None)
    parts = [
        [
            json.loads(line)["method"]
            for line in (tmp_path / f"job-{k}" / "records.jsonl").read_text().splitlines()
        ]
        for k in range(2)
    ]
    assert parts == [["fedbe-plain", "ffa-lora"], ["fedit"]]
    assert [r["method"] for r in results["summary"]] == ["fedbe-plain", "fedit", "ffa-lora"]
    # both workers built the same world: the same untrained model scores
    round0 = [r["round0"] for r in results["records"]]
    answers = [r.pop("definition_answers") + r.pop("final_definition_answers") for r in round0]
    assert all(r == pytest.approx(round0[0], rel=1e-4) for r in round0)
    assert len(set(answers)) == 1 and len(answers[0]) == 4 + 4 + 3
    # a second call finds every method done and only renders the table again
    again = bench.run_bench_jobs(settings, tmp_path, jobs=2, say=lambda _m: None)
    assert [r["rounds"] for r in again["records"]] == [r["rounds"] for r in results["records"]]


def test_jobs_extended_to_a_new_seed_train_only_that_seed_in_the_workers(tmp_path) -> None:
    settings = bench.BenchSettings(
        model="tiny:llama", methods=("fedbe-plain", "fedit"), clients=2, rounds=1, steps=1, seeds=(0,),
        examples_per_client=4, eval_examples=6, probe_questions=4, final_probe_questions=0, probe_texts=4,
        max_tokens=48,
        profiles=("rtx-4090-24gb", "cpu-laptop"),
    )  # fmt: skip
    first = bench.run_bench_jobs(settings, tmp_path, jobs=2, say=lambda _m: None)
    messages: list[str] = []
    more = bench.run_bench_jobs(replace(settings, seeds=(0, 1)), tmp_path, jobs=2, say=messages.append)
    assert any("2 worker processes" in m for m in messages)  # the new seed ran in the workers
    for k, method in enumerate(("fedbe-plain", "fedit")):
        lines = (tmp_path / f"job-{k}" / "records.jsonl").read_text().splitlines()
        assert sorted((json.loads(x)["method"], json.loads(x)["seed"]) for x in lines) == [
            (method, 0),
            (method, 1),
        ]
    by_key = {(r["method"], r["seed"]): r for r in more["records"]}
    assert sorted(by_key) == [("fedbe-plain", 0), ("fedbe-plain", 1), ("fedit", 0), ("fedit", 1)]
    for r in first["records"]:  # seed 0 was kept, not trained again (its measured seconds are the same)
        assert by_key[(r["method"], 0)]["rounds"] == r["rounds"]


def test_a_terminated_jobs_run_ends_its_workers(tmp_path) -> None:
    import signal
    import subprocess
    import sys
    import time

    import psutil

    # a run long enough to still be training when it is stopped
    args = ["bench", "--model", "tiny:llama", "--methods", "fedbe-plain,fedit", "--jobs", "2", "--rounds", "500",
            "--clients", "2", "--profiles", "rtx-4090-24gb,cpu-laptop", "--out", str(tmp_path / "run")]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", "from fedbe_sim.cli import main; main()", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    workers: list[psutil.Process] = []
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            workers = [c for c in parent.children() if "spawn_main" in " ".join(c.cmdline())]
            if len(workers) == 2 and (tmp_path / "run" / "job-1").exists():
                break
            time.sleep(0.5)
        assert len(workers) == 2, "the two workers never started"
        time.sleep(2)
        assert all(w.is_running() for w in workers)  # still training: the signal reaches a live run
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"workers left running after SIGTERM: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for worker in workers:  # orphaned workers are no longer our children
            if worker.is_running():
                worker.kill()


def _plan(method: bench.BlockMethod, round_: int = 1) -> Any:
    """The plan of ``method``'s round: the coordinator's plan_round with the method's policy and candidates."""
    import random

    from coordinator.round import plan_round

    return plan_round(method.policy, round_, method.candidates, method.registry, method.last_trained,
                      method.federation.seed, random.Random(method.federation.seed))  # fmt: skip


def _with_candidates(world: Any, clients: list[tuple[str, float, dict[str, float]]], **overrides: Any) -> Any:
    """FedBE on ``world`` with ``overrides`` for its settings, planning for made-up clients
    (id, backward seconds per layer, label histogram) that each hold 2 blocks."""
    from coordinator.round import Candidate

    method = bench.BlockMethod("fedbe", replace(world, settings=replace(world.settings, **overrides)))
    method.candidates = [Candidate(cid, 2, 0.1, slow, histogram) for cid, slow, histogram in clients]
    return method


def test_a_tighter_deadline_gives_slow_clients_fewer_blocks_nearer_the_output() -> None:
    world = _tiny_world(blocks=2, placement="interleave")
    clients = [(cid, slow, {"a": 1.0}) for cid, slow in (("fast", 0.01), ("fast2", 0.01), ("slow", 0.2),
                                                         ("slow2", 0.2))]  # fmt: skip

    def blocks_for(factor: float) -> dict[str, tuple[int, ...]]:
        method = _with_candidates(world, clients, deadline_factor=factor)
        assert method.registry.new_layer_indices == (2, 5)
        return _plan(method).assignments

    loose, tight, too_tight = blocks_for(1.0), blocks_for(0.5), blocks_for(0.2)
    assert loose == {c: (0, 1) for c in ("fast", "fast2", "slow", "slow2")}  # the median client is slow
    # the slow clients keep the block nearer the output (the shorter backward); the fast ones all
    assert tight == {"fast": (0, 1), "fast2": (0, 1), "slow": (1,), "slow2": (1,)}
    assert too_tight == {"fast": (0, 1), "fast2": (0, 1)}  # no block fits: left out, not late


def test_a_block_only_one_label_trains_is_left_out_under_a_label_skew_bound() -> None:
    world = _tiny_world(blocks=2, placement="interleave")
    # only the fast clients reach block 0, and both hold label "a" alone; the slow ones hold "b"
    clients = [(cid, slow, {label: 10.0}) for cid, slow, label in (
        ("fast", 0.01, "a"), ("fast2", 0.01, "a"), ("slow", 0.2, "b"), ("slow2", 0.2, "b"))]  # fmt: skip

    def plan_for(bound: float) -> Any:
        return _plan(_with_candidates(world, clients, deadline_factor=0.5, max_block_divergence=bound))

    unbounded = plan_for(1.0)
    assert unbounded.assignments == {"fast": (0, 1), "fast2": (0, 1), "slow": (1,), "slow2": (1,)}
    assert unbounded.allocation.withdrawn_blocks == ()
    bounded = plan_for(0.3)  # block 0: JS({a}, {a, b}) = 0.31
    assert bounded.assignments == {"fast": (1,), "fast2": (1,), "slow": (1,), "slow2": (1,)}
    assert bounded.allocation.withdrawn_blocks == (0,)
    assert bench.BenchSettings().max_block_divergence == 1.0  # no bound by default
    with pytest.raises(ConfigError, match="max_block_divergence"):
        bench.BenchSettings(max_block_divergence=1.2)


def _tiny_world(**overrides):
    fields = dict(
        model="tiny:llama", clients=4, rounds=1, steps=1, examples_per_client=4, eval_examples=4,
        probe_questions=4, final_probe_questions=0, probe_texts=2, max_tokens=32, blocks=2,
    )  # fmt: skip
    settings = bench.BenchSettings(**{**fields, **overrides})
    world = bench.build_federation(settings, 0, lambda _m: None)
    bench.measure_capacities(world, lambda _m: None)
    return world


def test_clients_step_costs_are_one_measurement_in_the_bench_precision_times_their_slowdown() -> None:
    """The default profiles run different base precisions (bf16, nf4, fp16); the bench trains them
    all in one precision on this machine and emulates their time as that x slowdown, so the
    allocation must plan with the same costs, not with this CPU's speed for each precision."""
    world = _tiny_world()
    assert {c.profile.precision for c in world.clients} != {world.settings.precision}
    forward = {c.client_id: c.forward_seconds / c.slowdown for c in world.clients}
    backward = {c.client_id: c.backward_seconds / c.slowdown for c in world.clients}
    assert max(forward.values()) == pytest.approx(min(forward.values()), rel=1e-9), forward
    assert max(backward.values()) == pytest.approx(min(backward.values()), rel=1e-9), backward
    assert len({c.slowdown for c in world.clients}) > 1 and all(c.forward_seconds > 0 for c in world.clients)


def _assign(monkeypatch: Any, assignments: dict[str, tuple[int, ...]]) -> None:
    """From now on every FedBE round's plan gives exactly ``assignments`` (its recipe the method's)."""
    import math

    import coordinator.round
    from coordinator.allocation import Allocation
    from coordinator.round import RoundPlan

    def plan(policy: Any, round_: int, *_args: Any) -> RoundPlan:
        allocation = Allocation(dict(assignments), (), {}, {})
        return RoundPlan(
            round_, tuple(sorted(assignments)), allocation, dict(assignments), math.inf, policy.recipe
        )

    monkeypatch.setattr(coordinator.round, "plan_round", plan)


def _perturbed(state: dict[int, dict[str, torch.Tensor]], seed: int) -> dict[int, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        b: {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in p.items()} for b, p in state.items()
    }


def test_a_client_runs_the_blocks_it_does_not_train_frozen(monkeypatch: Any) -> None:
    """A FedBE client trains its blocks with the others in place (received in bf16, counted in the
    download), not bypassed; only the trained blocks come back."""
    world = _tiny_world(max_block_divergence=1.0, download_level="fp32")
    _assign(monkeypatch, {"client-00": (1,)})
    runs = {}
    for name in ("block 0 trained", "block 0 fresh"):
        method = bench.BlockMethod("fedbe", world)
        fresh = method.global_state[0]
        method.global_state = _perturbed(method.global_state, 1)
        if name == "block 0 fresh":  # block 0 the identity it starts as: the same as bypassing it
            method.global_state[0] = fresh
        before = {b: {n: t.clone() for n, t in p.items()} for b, p in method.global_state.items()}
        (result,) = method.round(1)
        runs[name] = (result, before, method.global_state)
    for name, (result, before, after) in runs.items():
        assert result.blocks == (1,)
        assert all(torch.equal(before[0][n], after[0][n]) for n in before[0]), name  # block 0 not trained
        fp32_block = sum(t.numel() * 4 for t in before[1].values())
        bf16_block = sum(t.numel() * 2 for t in before[0].values())
        assert result.bytes_down == fp32_block + bf16_block, name
    # block 1 learned against the model with block 0 in it: the same start, a different block 0, a
    # different update (were block 0 bypassed, both would be the one of the fresh block)
    moved = [
        runs[name][2][1]["mlp.down_proj.weight"] - runs[name][1][1]["mlp.down_proj.weight"]
        for name in ("block 0 trained", "block 0 fresh")
    ]
    assert torch.equal(runs["block 0 trained"][1][1]["mlp.down_proj.weight"],
                       runs["block 0 fresh"][1][1]["mlp.down_proj.weight"])  # fmt: skip
    assert all(float(m.abs().max()) > 0 for m in moved)
    assert not torch.allclose(moved[0], moved[1])


def test_clients_receive_weights_at_the_download_level_and_update_from_what_they_received(
    monkeypatch: Any,
) -> None:
    """--download-level int8: every method's clients get the global weights as int8 (a quarter of fp32's
    bytes plus one fp32 scale a row) and send their change from those weights, so a round that barely
    trains leaves the server's fp32 state where it was, not moved to its int8 rounding."""
    import torch

    from fedbe.compression import Level, compress_state

    world = _tiny_world(max_block_divergence=1.0, download_level="int8", lr=1e-12, lora_lr=1e-12)
    _assign(monkeypatch, {"client-00": (1,)})  # block 0 travels frozen, at the same level
    for seed, method in enumerate((bench.BlockMethod("fedbe", world), bench.LoraMethod("fedit", world))):
        method.global_state = _perturbed(method.global_state, 2 + seed)
        before = {b: {n: t.clone() for n, t in p.items()} for b, p in method.global_state.items()}
        int8, _ = compress_state(before, Level.INT8)
        int8_bytes = sum(c.nbytes for p in int8.values() for c in p.values())
        fp32_bytes = sum(t.numel() * 4 for p in before.values() for t in p.values())
        results = method.round(1)
        assert results and all(r.bytes_down == int8_bytes for r in results), method.name
        assert int8_bytes < 0.3 * fp32_bytes
        for b, params in before.items():
            for n, t in params.items():
                rounding = (int8[b][n].data.float() * int8[b][n].scales.reshape(-1, *[1] * (t.dim() - 1))) - t
                assert rounding.abs().max() > 1e-4, (method.name, n)  # int8 is not exact here
                assert torch.allclose(method.global_state[b][n], t, atol=1e-7), (method.name, n)


def test_lr_decay_shrinks_each_later_round_for_fedbe_and_lora_alike(monkeypatch: Any) -> None:
    """--lr-decay / --lora-lr-decay: round r trains at lr x decay^(r-1); with a vanishing decay round 2
    leaves the global state where round 1 put it, with none it moves it; round 1 trains at lr either way."""

    def change(before: dict, after: dict) -> float:
        return max(float((after[b][n] - t).abs().max()) for b, p in before.items() for n, t in p.items())

    def change_in_rounds_1_and_2(method) -> tuple[float, float]:
        start = {b: {n: t.clone() for n, t in p.items()} for b, p in method.global_state.items()}
        method.round(1)
        after_1 = {b: {n: t.clone() for n, t in p.items()} for b, p in method.global_state.items()}
        method.residuals = {}  # round 1's int8 rounding would come back in round 2's update
        method.round(2)
        return change(start, after_1), change(after_1, method.global_state)

    _assign(monkeypatch, {"client-00": (0, 1)})
    for decay in (1.0, 1e-9):
        world = _tiny_world(max_block_divergence=1.0, lr_decay=decay, lora_lr_decay=decay)
        torch.manual_seed(0)
        moved = [
            change_in_rounds_1_and_2(bench.BlockMethod("fedbe", world)),
            change_in_rounds_1_and_2(bench.LoraMethod("fedit", world)),
        ]
        assert min(first for first, _ in moved) > 1e-5, moved
        if decay == 1.0:
            assert min(second for _, second in moved) > 1e-5, moved
        else:
            assert max(second for _, second in moved) < 1e-7, moved


def test_each_round_trains_on_a_fresh_shuffle_of_the_clients_articles() -> None:
    """As a fedbe-edge agent shuffles its data with each task's seed, a bench client trains round r on
    its own articles shuffled for round r (the same batches for every method), not on the same first
    steps x batch_size articles every round."""
    import torch

    world = _tiny_world(rounds=3, steps=1, batch_size=2)
    for c in world.clients:
        rows = [torch.cat([b.input_ids for b in c.batches_for(r)]) for r in (1, 2, 3)]
        assert c.batches_for(1) is c.batches
        assert all(len(b) == 1 for b in c.round_batches) and len(c.round_batches) == 3
        seen = {tuple(row.tolist()) for r in rows for row in r}
        assert len(seen) > 2, c.client_id  # more articles than one round's two


def test_probe_texts_flag_reaches_the_settings_and_the_digest_of_every_method(tmp_path) -> None:
    """A larger perplexity probe is a different measurement: no record of the default probe may
    resume under it, whichever method it came from; a probe larger than the split is refused."""
    from fedbe.errors import DataError
    from fedbe.general_ability import general_texts
    from fedbe_sim.cli import build_parser

    def settings(*extra: str) -> bench.BenchSettings:
        args = build_parser().parse_args(["bench", "--out", str(tmp_path), *extra])
        return bench.settings_from_args(args)

    default, small = settings(), settings("--probe-texts", "48")
    assert default.probe_texts == 192 and small.probe_texts == 48
    for method in ("fedbe", "fedit", "fedit-distill", "ffa-lora"):
        assert bench.settings_digest(small, method) != bench.settings_digest(default, method), method
    texts = general_texts(192, "validation")
    assert texts[:48] == general_texts(48, "validation")  # the small probe is the large one's start
    assert not set(texts) & set(general_texts(1600, "test"))
    with pytest.raises(ConfigError, match="probe_texts must be >= 1"):
        settings("--probe-texts", "0")
    with pytest.raises(DataError, match="quotations in the validation split; ask for fewer"):
        general_texts(10**6, "validation")


def _final(method: str, seed: int, acc: float, ppl: float) -> dict:
    rec = _record(method, [acc], [10])
    rec["seed"] = seed
    rec["rounds"][-1]["perplexity_retention"] = ppl
    return rec


def test_paired_differences_pair_seeds_and_give_a_t_interval() -> None:
    records = [
        _final("fedbe", 0, 0.90, 0.988), _final("fedbe", 1, 0.95, 0.998), _final("fedbe", 2, 0.97, 0.999),
        _final("lora", 0, 0.85, 0.997), _final("lora", 1, 0.90, 0.992), _final("lora", 2, 0.99, 0.997),
        _final("lora", 3, 0.10, 0.100),  # no fedbe seed 3: not paired
        _final("solo", 5, 0.5, 0.5),  # no seed in common: no row
        {"method": "full-ft", "seed": 0, "rounds": [], "skipped": "over budget"},
    ]  # fmt: skip
    rows = bench.paired_differences(records)
    assert [r["against"] for r in rows] == ["lora"]
    row = rows[0]
    assert row["seeds"] == [0, 1, 2]
    ppl = row["perplexity_retention"]
    assert ppl["differences"] == pytest.approx([-0.009, 0.006, 0.002])
    assert ppl["mean"] == pytest.approx(-1 / 3000)
    sd = math.sqrt(sum((d + 1 / 3000) ** 2 for d in (-0.009, 0.006, 0.002)) / 2)
    assert ppl["ci95"] == pytest.approx(4.303 * sd / math.sqrt(3))
    assert row["accuracy"]["mean"] == pytest.approx(0.08 / 3)  # +0.05 / +0.05 / -0.02
    assert row["definition_retention"]["differences"] == [0.0, 0.0, 0.0]
    md = "\n".join(bench.paired_markdown(rows))
    assert "| lora | 0,1,2 |" in md and "-0.0003 ± 0.019 (-0.009 / +0.006 / +0.002)" in md
    one = bench.paired_differences([_final("fedbe", 0, 0.9, 1.0), _final("lora", 0, 0.8, 0.9)])
    assert one[0]["accuracy"]["ci95"] is None and "+0.1000 (+0.100)" in "\n".join(bench.paired_markdown(one))
    assert bench.paired_differences(records, "missing") == [] and bench.paired_markdown([]) == []
    nan = _final("fedbe", 1, 0.9, 1.0)
    nan["rounds"][-1]["definition_retention"] = float("nan")  # definitions at 0 before training
    nan_row = bench.paired_differences([_final("fedbe", 0, 0.9, 1.0), nan, *records[3:5]])[0]
    assert (
        math.isnan(nan_row["definition_retention"]["mean"])
        and nan_row["definition_retention"]["ci95"] is None
    )
    assert nan_row["accuracy"]["ci95"] is not None and "| +nan (+0.000 / +nan) |" in "\n".join(
        bench.paired_markdown([nan_row])
    )
    full = bench.results_markdown(bench.summarise(records[:6], {}), {"accuracy": 0.5, "definition_accuracy": 0.6,
                                  "perplexity": 40.0}, bench.BenchSettings(), "fedbe bench", rows)  # fmt: skip
    assert "fedbe minus each method, seed by seed" in full


def test_the_final_probe_is_summed_over_seeds_and_compared_question_by_question() -> None:
    def rec(method: str, seed: int, before: str, after: str) -> dict:
        r = _final(method, seed, 0.9, 1.0) | {"round0": {"final_definition_answers": before}}
        lost, gained = general_ability.answer_changes(before, after)
        right = before.count("1")
        r["rounds"][-1] |= {
            "final_definition_answers": after, "final_definitions_lost": lost, "final_definitions_gained": gained,
            "final_definition_retention": after.count("1") / right,
        }  # fmt: skip
        return r

    records = [
        rec("fedbe", 0, "110010", "110011"), rec("fedbe", 1, "1111", "1110"),
        rec("fd", 0, "110010", "010110"), rec("fd", 1, "1111", "1111"),
        _final("old", 0, 0.9, 1.0),  # a run without the final probe: no comparison with it
    ]  # fmt: skip
    rows = {r["method"]: r for r in bench.summarise(records, {})}
    assert rows["fedbe"]["final_definitions_lost"] == [0, 1] and rows["fedbe"][
        "final_definitions_gained"
    ] == [1, 0]
    assert (
        rows["fedbe"]["final_definition_questions"] == 10 and "final_definition_questions" not in rows["old"]
    )
    assert rows["fedbe"]["final_definition_retention"][0] == pytest.approx((4 / 3 + 3 / 4) / 2)
    paired = {r["against"]: r for r in bench.paired_differences(records)}
    # seed 0: fedbe 110011 against fd 010110: right only under fedbe at 0 and 5, only under fd at 3
    # seed 1: 1110 against 1111: only fd at 3
    split = paired["fd"]["final_definition_answers"]
    assert (split["only_mine"], split["only_theirs"]) == ([2, 0], [1, 1]) and split["questions"] == 10
    assert split["base_differs"] == [0, 0]  # the same untrained answers
    moved = [dict(r) for r in records]  # fd's untrained model answers seed 0's questions 1 and 2 otherwise
    moved[2] = rec("fd", 0, "101010", "010110")
    assert {r["against"]: r for r in bench.paired_differences(moved)}["fd"]["final_definition_answers"][
        "base_differs"
    ] == [2, 0]
    floor = "\n".join(bench.paired_markdown(bench.paired_differences(moved)))
    assert "their untrained models, the same base weights, already answer 2 differently" in floor
    assert split["p"] == pytest.approx(general_ability.mcnemar_p(2, 2))
    assert paired["fd"]["final_definition_retention"]["differences"] == pytest.approx([4 / 3 - 1, 3 / 4 - 1])
    assert (
        "final_definition_answers" not in paired["old"] and "final_definition_retention" not in paired["old"]
    )
    md = "\n".join(bench.paired_markdown(list(paired.values())))
    assert "| definitions retention, final probe |" in md and "| old | 0 |" in md
    assert (
        "against fd 2 / 2 of 10 (p 1.00; by seed 2/1, 0/1; their untrained models, the same base weights, "
        "already answer 0 differently)" in md
    )
    # runs before the final probe: no column, no line
    old = "\n".join(
        bench.paired_markdown(bench.paired_differences([_final("fedbe", 0, 0.9, 1.0), records[-1]]))
    )
    assert "final probe" not in old.lower()
    summary_md = bench.results_markdown(
        list(rows.values()), {"accuracy": 0.5, "definition_accuracy": 0.6, "perplexity": 40.0},
        replace(bench.BenchSettings(), final_probe_questions=3), "fedbe bench",
    )  # fmt: skip
    assert "Final probe (the definition questions above and 3 more a seed, 10 question-seeds" in summary_md
    assert "fedbe 1.0417 ± 0.2917, 1 / 1 (p 1.00; by seed 0/1, 1/0)" in summary_md


def test_the_final_probe_leaves_earlier_digests_and_results_alone() -> None:
    """Runs from before the final probe (no such setting in their results.json) read as 0 questions,
    and 0 keeps every earlier record's digest; any other number is a new digest for every method."""
    none = bench.BenchSettings(final_probe_questions=0)
    data = dataclasses.asdict(none)
    del data["final_probe_questions"]
    assert bench.settings_from_dict(json.loads(json.dumps(data)), "x").final_probe_questions == 0
    assert "final_probe_questions" not in bench.digested_settings(none, "fedbe")
    for method in ("fedbe", "fedit-distill"):
        assert bench.settings_digest(bench.BenchSettings(), method) != bench.settings_digest(none, method)
    assert bench.quick(bench.BenchSettings()).final_probe_questions == 0
    with pytest.raises(ConfigError, match="final_probe_questions must be >= 0"):
        bench.BenchSettings(final_probe_questions=-1)


def test_t_quantiles_are_students_and_conservative_between_table_rows() -> None:
    assert bench.t_975(2) == pytest.approx(4.303)
    assert bench.t_975(11) == bench.t_975(10) == pytest.approx(2.228)  # between rows: the smaller df's
    # beyond the table: published quantiles (df 40, 60, 120), and towards the normal's 1.96
    assert bench.t_975(40) == pytest.approx(2.021, abs=5e-4)
    assert bench.t_975(60) == pytest.approx(2.000, abs=5e-4)
    assert bench.t_975(120) == pytest.approx(1.980, abs=5e-4)
    assert bench.t_975(31) < bench.t_975(30)
    assert 1.959964 < bench.t_975(100000) < 1.9601  # the normal quantile is 1.959964
    with pytest.raises(ValueError, match="degrees of freedom"):
        bench.t_975(0)


def _run_folder(folder: Path, settings: bench.BenchSettings, records: list[dict]) -> Path:
    """A finished bench --out folder: results.json with its settings and records (digests stamped)."""
    folder.mkdir(parents=True)
    for rec in records:
        rec["settings_digest"] = bench.settings_digest(settings, rec["method"])
        rec["round0"] = {"accuracy": 0.5, "definition_accuracy": 0.6, "perplexity": 40.0}
    data = {"settings": json.loads(json.dumps(dataclasses.asdict(settings))), "records": records}
    (folder / "results.json").write_text(json.dumps(data))
    return folder


def test_bench_merge_joins_seeds_run_in_separate_folders_into_one_paired_comparison(tmp_path) -> None:
    from fedbe_sim.cli import main

    default = bench.BenchSettings(methods=("fedbe", "fedit-distill"))
    ran = [((0, 1, 2), (0.988, 0.998, 0.999), (0.997, 0.992, 0.997)), ((4,), (0.990,), (0.985,))]
    runs = []
    for i, (seeds, mine, theirs) in enumerate(ran):
        recs = [_final("fedbe", s, 0.9, p) for s, p in zip(seeds, mine, strict=True)]
        recs += [_final("fedit-distill", s, 0.9, p) for s, p in zip(seeds, theirs, strict=True)]
        runs.append(_run_folder(tmp_path / f"run{i}", replace(default, seeds=seeds), recs))
    # a LoRA-only run may differ in FedBE's own knobs (they are not in fedit-distill's digest)
    lora_only = replace(default, methods=("fedit-distill",), seeds=(5,), distill_lambda=6.0)
    runs.append(_run_folder(tmp_path / "run2", lora_only, [_final("fedit-distill", 5, 0.9, 0.99)]))
    assert (
        main(
            ["bench-merge", *map(str, runs[:2]), str(runs[2] / "results.json"), "--out", str(tmp_path / "m")]
        )
        == 0
    )
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert merged["settings"]["seeds"] == [0, 1, 2, 4, 5] and merged["settings"]["distill_lambda"] == [
        3.0,
        3.0,
        12.0,
    ]
    assert [(r["method"], r["seed"]) for r in merged["records"]][:2] == [("fedbe", 0), ("fedit-distill", 0)]
    (row,) = merged["paired"]
    assert row["against"] == "fedit-distill" and row["seeds"] == [0, 1, 2, 4]
    assert row["perplexity_retention"]["differences"] == pytest.approx([-0.009, 0.006, 0.002, 0.005])
    assert "seed by seed" in (tmp_path / "m" / "results.md").read_text()
    assert len((tmp_path / "m" / "records.jsonl").read_text().splitlines()) == 9
    assert (tmp_path / "m" / "accuracy_retention.png").is_file()


def test_bench_merge_takes_lora_base_from_the_lora_runs(tmp_path) -> None:
    """FedBE's records from a run before --lora-base (read as "plain", which FedBE never read)
    merge with LoRA runs on the frozen base; the merged run holds "frozen" and reads back."""
    from fedbe_sim.cli import main

    old = bench.BenchSettings(methods=("fedbe",), seeds=(0,), lora_base="plain")
    new = bench.BenchSettings(methods=("fedit-distill",), seeds=(0,))
    a = _run_folder(tmp_path / "a", old, [_final("fedbe", 0, 0.9, 0.99)])
    b = _run_folder(tmp_path / "b", new, [_final("fedit-distill", 0, 0.9, 0.98)])
    assert main(["bench-merge", str(a), str(b), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert merged["settings"]["lora_base"] == "frozen" and len(merged["records"]) == 2
    plain = _run_folder(tmp_path / "c", replace(new, seeds=(1,), lora_base="plain"),
                        [_final("fedit-distill", 1, 0.9, 0.98)])  # fmt: skip
    assert main(["bench-merge", str(a), str(b), str(plain), "--out", str(tmp_path / "n")]) != 0
    # no block run to lead: the first run (full FT, which never read it) still does not decide it
    full = _run_folder(tmp_path / "d", replace(old, methods=("full-ft",)), [_final("full-ft", 0, 0.9, 0.9)])
    assert main(["bench-merge", str(full), str(b), "--out", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "results.json").read_text())["settings"]["lora_base"] == "frozen"


def test_bench_merge_refuses_runs_that_are_not_one_experiment(tmp_path, capsys) -> None:
    from fedbe_sim.cli import main

    default = bench.BenchSettings(methods=("fedbe",))
    a = _run_folder(tmp_path / "a", replace(default, seeds=(0,)), [_final("fedbe", 0, 0.9, 0.99)])
    other_lr = _run_folder(
        tmp_path / "b", replace(default, seeds=(1,), lr=1e-3), [_final("fedbe", 1, 0.9, 0.99)]
    )
    same_seed = _run_folder(tmp_path / "c", replace(default, seeds=(0,)), [_final("fedbe", 0, 0.8, 0.98)])
    out = tmp_path / "out"

    def refused(*runs: str) -> str:
        assert main(["bench-merge", *runs, "--out", str(out)]) != 0
        assert not (out / "results.json").exists()  # nothing written
        return capsys.readouterr().err

    assert "lr: 0.002 against 0.001" in refused(str(a), str(other_lr))
    # each method agrees with itself, but a LoRA run without the final probe would not be a run of the
    # merged settings (its digest counts the probe): the merged results.json could not be read back
    lora = _run_folder(
        tmp_path / "lora",
        replace(default, methods=("fedit",), final_probe_questions=0),
        [_final("fedit", 0, 0.9, 0.8)],
    )
    assert (
        "fedit in " in (err := refused(str(a), str(lora)))
        and "final_probe_questions: None against 1600" in err
    )
    assert "fedbe seed 0 is in both" in refused(str(a), str(same_seed))
    assert "no results.json" in refused(str(a), str(tmp_path / "missing"))
    (tmp_path / "bad.json").write_text("{not json")
    assert "not readable as JSON" in refused(str(a), str(tmp_path / "bad.json"))
    (tmp_path / "list.json").write_text("[]")
    assert "not a fedbe bench results.json" in refused(str(tmp_path / "list.json"))
    newer = json.loads((a / "results.json").read_text())
    newer["settings"]["warp_drive"] = 1
    (tmp_path / "newer.json").write_text(json.dumps(newer))
    assert "unknown bench setting(s) warp_drive" in refused(str(tmp_path / "newer.json"))
    edited = json.loads((a / "results.json").read_text())
    edited["settings"]["rounds"] = 9  # the records were run with 4
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    assert "was not made with the settings in its results.json" in refused(str(tmp_path / "edited.json"))
    bare = json.loads((a / "results.json").read_text())
    del bare["records"][0]["round0"]  # no base scores: nothing to report retention against
    (tmp_path / "bare.json").write_text(json.dumps(bare))
    assert "no record holds the base model's scores" in refused(str(tmp_path / "bare.json"))
    assert not out.exists()  # not even records.jsonl
    before = (a / "results.json").read_text()
    assert main(["bench-merge", str(a), "--out", str(a)]) != 0
    assert "is one of the runs to merge" in capsys.readouterr().err
    assert (a / "results.json").read_text() == before  # the input is not overwritten


def test_a_distill_lambda_schedule_gives_each_round_its_lambda_and_its_own_digest(
    tmp_path, monkeypatch
) -> None:
    """--distill-lambda 6,3: FedBE's clients distil at 6 in round 1 and 3 from round 2 on (the last
    value holds); a single number is a one-round schedule; LoRA records do not depend on it; a bad
    list is refused with what to write."""
    import edge_client.trainer as trainer
    from fedbe.recipe import RecipeError
    from fedbe_sim.cli import build_parser

    def settings(*extra: str) -> bench.BenchSettings:
        args = build_parser().parse_args(["bench", "--out", str(tmp_path), *extra])
        return bench.settings_from_args(args)

    scheduled, constant = settings("--distill-lambda", "6,3"), settings("--distill-lambda", "3")
    assert scheduled.distill_lambda == (6.0, 3.0) and constant.distill_lambda == (3.0,)
    assert bench.BenchSettings().distill_lambda == (3.0, 3.0, 12.0)  # the default
    assert bench.settings_digest(constant, "fedbe") != bench.settings_digest(bench.BenchSettings(), "fedbe")
    assert bench.settings_digest(scheduled, "fedbe") != bench.settings_digest(constant, "fedbe")
    assert bench.settings_digest(scheduled, "fedit-distill") == bench.settings_digest(
        constant, "fedit-distill"
    )
    for bad in ("6,x", ",", "6,-1"):
        with pytest.raises(
            RecipeError, match="--distill-lambda must be a number >= 0 or comma-separated ones"
        ):
            settings("--distill-lambda", bad)

    world = _tiny_world(max_block_divergence=1.0, distill_lambda=(6.0, 0.0, 3.0))
    # (round, the round the client trains, the recipe's lambda in it, whether the trainer distilled)
    seen: list[tuple[int, int, float, bool]] = []
    real, now = trainer.train_blocks, [0]

    def spy(model, registry, blocks, batches, recipe, round_=1, **kwargs):
        result = real(model, registry, blocks, batches, recipe, round_, **kwargs)
        seen.append((now[0], round_, recipe.distill_lambda_in_round(round_), bool(result.distill_losses)))
        return result

    monkeypatch.setattr(trainer, "train_blocks", spy)
    _assign(monkeypatch, {"client-00": (0, 1)})
    method = bench.BlockMethod("fedbe", world)
    for now[0] in (1, 2, 3, 4):
        method.round(now[0])
    assert seen == [(1, 1, 6.0, True), (2, 2, 0.0, False), (3, 3, 3.0, True), (4, 4, 3.0, True)]
    plain = bench.BlockMethod("fedbe-plain", world)  # no distillation whatever the schedule
    seen.clear()
    now[0] = 1
    plain.round(1)
    assert seen == [(1, 1, 0.0, False)]


def test_bench_merge_takes_only_the_methods_named_after_a_run(tmp_path, capsys) -> None:
    """RUN::METHODS: a rerun of one method merged with the other methods of an earlier run, which
    also holds that method under other settings (unmergeable as a whole)."""
    from fedbe_sim.cli import main

    old = bench.BenchSettings(methods=("fedbe", "fedit-distill"), seeds=(0,), distill_lambda=3.0)
    new = bench.BenchSettings(methods=("fedbe",), seeds=(0,))
    earlier = _run_folder(
        tmp_path / "old", old, [_final("fedbe", 0, 0.9, 0.988), _final("fedit-distill", 0, 0.9, 0.997)]
    )
    rerun = _run_folder(tmp_path / "new", new, [_final("fedbe", 0, 0.95, 0.993)])
    out = tmp_path / "m"
    assert main(["bench-merge", str(rerun), str(earlier), "--out", str(out)]) != 0  # fedbe twice
    assert "fedbe ran under different settings" in capsys.readouterr().err
    assert main(["bench-merge", str(rerun), f"{earlier}::fedit-distill", "--out", str(out)]) == 0
    merged = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["perplexity_retention"]) for r in (
        {"method": r["method"], "perplexity_retention": r["rounds"][-1]["perplexity_retention"]}
        for r in merged["records"])] == [("fedbe", 0.993), ("fedit-distill", 0.997)]  # fmt: skip
    assert merged["settings"]["distill_lambda"] == [3.0, 3.0, 12.0]  # the new FedBE run's
    for bad, says in ((f"{earlier}::", "after '::' give"), (f"{earlier}::fedbe,warp", "unknown: warp"),
                      (f"{rerun}::fedit", "holds no finished fedit run; it has fedbe")):  # fmt: skip
        assert main(["bench-merge", bad, "--out", str(tmp_path / "x")]) != 0
        assert says in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


def test_label_balance_falls_back_to_plain_ce_where_labels_share_a_first_token(caplog: Any) -> None:
    """On by default; the tiny models' byte tokenizer starts every " label" with the space byte, so no
    prior can tell the labels apart: the method warns and trains plain cross-entropy (as an edge
    agent does), instead of failing the run."""
    world = _tiny_world(max_block_divergence=1.0)
    assert world.settings.label_balance
    method = bench.BlockMethod("fedbe", world)
    assert not method.policy.recipe.label_balance and method.priors == {}
    assert "label-balanced loss not used" in caplog.text and "share a first token" in caplog.text


def _a_later_setting(before: Any, after: Any, name: str, retrains: tuple, keeps: tuple) -> None:
    """A setting added after published runs: its new value changes the digest of the methods in
    ``retrains`` only, and a results.json without it reads as ``before``'s value."""
    for method in retrains:
        assert bench.settings_digest(before, method) != bench.settings_digest(after, method), method
    for method in keeps:
        assert bench.settings_digest(before, method) == bench.settings_digest(after, method), method
    data = dataclasses.asdict(after)
    del data[name]
    assert getattr(bench.settings_from_dict(json.loads(json.dumps(data)), "x"), name) == getattr(before, name)


def _spy_on_block_training(monkeypatch: Any) -> list[tuple[Any, Any]]:
    """Every ``train_blocks`` call's (recipe, label prior) from now on, the clients' label priors on
    distinct stand-in tokens (the byte tokenizer's labels share a first token)."""
    import edge_client.trainer as trainer
    from edge_client.loss import LabelPrior

    seen: list[tuple[Any, Any]] = []
    real = trainer.train_blocks

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append((args[4], kwargs.get("label_prior")))  # model, registry, blocks, batches, recipe
        return real(*args, **kwargs)

    def priors(self: Any) -> bool:
        labels = self.federation.labels
        self.priors = {
            c.client_id: LabelPrior(tuple(range(65, 65 + len(labels))),
                                    tuple(float(c.histogram.get(k, 0)) for k in labels))
            for c in self.federation.clients
        }  # fmt: skip
        return True

    monkeypatch.setattr(trainer, "train_blocks", spy)
    monkeypatch.setattr(bench.BlockMethod, "label_priors", priors)
    return seen


def test_the_label_balanced_loss_trains_every_client_with_its_own_label_counts(monkeypatch: Any) -> None:
    """On by default: FedBE's recipe balances and each client trains with the prior of its own label
    counts; --no-label-balance turns it off, and the position methods (plain CE) never balance."""
    seen = _spy_on_block_training(monkeypatch)
    world = _tiny_world(max_block_divergence=1.0)
    _assign(monkeypatch, {c.client_id: (0,) for c in world.clients})
    method = bench.BlockMethod("fedbe", world)
    assert method.policy.recipe.label_balance
    method.round(1)
    counts = [tuple(float(c.histogram.get(k, 0)) for k in world.labels) for c in world.clients]
    assert len(set(counts)) > 1, "the test needs clients with different label counts"
    assert [prior.counts for _, prior in seen] == counts  # the clients train in order
    assert all(recipe.label_balance for recipe, _ in seen)
    off = replace(world, settings=replace(world.settings, label_balance=False))
    assert not bench.BlockMethod("fedbe", off).policy.recipe.label_balance
    assert not bench.BlockMethod("pos-top", world).policy.recipe.label_balance


def test_lora_on_the_frozen_base_starts_from_exactly_fedbes_untrained_model() -> None:
    """--lora-base frozen (the default): the LoRA methods hold the base as FedBE's freeze_base does, so
    their untrained model (B = 0) computes bit for bit what FedBE's expanded model does; "plain" (the
    LoRA base of earlier runs) rounds differently. Only the LoRA methods' digests read the setting, and a
    results.json from before it reads as "plain"."""
    world = _tiny_world(precision="bf16")
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(1))

    def logits(name: str, w: Any) -> torch.Tensor:
        with torch.no_grad():
            return bench.make_method(name, w).eval_model()(input_ids=ids).logits

    fedbe = logits("fedbe", world)
    assert torch.equal(logits("fedit", world), fedbe)
    plain = replace(world, settings=replace(world.settings, lora_base="plain"))
    assert not torch.equal(logits("fedit", plain), fedbe)
    _a_later_setting(
        bench.BenchSettings(lora_base="plain"), bench.BenchSettings(), "lora_base",
        retrains=("fedit", "fedit-distill", "ffa-lora"),
        keeps=("fedbe", "fedbe-plain", "pos-top", "full-ft"),
    )  # fmt: skip
    with pytest.raises(ConfigError, match="lora_base must be one of frozen, plain"):
        bench.BenchSettings(lora_base="fp32")


@pytest.mark.parametrize("precision", ["nf4", "int8"])
def test_lora_on_a_quantized_frozen_base_is_qlora_from_fedbes_untrained_model(precision: str) -> None:
    """--lora-base frozen with a quantized base (BenchSettings.precision): PEFT's LoRA wraps the bitsandbytes layers
    freeze_base made (QLoRA), the untrained model computes exactly what FedBE's does on the same
    quantized base, and a round trains the adapters through the quantized layers."""
    import bitsandbytes as bnb

    world = _tiny_world(precision=precision, lora_lr=1e-2)
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    fedbe, fedit = bench.make_method("fedbe", world), bench.make_method("fedit", world)
    quantized = bnb.nn.Linear4bit if precision == "nf4" else bnb.nn.Linear8bitLt
    assert any(isinstance(m, quantized) for m in fedit.model.modules())
    with (
        torch.no_grad()
    ):  # in eval mode, as the probes run them (int8 layers compute otherwise in train mode)
        assert torch.equal(
            fedit.eval_model().eval()(input_ids=ids).logits, fedbe.eval_model().eval()(input_ids=ids).logits
        )
    before = {n: t.clone() for n, t in fedit.global_state[0].items()}
    assert fedit.round(1)
    moved = [n for n, t in fedit.global_state[0].items() if "lora_B" in n and not torch.equal(t, before[n])]
    assert moved and all(torch.isfinite(t).all() for t in fedit.global_state[0].values())


def test_dp_runs_through_the_coordinators_round_and_reports_epsilon(tmp_path) -> None:
    from coordinator.privacy import RoundPrivacy, epsilon  # noqa: PLC0415

    settings = bench.BenchSettings(
        model="tiny:llama", methods=("fedbe",), clients=3, rounds=2, steps=2, examples_per_client=8,
        eval_examples=6, probe_questions=4, final_probe_questions=0, probe_texts=4, max_tokens=48,
        profiles=("rtx-4090-24gb", "cpu-laptop", "jetson-orin-nano-8gb"),
        dp_noise_multiplier=0.5, dp_clip_norm=0.05,
    )  # fmt: skip
    results = bench.run_bench(settings, tmp_path, say=lambda _: None)
    (rec,) = results["records"]
    for row in rec["rounds"]:
        privacy = row["privacy"]
        # every client is sampled every round: q = 1
        assert privacy["sample_rate"] == 1.0 and privacy["noise_multiplier"] == 0.5
        assert privacy["epsilon"] == pytest.approx(epsilon([RoundPrivacy(1.0, 0.5)] * row["round"], 1e-5))
        assert sorted(row["update_norms"]) == sorted(row["assignments"])
        clipped = sum(n > 0.05 for n in row["update_norms"].values()) / len(row["update_norms"])
        assert privacy["clipped_fraction"] == pytest.approx(clipped)
    assert f"fedbe {rec['rounds'][-1]['privacy']['epsilon']:.4g}" in (tmp_path / "results.md").read_text()
    with pytest.raises(ConfigError, match="clip_norm"):
        bench.BenchSettings(dp_noise_multiplier=1.0, dp_clip_norm=0.0)


def test_dp_settings_change_only_the_new_block_methods_digest() -> None:
    default = bench.BenchSettings()
    private = replace(default, dp_noise_multiplier=1.0)
    for method in ("fedbe", "pos-top"):
        assert bench.settings_digest(private, method) != bench.settings_digest(default, method)
        clip = replace(private, dp_clip_norm=1.0)
        assert bench.settings_digest(clip, method) != bench.settings_digest(private, method)
    for method in ("fedit", "full-ft"):
        assert bench.settings_digest(private, method) == bench.settings_digest(default, method)
    # with DP off its other settings change nothing, so they leave the digest alone
    unused = replace(default, dp_clip_norm=1.0)
    assert bench.settings_digest(unused, "fedbe") == bench.settings_digest(default, "fedbe")
