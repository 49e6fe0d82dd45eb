"""The emulated federation every method runs on: its data, its clients and their capacities, and the
evaluation after every round; and what one training step holds in memory."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedbe.device_profile import resolve_profile
from fedbe_sim.bench.settings import PROBE_HEAD, BenchSettings


@dataclass
class Client:
    client_id: str
    profile: Any
    examples: list[Any]
    batches: list[Any]  # round 1's (what the cost and memory measurements use)
    histogram: dict[str, float]
    slowdown: float
    link_bps: float
    max_blocks: int = 0
    forward_seconds: float = 0.0
    backward_seconds: float = 0.0
    # one list of batches per round: the client's articles shuffled with the round's seed, as a
    # fedbe-edge agent shuffles its data with the task's seed (the same for every method)
    round_batches: tuple[list[Any], ...] = ()

    def batches_for(self, round_: int) -> list[Any]:
        return (
            self.round_batches[(round_ - 1) % len(self.round_batches)] if self.round_batches else self.batches
        )


@dataclass
class Federation:
    """One seed's emulated federation: its clients (label shards, device profiles, batches per round)
    and the evaluation items and probes; every method of the seed runs on the same one."""

    settings: BenchSettings
    seed: int
    source: Any
    tokenizer: Any
    labels: list[str]
    clients: list[Client]
    eval_examples: list[Any]
    probe: Any
    blocks: int  # new blocks: settings.blocks, at most the base's layers
    base_scores: dict[str, float] = field(default_factory=dict)
    # the final probe's extra definition questions (settings.final_probe_questions, none asked by probe)
    final_questions: tuple[Any, ...] = ()


def build_federation(settings: BenchSettings, seed: int, say: Callable[[str], None]) -> Federation:
    from edge_client.data import dirichlet_split, label_histogram  # noqa: PLC0415
    from fedbe import datasets, general_ability, sources  # noqa: PLC0415
    from fedbe.device_profile import load_profile  # noqa: PLC0415

    source = sources.resolve_source(settings.model)
    tokenizer = sources.load_tokenizer(source)
    train, test = datasets.split_train_test(datasets.load_bbc_news())
    # validation: a fixed 20% of the train split (by another hash), never used for training
    validation = [e for e in train if datasets.is_test_example("validation:" + e.text)]
    train = [e for e in train if not datasets.is_test_example("validation:" + e.text)]
    held_out = test if settings.split == "test" else validation
    rng = random.Random(seed)
    eval_examples = sorted(held_out, key=lambda e: e.text)
    rng.shuffle(eval_examples)
    eval_examples = eval_examples[: settings.eval_examples]
    labels = datasets.label_names(train)
    shards = dirichlet_split(
        [e.label for e in train], settings.clients, settings.alpha, np.random.default_rng(seed)
    )
    clients = []
    for i, indices in enumerate(shards):
        local = [train[j] for j in indices]
        random.Random(seed * 1000 + i).shuffle(local)
        local = local[: settings.examples_per_client]
        profile = load_profile(resolve_profile(settings.profiles[i % len(settings.profiles)]))
        per_round = []
        for round_ in range(1, settings.rounds + 1):
            order = list(local)
            np.random.default_rng(seed * 100003 + round_).shuffle(order)  # type: ignore[arg-type]
            used = order[: settings.steps * settings.batch_size]
            per_round.append(datasets.make_batches(tokenizer, used, settings.batch_size, settings.max_tokens))
        clients.append(Client(
            client_id=f"client-{i:02d}", profile=profile, examples=local, batches=per_round[0],
            histogram=label_histogram(local, labels), slowdown=profile.compute_slowdown(True),
            link_bps=profile.link_bandwidth_bps(True), round_batches=tuple(per_round),
        ))  # fmt: skip
    probe = general_ability.GeneralProbe.build(
        settings.probe_questions, settings.probe_texts, settings.split, seed, head=PROBE_HEAD
    )
    say(
        f"seed {seed}: {len(clients)} clients ({', '.join(c.profile.name for c in clients)}), "
        f"{sum(len(c.examples) for c in clients)} training articles, alpha {settings.alpha}; evaluating on "
        f"{len(eval_examples)} {settings.split} articles, {len(probe.questions)} definition questions, "
        f"{len(probe.texts)} quotations"
    )
    final = general_ability.definition_questions(
        settings.final_probe_questions, settings.split, seed, exclude=probe.questions
    ) if settings.final_probe_questions else []  # fmt: skip
    layers = int(sources.load_model(source).config.num_hidden_layers)
    return Federation(
        settings, seed, source, tokenizer, labels, clients, eval_examples, probe, min(settings.blocks, layers),
        final_questions=tuple(final),
    )  # fmt: skip


def evaluate(federation: Federation, model: Any) -> dict[str, Any]:
    """Accuracy and the general probe's scores, with its per-question answers under
    ``definition_answers`` (:func:`fedbe.general_ability.answer_string`)."""
    from fedbe.evaluation import classification_accuracy  # noqa: PLC0415

    scores: dict[str, Any] = {
        "accuracy": classification_accuracy(
            model, federation.tokenizer, federation.eval_examples, federation.labels,
            federation.settings.max_tokens,
        )
    }
    probe_scores, answers = federation.probe.score_with_answers(model, federation.tokenizer)
    scores.update(probe_scores)
    scores["definition_answers"] = answers
    return scores


def evaluate_against(federation: Federation, model: Any, before: dict[str, Any]) -> dict[str, Any]:
    """:func:`evaluate` with the retention against ``before`` (an :func:`evaluate` of the model before
    training) and the definition questions answered differently from it (``definitions_lost``,
    ``definitions_gained``)."""
    from fedbe.general_ability import answer_changes, retention  # noqa: PLC0415

    with torch.no_grad():
        scores = evaluate(federation, model)
    scores.update(retention(before, scores))
    scores["definitions_lost"], scores["definitions_gained"] = answer_changes(
        before["definition_answers"], scores["definition_answers"]
    )
    return scores


def final_probe(federation: Federation, model: Any, scores: dict[str, Any], before: dict[str, Any] | None = None
                ) -> dict[str, Any]:  # fmt: skip
    """The final probe's scores for ``model`` (empty when the federation has no final questions): its
    answers to the per-round questions (from ``scores``, an :func:`evaluate` of it) followed by the
    final questions', under ``final_definition_answers``, and their accuracy; with ``before`` (the same
    for the model before training), the retention and the questions lost and gained."""
    from fedbe.general_ability import answer_changes, answer_string, definition_answers  # noqa: PLC0415

    if not federation.final_questions:
        return {}
    with torch.no_grad():
        extra = definition_answers(model, federation.tokenizer, federation.final_questions)
    answers = scores["definition_answers"] + answer_string(extra)
    out: dict[str, Any] = {
        "final_definition_answers": answers, "final_definition_accuracy": answers.count("1") / len(answers),
    }  # fmt: skip
    if before is not None:
        first = before["final_definition_accuracy"]
        out["final_definition_retention"] = (
            out["final_definition_accuracy"] / first if first else float("nan")
        )
        out["final_definitions_lost"], out["final_definitions_gained"] = answer_changes(
            before["final_definition_answers"], answers
        )
    return out


def measure_capacities(federation: Federation, say: Callable[[str], None]) -> None:
    """Memory budget and step costs of each client's profile (emulated), as ``fedbe-edge profile``
    measures and announces them. The memory budget is the profile's own, at its own base precision
    (nf4, fp16, ...). The step costs come from one measurement on this machine in the bench's
    precision, times the profile's compute slowdown: that is how the bench trains every client (one
    shared base in ``settings.precision``) and how it emulates their time, so the allocation plans
    with the costs the round then has. Measuring each profile in its own precision here would plan
    with this CPU's speed for that precision (fp16 matmuls on this CPU ran 14 times slower than bf16),
    not the device's, and would let the load at the moment of each measurement reorder the clients."""
    from edge_client.device_report import build_report  # noqa: PLC0415
    from edge_client.step_cost import StepTimeModel  # noqa: PLC0415

    settings = federation.settings

    def report_for(c: Client, precision: str | None) -> Any:
        return build_report(
            c.profile, settings.model, n_blocks=federation.blocks, batch_size=settings.batch_size,
            max_tokens=settings.max_tokens,
            precision=precision, emulating=True, progress=lambda _m: None,
        )  # fmt: skip

    shared: Any = None  # the step costs here, in the bench's precision, before any slowdown
    for c in federation.clients:
        own = report_for(c, None)
        c.max_blocks = own.max_trainable_blocks
        if shared is None:
            measured = report_for(c, settings.precision).measured
            shared = StepTimeModel(measured.block_step_seconds, measured.layer_forward_seconds,
                                   own.cost.top_layer_index)  # fmt: skip
        cost = shared.slowed(c.slowdown)
        forward = cost.layer_forward_seconds * own.memory.num_layers
        c.forward_seconds = forward
        c.backward_seconds = max(cost.block_step_seconds - forward, 1.5 * cost.layer_forward_seconds)
        say(
            f"  {c.client_id} {c.profile.name}: slowdown {c.slowdown:.1f}, memory for {c.max_blocks} block(s), "
            f"{len(c.examples)} articles {dict((k, int(v)) for k, v in c.histogram.items() if v)}"
        )


# -- memory: what one training step holds ----------------------------------------------------------
def step_memory_bytes(model: Any, params: Sequence[torch.nn.Parameter], batch: Any) -> int:
    """Bytes one training step holds: the model's tensors, the tensors saved for backward during the
    forward (measured with saved-tensor hooks), and per trainable parameter its gradient and AdamW's
    two moments. The same count for every method, so the figures compare."""
    from fedbe.quantization import module_bytes  # noqa: PLC0415

    seen: set[int] = set()
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            saved[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                    use_cache=False)  # fmt: skip
    out.loss.backward()
    for p in params:
        p.grad = None
    trainable = sum(p.numel() * p.element_size() for p in params)
    return module_bytes(model) + saved[0] + 3 * trainable


