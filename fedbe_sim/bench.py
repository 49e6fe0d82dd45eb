"""``fedbe bench``: FedBE against federated LoRA baselines, on identical splits, seeds and budgets.

Every method runs the same federation in one process: the same clients (device profiles, Dirichlet
label shards of the BBC News train split), the same rounds, local steps, batch size and learning
rate, and the same evaluation after every round (BBC test accuracy and the general-ability probes
of :mod:`fedbe.general_ability`). The algorithms are the production ones: :func:`coordinator.allocation.allocate`,
:func:`edge_client.trainer.train_blocks` / :func:`~edge_client.trainer.train_parameters`,
:func:`fedbe.compression.compress_state` (int8 updates) and :func:`coordinator.aggregation.aggregate`.
Only the transport is left out (``fedbe simulate`` runs the real processes over MQTT).

**Time.** Clients train one after another on this machine; each client's round time is its measured
training time times its profile's compute slowdown plus its transfer time over the profile's link.
A round lasts as long as its slowest client (synchronous FedAvg), and "wall seconds" are the sum of
those emulated round times. FedBE clients get a deadline (``deadline_factor`` x the median client's
time to train every block) and the allocation gives slow clients fewer, higher blocks; LoRA and
full fine-tuning have no such knob: every client backpropagates through the whole model.

Methods (``--methods``):

* ``fedbe``: new blocks (lr 2e-3 in round 1, halved every round), the coordinator's allocation with a
  deadline of 0.6 x the median client's all-blocks time, self-distillation (lambda 3, 3, then 12;
  cached top-32 of the base, 128 positions of one row a step), the label-balanced loss, each block
  averaged over the round (a client that did not train it counting as a zero change); a client runs
  every new block, the ones it does not train frozen; every method's clients receive the global
  weights as int8 (--download-level)
* ``fedbe-plain``: the same without self-distillation (ablation)
* ``fedbe-exact``: self-distillation with the exact KL and no cache (cost ablation)
* ``fedbe-interleave``: ``fedbe`` with its blocks interleaved (LLaMA Pro) whatever ``--placement`` says
* ``pos-bottom`` / ``pos-middle`` / ``pos-top``: one new block at that depth, plain CE (where forgetting happens)
* ``fedbe-random`` / ``fedbe-all``: random allocation / every client trains all blocks it can hold
* ``fedit``: FedAvg of LoRA adapters (PEFT, r=16 on every linear layer of the base; the same lr schedule)
* ``fedit-distill``: FedIT with the same self-distillation as ``fedbe`` (adapters disabled = base)
* ``ffa-lora``: LoRA with A frozen at its random init, only B trained and averaged
* ``full-ft``: FedAvg of every weight; skipped (and said so) when its estimated time exceeds the budget

FedBE's round is :func:`coordinator.round.plan_round` and :func:`coordinator.round.close_round`, the
functions the coordinator daemon runs; the methods above are settings of it.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coordinator.aggregation import BLOCK_AVERAGES
from fedbe.device_profile import resolve_profile
from fedbe.errors import ConfigError, ExpansionError, FedbeError
from fedbe.recipe import Recipe, parse_schedule

log = logging.getLogger(__name__)

DEFAULT_PROFILES = ("rtx-4090-24gb", "cpu-laptop", "jetson-orin-nano-8gb", "jetson-xavier-nx")
BLOCK_METHODS = ("fedbe", "fedbe-plain", "fedbe-exact", "fedbe-interleave", "fedbe-random", "fedbe-all")
POSITION_METHODS = ("pos-bottom", "pos-middle", "pos-top")
LORA_BASES = ("frozen", "plain")  # BenchSettings.lora_base
LORA_METHODS = ("fedit", "fedit-distill", "ffa-lora")
NEW_BLOCK_METHODS = BLOCK_METHODS + POSITION_METHODS  # the methods BlockMethod runs (they train new blocks)
ALL_METHODS = BLOCK_METHODS + LORA_METHODS + ("full-ft",) + POSITION_METHODS
DEFAULT_METHODS = ("fedbe", "fedbe-plain", "fedbe-random", "fedbe-all", "fedit", "fedit-distill", "ffa-lora",
                   "full-ft")  # fmt: skip
DOWNLOAD_LEVELS = ("fp32", "bf16", "fp16", "int8")
PROBE_HEAD = 48  # the perplexity probe of bench runs v1-v9, reported beside the larger one (same first texts)
QUICK_METHODS = ("fedbe", "fedbe-random", "fedit", "ffa-lora", "full-ft")


@dataclass(frozen=True)
class BenchSettings:
    model: str = "smollm2-135m"
    methods: tuple[str, ...] = DEFAULT_METHODS
    profiles: tuple[str, ...] = DEFAULT_PROFILES
    clients: int = 4
    rounds: int = 4
    steps: int = 4
    batch_size: int = 4
    max_tokens: int = 128
    # FedBE's lr in round 1, x lr_decay every round after (2e-3, 1e-3, 5e-4, 2.5e-4); chosen on
    # --split validation against a constant 1e-3 (docs/validation-sweep.md, last section)
    lr: float = 2e-3
    lora_lr: float = 2e-3  # the LoRA methods', with lora_lr_decay: the same schedule, chosen the same way
    full_ft_lr: float = 3e-4
    lora_rank: int = 16
    blocks: int = 6
    # where FedBE's new blocks go (fedbe.expansion.plan_expansion): interleave (LLaMA Pro: after the
    # last layer of each group, the top block right under the output head), interleave-mid-top (the
    # top group's block after its middle layer instead), middle (every block there) or base-layer
    # indices. Chosen on --split validation, seeds 0-2 (docs/validation-sweep.md, last section):
    # mean perplexity retention 0.9985 against interleave's 0.995 at mean final accuracy 0.937 / 0.930
    placement: str = "interleave-mid-top"
    alpha: float = 0.5
    seeds: tuple[int, ...] = (0,)
    examples_per_client: int = 48
    eval_examples: int = 100
    # 400 WordNet definition questions since v12: at 100, one changed answer moved retention by 0.017 and
    # the three seeds could not say whether a method lost or gained on the probe (v11: FedIT-LoRA 1.016 ±
    # 0.026); the per-question answers are recorded, so lost and gained questions are counted too
    probe_questions: int = 400
    # more definition questions (disjoint from those), scored on each method's model before training and
    # after the last round only, together with the per-round ones: since session 25, when 400 a seed
    # could not say whether FedBE and FedIT + distillation differ on the probe (-0.005 ± 0.016); 0 = none
    final_probe_questions: int = 1600
    # 192 quotations (about 6,000 tokens) since v10: 48 could not resolve the retention differences
    # the goal compares (about 0.003); the first PROBE_HEAD of them, v1-v9's probe, are scored apart too
    probe_texts: int = 192
    split: str = "test"  # "validation": choose settings here, never on test
    # FedBE's self-distillation weight; a tuple is a per-round schedule (rounds 1, 2, ...; its last
    # value holds after it; coordinator.config.round_value). Chosen on --split validation, seeds 0-2
    # (docs/validation-sweep.md, last section): 3 while the blocks learn (rounds 1-2, lr 2e-3 and
    # 1e-3), 12 after: perplexity retention 0.997 / 1.004 / 1.004 against constant 3's 0.993 / 1.002 /
    # 1.001 at mean final accuracy 0.940 / 0.937 (12 in round 1 and 3 after: 0.992 on seed 0)
    distill_lambda: float | tuple[float, ...] = (3.0, 3.0, 12.0)
    lora_distill_lambda: float = 3.0  # fedit-distill's own lambda, chosen on --split validation
    distill_top_k: int = 32
    # distillation positions per step (0 = all), for every distilling method; chosen on --split
    # validation (0 / 64 / 128: 128 keeps the retention of all positions at half the step cost)
    distill_sample: int = 128
    # rows of each batch distilled per step (0 = all): the base forward that fills the cache runs
    # on these rows only, for every distilling method; chosen on --split validation, seeds 0-2
    # (docs/validation-sweep.md, last section): a third cheaper step, retention >= 0.991
    distill_rows: int = 1
    # FedBE's round deadline: this x the median client's time to train every new block (1.0: the
    # median client trains all it holds; lower: slow clients get only blocks near the output);
    # chosen on --split validation (1.0 / 0.6 / 0.4)
    deadline_factor: float = 0.6
    # FedBE leaves a block untrained for a round when its trainers' pooled labels are farther than
    # this (Jensen-Shannon, 0-1) from the federation's (1.0 = no limit). 0.3 was chosen on --split
    # validation with context blocks and per-trainer averaging; with the label-balanced loss, no
    # bound won on validation (session 25, docs/validation-sweep.md, last section: alpha 0.1 final
    # accuracy 0.913 against 0.863, alpha 0.5 unchanged), so 1.0 since session 26 (test run v16)
    max_block_divergence: float = 1.0
    # balanced softmax over the label words with each client's own label frequencies (FedBE methods)
    # (offsets relative to the uniform label mix since session 24); chosen on --split validation, seeds
    # 0-2 at alpha 0.5 and 0.1 (docs/validation-sweep.md, last section): final accuracy 0.960 / 0.863
    # against 0.940 / 0.843 at perplexity retention 1.0011 / 1.0003 against 1.0017 / 1.0004
    label_balance: bool = True
    # what a block's aggregate averages over: "trainers" (its trainers) or "round" (every client of
    # the round, a non-trainer counting as a zero delta, so each client's change enters with its data
    # share however many blocks it trains); see coordinator.aggregation. Chosen on --split
    # validation, seeds 0-2, with the lr schedule and int8 download: round 1 0.63 / 0.94 / 0.58
    # against 0.36 / 0.95 / 0.73, target reached in 2.0 rounds against 2.33, mean final accuracy
    # 0.937 against 0.940, perplexity retention >= 0.989 (docs/validation-sweep.md, last section)
    block_average: str = "round"
    server_lr: float = 1.0  # FedBE's server step on the averaged block deltas (1 = FedAvg)
    lr_decay: float = 0.5  # FedBE's client lr in round r is lr x lr_decay^(r-1)
    lora_lr_decay: float = 0.5  # the same for the LoRA methods (lora_lr x lora_lr_decay^(r-1))
    # the precision every method's clients receive the global trainable weights in (the blocks a FedBE
    # client trains, LoRA adapters, full FT's weights); FedBE's frozen context blocks travel at this
    # level too, never above bf16. A client's update is its change from the weights it received.
    download_level: str = "int8"
    full_ft_budget_seconds: float = 600.0
    precision: str = "bf16"  # the frozen base of every method (full FT trains in fp32)
    # how the LoRA methods hold that base: "frozen", as FedBE does (fedbe.quantization.freeze_base:
    # 16-bit layers handing their outputs to a float32 residual stream), so every method's untrained
    # model is the same computation; "plain": the 16-bit model as loaded (every run before session 28,
    # whose untrained model rounds differently from FedBE's: benchmarks/base_arithmetic.py)
    lora_base: str = "frozen"

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            raise ConfigError(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
        if self.split not in ("test", "validation"):
            raise ConfigError(f"--split must be test or validation, got {self.split!r}")
        for name in ("clients", "rounds", "steps", "batch_size", "blocks", "examples_per_client",
                     "eval_examples", "probe_questions", "probe_texts", "lora_rank"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "distill_sample",
            "distill_rows",
            "distill_top_k",
            "final_probe_questions",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        schedule = self.distill_lambda if isinstance(self.distill_lambda, tuple) else (self.distill_lambda,)
        if not schedule or not all(
            isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in schedule
        ):
            raise ConfigError(f"distill_lambda must be a non-negative number or a non-empty list of them (one per "
                              f"round, the last holding after it), got {self.distill_lambda}")  # fmt: skip
        for name in (
            "lr",
            "lora_lr",
            "full_ft_lr",
            "lora_distill_lambda",
            "full_ft_budget_seconds",
            "deadline_factor",
            "server_lr",
            "lr_decay",
            "lora_lr_decay",
        ):
            value = getattr(self, name)
            positive = name.endswith("lr") or name in ("deadline_factor", "lr_decay", "lora_lr_decay")
            if not (math.isfinite(value) and value >= 0) or (positive and value == 0):
                raise ConfigError(f"{name} must be a {'positive' if positive else 'non-negative'} number, "
                                  f"got {value}")  # fmt: skip
        from fedbe.expansion import PLACEMENTS, parse_placement  # noqa: PLC0415

        try:
            placement = parse_placement(self.placement)
        except ExpansionError as e:
            raise ConfigError(f"--placement: {e}") from None
        if not isinstance(placement, str) and len(placement) != self.blocks:
            raise ConfigError(f"--placement lists {len(placement)} base layers for {self.blocks} new blocks; "
                              f"give {self.blocks} indices, or one of {', '.join(PLACEMENTS)}")  # fmt: skip
        if self.download_level not in DOWNLOAD_LEVELS:
            raise ConfigError(
                f"download_level must be one of {', '.join(DOWNLOAD_LEVELS)}, got {self.download_level!r}"
            )
        if self.lora_base not in LORA_BASES:
            raise ConfigError(f"lora_base must be one of {', '.join(LORA_BASES)}, got {self.lora_base!r}")
        if self.block_average not in BLOCK_AVERAGES:
            raise ConfigError(
                f"block_average must be one of {', '.join(BLOCK_AVERAGES)}, got {self.block_average!r}"
            )
        if not (0 <= self.max_block_divergence <= 1):
            raise ConfigError(f"max_block_divergence must be in [0, 1], got {self.max_block_divergence}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"alpha must be a positive number, got {self.alpha}")


def quick(settings: BenchSettings, methods_given: bool = False) -> BenchSettings:
    """The ``--quick`` variant: fewer methods (unless given), rounds and evaluation items."""
    return replace(
        settings, methods=settings.methods if methods_given else QUICK_METHODS,
        clients=3, rounds=2, steps=3, examples_per_client=24, eval_examples=40, probe_questions=40,
        final_probe_questions=0, probe_texts=24, profiles=settings.profiles[:3],
        full_ft_budget_seconds=min(settings.full_ft_budget_seconds, 120.0),
    )  # fmt: skip


# -- the shared world: data, clients, evaluation ---------------------------------------------------
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
class World:
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


def build_world(settings: BenchSettings, seed: int, say: Callable[[str], None]) -> World:
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
    return World(
        settings, seed, source, tokenizer, labels, clients, eval_examples, probe, min(settings.blocks, layers),
        final_questions=tuple(final),
    )  # fmt: skip


def evaluate(world: World, model: Any) -> dict[str, Any]:
    """Accuracy and the general probe's scores, with its per-question answers under
    ``definition_answers`` (:func:`fedbe.general_ability.answer_string`)."""
    from fedbe.evaluation import classification_accuracy  # noqa: PLC0415

    scores: dict[str, Any] = {
        "accuracy": classification_accuracy(
            model, world.tokenizer, world.eval_examples, world.labels, world.settings.max_tokens
        )
    }
    probe_scores, answers = world.probe.score_with_answers(model, world.tokenizer)
    scores.update(probe_scores)
    scores["definition_answers"] = answers
    return scores


def evaluate_against(world: World, model: Any, before: dict[str, Any]) -> dict[str, Any]:
    """:func:`evaluate` with the retention against ``before`` (an :func:`evaluate` of the model before
    training) and the definition questions answered differently from it (``definitions_lost``,
    ``definitions_gained``)."""
    from fedbe.general_ability import answer_changes, retention  # noqa: PLC0415

    with torch.no_grad():
        scores = evaluate(world, model)
    scores.update(retention(before, scores))
    scores["definitions_lost"], scores["definitions_gained"] = answer_changes(
        before["definition_answers"], scores["definition_answers"]
    )
    return scores


def final_probe(world: World, model: Any, scores: dict[str, Any], before: dict[str, Any] | None = None
                ) -> dict[str, Any]:  # fmt: skip
    """The final probe's scores for ``model`` (empty when the world has no final questions): its
    answers to the per-round questions (from ``scores``, an :func:`evaluate` of it) followed by the
    final questions', under ``final_definition_answers``, and their accuracy; with ``before`` (the same
    for the model before training), the retention and the questions lost and gained."""
    from fedbe.general_ability import answer_changes, answer_string, definition_answers  # noqa: PLC0415

    if not world.final_questions:
        return {}
    with torch.no_grad():
        extra = definition_answers(model, world.tokenizer, world.final_questions)
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


def measure_capacities(world: World, say: Callable[[str], None]) -> None:
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

    s = world.settings

    def report_for(c: Client, precision: str | None) -> Any:
        return build_report(
            c.profile, s.model, n_blocks=world.blocks, batch_size=s.batch_size, max_tokens=s.max_tokens,
            precision=precision, emulating=True, progress=lambda _m: None,
        )  # fmt: skip

    shared: Any = None  # the step costs here, in the bench's precision, before any slowdown
    for c in world.clients:
        own = report_for(c, None)
        c.max_blocks = own.max_trainable_blocks
        if shared is None:
            measured = report_for(c, s.precision).measured
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


# -- methods ---------------------------------------------------------------------------------------
@dataclass
class ClientResult:
    client_id: str
    blocks: tuple[int, ...]
    train_seconds: float
    emulated_seconds: float
    transfer_seconds: float
    bytes_up: int
    bytes_down: int
    loss: float
    base_forwards: int
    samples: int


class Method:
    """One federated method: a model, its global trainable state, a client round and the aggregation."""

    name: str
    global_state: dict[int, dict[str, torch.Tensor]]
    model: Any

    def __init__(self, name: str, world: World) -> None:
        self.name, self.world, self.s = name, world, world.settings
        self.residuals: dict[str, Any] = {}
        self.caches: dict[str, Any] = {}
        self.peak_memory = 0
        self.withdrawn: tuple[int, ...] = ()  # blocks the last allocation left out for label skew
        self.priors: dict[str, Any] = {}  # client id -> LabelPrior, for the label-balanced loss

    def label_priors(self) -> bool:
        """Each client's label counts on the label words' first tokens (as the evaluation scores them);
        False, with a warning, where two labels share a first token (a byte tokenizer starts every
        " label" with the space): the clients then train plain cross-entropy, as an edge agent does."""
        from edge_client.trainer import LabelPrior  # noqa: PLC0415

        try:
            self.priors = {
                c.client_id: LabelPrior.for_labels(self.world.tokenizer, self.world.labels, c.histogram)
                for c in self.world.clients
            }
        except FedbeError as exc:
            log.warning("%s: label-balanced loss not used (%s)", self.name, exc)
            self.priors = {}
            return False
        return True

    def recipe(self, lr: float, lr_decay: float, distill_lambda: float | tuple[float, ...],
               label_balance: bool = False) -> Recipe:  # fmt: skip
        """This run's training recipe with a method's own lr schedule and distillation weight."""
        return Recipe(
            steps=self.s.steps, lr=lr, lr_decay=lr_decay, batch_size=self.s.batch_size,
            max_tokens=self.s.max_tokens, distill_lambda=distill_lambda, distill_top_k=self.s.distill_top_k,
            distill_sample=self.s.distill_sample, distill_rows=self.s.distill_rows, label_balance=label_balance,
        )  # fmt: skip

    def download(self, state: Any, level: str | None = None) -> tuple[Any, dict[int, int]]:
        """``state`` as a client receives it at ``level`` (default ``download_level``), and its bytes per block."""
        from fedbe.compression import Level, compress_state, decompress_state  # noqa: PLC0415

        compressed, _ = compress_state(state, Level(level or self.s.download_level))
        nbytes = {b: sum(c.nbytes for c in params.values()) for b, params in compressed.items()}
        return decompress_state(compressed), nbytes

    def compress(self, client_id: str, delta: Any) -> tuple[Any, int]:
        from fedbe.compression import Level, compress_state, decompress_state  # noqa: PLC0415

        held = self.residuals.get(client_id, {})
        # a block this client did not train before starts with a zero residual
        residual = {b: held.get(b) or {n: torch.zeros_like(t) for n, t in delta[b].items()} for b in delta}
        compressed, new_residual = compress_state(delta, Level.INT8, residual)
        self.residuals.setdefault(client_id, {}).update(new_residual)
        nbytes = sum(c.nbytes for params in compressed.values() for c in params.values())
        return decompress_state(compressed), nbytes

    def round(self, round_: int) -> list[ClientResult]:
        raise NotImplementedError

    def eval_model(self) -> Any:
        raise NotImplementedError


def train_time(result: Any) -> float:
    """Training seconds, robust to other load on this machine: median step time x steps run."""
    return statistics.median(result.step_seconds) * len(result.step_seconds) if result.step_seconds else 0.0


def emulated(client: Any, result: Any, up: int, down: int) -> tuple[float, float]:
    """The client's emulated round seconds (its time here x its profile's slowdown, plus its transfer
    over the profile's link) and the transfer part alone."""
    transfer = 8 * (up + down) / client.link_bps
    return train_time(result) * client.slowdown + transfer, transfer


class BlockMethod(Method):
    def __init__(self, name: str, world: World) -> None:
        super().__init__(name, world)
        from fedbe import expansion, quantization, sources  # noqa: PLC0415
        from fedbe.blocks import block_layout, get_block_state  # noqa: PLC0415

        model = sources.load_model(world.source)
        layers = model.config.num_hidden_layers
        if name in POSITION_METHODS:
            index = {"pos-bottom": 0, "pos-middle": layers // 2, "pos-top": layers - 1}[name]
            plan = expansion.plan_expansion(layers, None, (index,))
        else:
            plan = expansion.plan_expansion(
                layers, world.blocks, method_placement(self.s, name) or "interleave"
            )
        self.registry = expansion.expand_model(model, plan)
        quantization.freeze_base(model, self.registry, self.s.precision)
        self.model = model
        self.global_state = get_block_state(model, self.registry)
        self.distill = name not in ("fedbe-plain",) + POSITION_METHODS
        balance = self.s.label_balance and name not in POSITION_METHODS and self.label_priors()
        recipe = self.recipe(self.s.lr, self.s.lr_decay, self.s.distill_lambda if self.distill else 0.0, balance)
        if name == "fedbe-exact":
            recipe = replace(recipe, distill_top_k=0)
        from coordinator.aggregation import FedAvgM  # noqa: PLC0415
        from coordinator.allocation import AllocationPolicy  # noqa: PLC0415
        from coordinator.round import Candidate, RoundPolicy  # noqa: PLC0415

        # a position method's one block goes to every client: no deadline, every block each can hold
        position = name in POSITION_METHODS
        self.policy = RoundPolicy(
            recipe=recipe, clients_per_round=len(world.clients), deadline_seconds=sys.float_info.max,
            deadline_factor=None if position else self.s.deadline_factor,
            allocation=AllocationPolicy(
                strategy="all" if position else {"fedbe-random": "random", "fedbe-all": "all"}.get(name, "fedbe"),
                max_block_divergence=self.s.max_block_divergence,
            ),
            block_average=self.s.block_average,
            server_optimizer=None if self.s.server_lr == 1.0 else FedAvgM(lr=self.s.server_lr, momentum=0.0),
        )  # fmt: skip
        self.candidates = [Candidate(c.client_id, c.max_blocks, c.forward_seconds, c.backward_seconds,
                                     dict(c.histogram)) for c in world.clients]  # fmt: skip
        self.layout = block_layout(model, self.registry)
        self.last_trained: dict[int, int] = {}

    def round(self, round_: int) -> list[ClientResult]:
        from coordinator.round import Reply, close_round, plan_round, trained_blocks  # noqa: PLC0415
        from edge_client.loss import BaseCache  # noqa: PLC0415
        from edge_client.trainer import train_blocks  # noqa: PLC0415
        from fedbe.blocks import block_delta, get_block_state, set_block_state, set_trainable  # noqa: PLC0415

        # the coordinator's plan: every client, the allocation under the round's deadline
        plan = plan_round(self.policy, round_, self.candidates, self.registry, self.last_trained, self.world.seed,
                          random.Random(self.world.seed))  # fmt: skip
        self.withdrawn = plan.allocation.withdrawn_blocks
        assignments, recipe = plan.assignments, plan.recipe
        # a client trains from the weights as they arrive (download_level); the blocks it does not
        # train arrive frozen (at most bf16) and run as they are
        received, received_bytes = self.download(self.global_state, self.s.download_level)
        level = "bf16" if self.s.download_level == "fp32" else self.s.download_level
        as_context, context_bytes = self.download(self.global_state, level)
        results, replies = [], []
        for c in self.world.clients:
            blocks = assignments.get(c.client_id)
            if not blocks:
                continue
            sent = {b: received[b] for b in blocks}
            frozen = {b: p for b, p in as_context.items() if b not in blocks}
            set_block_state(self.model, self.registry, {**self.global_state, **frozen, **sent})
            down = sum(received_bytes[b] for b in sent) + sum(context_bytes[b] for b in frozen)
            if recipe.distill_top_k and recipe.distill_lambda_in_round(round_):
                self.caches.setdefault(c.client_id, BaseCache(recipe.distill_top_k))
            torch.manual_seed(self.world.seed * 7919 + round_)
            if self.peak_memory == 0 or len(blocks) == max(len(b) for b in assignments.values()):
                params = set_trainable(self.model, self.registry, blocks)
                self.peak_memory = max(self.peak_memory, step_memory_bytes(self.model, params, c.batches[0]))
                self.model.requires_grad_(False)
            result = train_blocks(self.model, self.registry, blocks, c.batches_for(round_), recipe, round_,
                                  base_cache=self.caches.get(c.client_id),
                                  label_prior=self.priors.get(c.client_id))  # fmt: skip
            trained = get_block_state(self.model, self.registry, blocks)
            delta, up = self.compress(c.client_id, block_delta(trained, sent))
            replies.append(Reply(c.client_id, delta, result.samples, round_))
            results.append(ClientResult(
                c.client_id, tuple(blocks), train_time(result),
                *emulated(c, result, up, down), up, down,
                result.mean_loss, result.base_forwards, result.samples,
            ))  # fmt: skip
        if replies:
            outcome = close_round(self.policy, plan, self.global_state, self.layout, replies)
            for cid, code, reason in outcome.rejected:
                log.warning("%s round %d: %s's update rejected (%s): %s", self.name, round_, cid, code, reason)
            self.global_state = outcome.new_state
            for block_id in trained_blocks(outcome):
                self.last_trained[block_id] = round_
        return results

    def eval_model(self) -> Any:
        from fedbe.blocks import set_block_state  # noqa: PLC0415

        set_block_state(self.model, self.registry, self.global_state)
        return self.model


def hold_plain(model: Any, precision: str) -> None:
    """``--lora-base plain``: the model as loaded, in ``precision`` if 16-bit (multiplying in float32
    where this CPU has no fast 16-bit matmul), with no float32 residual stream between its layers."""
    from fedbe import quantization  # noqa: PLC0415

    if precision in ("bf16", "fp16"):
        model.to(torch.bfloat16 if precision == "bf16" else torch.float16)
        quantization.fp32_matmuls(model)


class LoraMethod(Method):
    def __init__(self, name: str, world: World) -> None:
        super().__init__(name, world)
        from peft import LoraConfig, get_peft_model  # noqa: PLC0415

        from fedbe import quantization, sources  # noqa: PLC0415

        base = sources.load_model(world.source)
        base.requires_grad_(False)
        if self.s.lora_base == "frozen":  # FedBE's frozen base, without new blocks: the same computation
            from fedbe.expansion import BlockRegistry  # noqa: PLC0415

            registry = BlockRegistry(base_num_layers=base.config.num_hidden_layers, blocks=())
            quantization.freeze_base(base, registry, self.s.precision)
        else:
            hold_plain(base, self.s.precision)
        torch.manual_seed(world.seed)  # the same random A for every client (FedIT and FFA-LoRA alike)
        cfg = LoraConfig(r=self.s.lora_rank, lora_alpha=2 * self.s.lora_rank, lora_dropout=0.0,
                         target_modules="all-linear", bias="none")  # fmt: skip
        self.model = get_peft_model(base, cfg)
        self.model.eval()
        self.names = [n for n, p in self.model.named_parameters() if "lora_" in n]
        if name == "ffa-lora":
            self.names = [n for n in self.names if "lora_B" in n]
        self.global_state = {
            0: {n: p.detach().clone() for n, p in self.model.named_parameters() if n in self.names}
        }
        distill = self.s.lora_distill_lambda if name == "fedit-distill" else 0.0
        self.config = self.recipe(self.s.lora_lr, self.s.lora_lr_decay, distill)

    def _params(self) -> list[torch.nn.Parameter]:
        named = dict(self.model.named_parameters())
        return [named[n] for n in self.names]

    def _load(self, state: dict[str, torch.Tensor]) -> None:
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in state.items():
                named[n].copy_(t)

    def round(self, round_: int) -> list[ClientResult]:
        from coordinator.aggregation import ClientUpdate, aggregate  # noqa: PLC0415
        from edge_client.loss import BaseCache  # noqa: PLC0415
        from edge_client.trainer import train_parameters  # noqa: PLC0415
        from fedbe.blocks import block_delta  # noqa: PLC0415

        results, updates = [], []
        received, received_bytes = self.download(self.global_state)
        config = self.config
        for c in self.world.clients:
            self._load(received[0])
            params = self._params()
            for p in params:
                p.requires_grad_(True)
            if self.peak_memory == 0:
                self.peak_memory = step_memory_bytes(self.model, params, c.batches[0])
            if config.distill_top_k and config.distill_lambda_in_round(round_):
                self.caches.setdefault(c.client_id, BaseCache(config.distill_top_k))
            torch.manual_seed(self.world.seed * 7919 + round_)
            result = train_parameters(
                self.model, params, c.batches_for(round_), config, round_, base=self.model.disable_adapter,
                base_cache=self.caches.get(c.client_id), label_prior=self.priors.get(c.client_id),
            )  # fmt: skip
            trained = {
                0: {n: p.detach().clone() for n, p in self.model.named_parameters() if n in self.names}
            }
            delta, up = self.compress(c.client_id, block_delta(trained, received))
            updates.append(ClientUpdate(c.client_id, delta, result.samples, 0))
            down = received_bytes[0]
            results.append(ClientResult(
                c.client_id, (), train_time(result),
                *emulated(c, result, up, down), up, down,
                result.mean_loss, result.base_forwards, result.samples,
            ))  # fmt: skip
        self.global_state = aggregate(self.global_state, updates).new_state
        return results

    def eval_model(self) -> Any:
        self._load(self.global_state[0])
        return self.model


class FullMethod(Method):
    def __init__(self, name: str, world: World) -> None:
        super().__init__(name, world)
        from fedbe import sources  # noqa: PLC0415

        self.model = sources.load_model(world.source)
        self.model.eval()
        self.model.requires_grad_(False)
        self.names = [n for n, _ in self.model.named_parameters()]
        self.global_state = {0: {n: p.detach().clone() for n, p in self.model.named_parameters()}}
        self.config = self.recipe(self.s.full_ft_lr, 1.0, 0.0)

    def estimate_seconds(self) -> float:
        """Emulated training seconds for the whole run, from one timed step."""
        params = list(self.model.parameters())
        for p in params:
            p.requires_grad_(True)
        c = self.world.clients[0]
        started = time.perf_counter()
        self.peak_memory = step_memory_bytes(self.model, params, c.batches[0])
        step = time.perf_counter() - started
        self.model.requires_grad_(False)
        slowest = max(cl.slowdown for cl in self.world.clients)
        return step * self.s.steps * self.s.rounds * (len(self.world.clients) + slowest)

    def round(self, round_: int) -> list[ClientResult]:
        from coordinator.aggregation import ClientUpdate, aggregate  # noqa: PLC0415
        from edge_client.trainer import train_parameters  # noqa: PLC0415
        from fedbe.blocks import block_delta  # noqa: PLC0415

        results, updates = [], []
        named = dict(self.model.named_parameters())
        received, received_bytes = self.download(self.global_state)
        for c in self.world.clients:
            with torch.no_grad():
                for n, t in received[0].items():
                    named[n].copy_(t)
            params = list(named.values())
            for p in params:
                p.requires_grad_(True)
            torch.manual_seed(self.world.seed * 7919 + round_)
            result = train_parameters(self.model, params, c.batches_for(round_), self.config, round_)
            trained = {0: {n: p.detach().clone() for n, p in self.model.named_parameters()}}
            delta, up = self.compress(c.client_id, block_delta(trained, received))
            updates.append(ClientUpdate(c.client_id, delta, result.samples, 0))
            down = received_bytes[0]
            results.append(ClientResult(
                c.client_id, (), train_time(result),
                *emulated(c, result, up, down), up, down,
                result.mean_loss, 0, result.samples,
            ))  # fmt: skip
        self.global_state = aggregate(self.global_state, updates).new_state
        return results

    def eval_model(self) -> Any:
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in self.global_state[0].items():
                named[n].copy_(t)
        return self.model


def make_method(name: str, world: World) -> Method:
    if name in NEW_BLOCK_METHODS:
        return BlockMethod(name, world)
    if name in LORA_METHODS:
        return LoraMethod(name, world)
    return FullMethod(name, world)


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
) -> tuple[BenchSettings, World, Method]:
    """The bench's settings for the flags of :func:`add_diagnosis_arguments` (plus ``overrides``),
    the world of that seed with its capacities measured, and the method on it: what the diagnosis
    scripts in ``benchmarks/`` start from, so they see exactly the bench's run."""
    settings = replace(
        BenchSettings(
            model=args.model, split=args.split, seeds=(args.seed,), methods=(args.method,), alpha=args.alpha
        ),  # fmt: skip
        **overrides,
    )
    world = build_world(settings, args.seed, say)
    measure_capacities(world, say)
    return settings, world, make_method(args.method, world)


# -- the run ---------------------------------------------------------------------------------------
def run_method(world: World, name: str, say: Callable[[str], None]) -> dict[str, Any]:
    started = time.perf_counter()
    method = make_method(name, world)
    record: dict[str, Any] = {"method": name, "seed": world.seed, "rounds": []}
    if isinstance(method, FullMethod):
        estimate = method.estimate_seconds()
        if estimate > world.settings.full_ft_budget_seconds:
            say(f"  {name}: skipped — an estimated {estimate:.0f} s of training exceeds the budget of "
                f"{world.settings.full_ft_budget_seconds:.0f} s (--full-ft-budget)")  # fmt: skip
            record["skipped"] = (
                f"estimated {estimate:.0f} s > budget {world.settings.full_ft_budget_seconds:.0f} s"
            )
            return record
    trainable = sum(t.numel() for params in method.global_state.values() for t in params.values())
    record["trainable_parameters"] = trainable
    # Round 0: this method's model before training (the expanded model, or LoRA with B = 0, is exactly
    # the base at this precision); retention is measured against it.
    with torch.no_grad():
        untrained = method.eval_model()
        before = evaluate(world, untrained)
    before.update(final_probe(world, untrained, before))
    record["round0"] = before
    if not world.base_scores:
        world.base_scores = before
    final = (f" (final probe {before['final_definition_accuracy']:.4f} of {len(before['final_definition_answers'])})"
             if "final_definition_answers" in before else "")  # fmt: skip
    say(f"  {name} before training: accuracy {before['accuracy']:.3f}, definitions "
        f"{before['definition_accuracy']:.3f}{final}, perplexity {before['perplexity']:.2f}")  # fmt: skip
    wall = 0.0
    for r in range(1, world.settings.rounds + 1):
        results = method.round(r)
        round_seconds = max((x.emulated_seconds for x in results), default=0.0)
        wall += round_seconds
        model = method.eval_model()
        scores = evaluate_against(world, model, before)
        if r == world.settings.rounds:
            scores.update(final_probe(world, model, scores, before))
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
            / max(1, world.settings.steps * len(results)),
        }  # fmt: skip
        record["rounds"].append(row)
        say(
            f"  {name} round {r}/{world.settings.rounds}: accuracy {scores['accuracy']:.3f}, definitions "
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
        # questions lost / gained on the per-round probe (records before v12 lack them) and on the final
        # probe (runs since session 25, which also carry its retention)
        for probe in ("", "final_"):
            if all(f"{probe}definitions_lost" in r["rounds"][-1] for r in recs):
                for key in (f"{probe}definitions_lost", f"{probe}definitions_gained"):
                    rows[-1][key] = [int(r["rounds"][-1][key]) for r in recs]
                rows[-1][f"{probe}definition_questions"] = sum(
                    len(r["round0"][f"{probe}definition_answers"]) for r in recs
                )
        if all("final_definition_retention" in r["rounds"][-1] for r in recs):
            rows[-1]["final_definition_retention"] = stat("final_definition_retention")
    return rows


# two-sided 95% quantiles of Student's t by degrees of freedom (beyond the table: the normal's 1.96)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip
PAIRED_KEYS = ("accuracy", "perplexity_retention", "definition_retention", "final_definition_retention")
PAIRED_COLUMNS = {"accuracy": "accuracy", "perplexity_retention": "perplexity retention",
                  "definition_retention": "definitions retention",
                  "final_definition_retention": "definitions retention, final probe"}  # fmt: skip


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
            # --lora-base plain (runs before session 28) the LoRA methods computed them as the plain
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
    interleaved = max(loss["pos-bottom"], loss["pos-middle"]) / worst
    return {
        "forgetting": loss,
        "top_risk": round(loss["pos-top"] / worst, 3),
        "interleaved_risk": round(interleaved, 3),
    }


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
            "probe of the runs before v10, the same texts): "
            + ", ".join(f"{r['method']} {_pm(r['perplexity_head_retention'], '.3f')}" for r in heads)
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
            + ", ".join(f"{m[4:]} {v:.3f}" for m, v in risks["forgetting"].items())
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


def method_placement(settings: BenchSettings, method: str) -> str | None:
    """The placement ``method`` expands the model with (None: it adds no interleaved blocks)."""
    if method == "fedbe-interleave":
        return "interleave"
    return settings.placement if method in BLOCK_METHODS else None


# Settings that only the block methods (FedBE, its ablations, the position methods) read: the LoRA
# methods and full FT train with lora_lr / full_ft_lr, lora_lr_decay and lora_distill_lambda, and
# have no allocation, blocks or server step. In their digests these are pinned to fixed values (the
# defaults of bench v10, so every record made with them keeps its digest), so a change of FedBE's
# knobs retrains FedBE, not its baselines.
BLOCK_ONLY_PINNED: dict[str, Any] = {
    "lr": 2e-3, "lr_decay": 0.5, "distill_lambda": 3.0, "deadline_factor": 0.6,
    "max_block_divergence": 0.3, "label_balance": False, "block_average": "round", "server_lr": 1.0,
}  # fmt: skip


def settings_digest(settings: BenchSettings, method: str | None = None) -> str:
    """What a method run depends on (everything but the list of methods and seeds).

    The placement counts only where ``method`` uses it, and only when it is not interleave (every run
    before the setting existed), so LoRA records and earlier interleave records keep their digest.
    The block-only settings (:data:`BLOCK_ONLY_PINNED`) count only for the block methods.
    """
    import hashlib  # noqa: PLC0415

    data = digested_settings(settings, method)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Settings only some methods read, and the methods that read them: another method's digest leaves
# them out (or pins them, for BLOCK_ONLY_PINNED), and a merged run takes them from the runs of the
# methods that read them (:func:`merge_runs`).
FIELD_READERS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(BLOCK_ONLY_PINNED, NEW_BLOCK_METHODS),
    "lora_base": LORA_METHODS,
}
# Settings added after records were published, at the value every earlier run had: at that value
# they stay out of the digest, so the earlier records keep theirs.
# A results.json from before a setting existed reads as that value (settings_from_dict).
ADDED_LATER: dict[str, Any] = {
    "final_probe_questions": 0,  # no final probe before session 25
    "lora_base": "plain",  # the LoRA methods' base as loaded (runs before session 28)
}


def digested_settings(settings: BenchSettings, method: str | None = None) -> dict[str, Any]:
    """The settings :func:`settings_digest` hashes for ``method`` (None: every setting any method reads)."""
    data = asdict(settings)
    del data["methods"], data["seeds"], data["placement"]
    placement = settings.placement if method is None else method_placement(settings, method)
    if placement not in (None, "interleave"):
        data["placement"] = placement
    for key, readers in FIELD_READERS.items():
        if method is not None and method not in readers:
            if key in BLOCK_ONLY_PINNED:
                data[key] = BLOCK_ONLY_PINNED[key]
            else:
                del data[key]
    for key, before in ADDED_LATER.items():
        if key in data and data[key] == before:
            del data[key]
    return data


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
        world: World | None = None
        for i, name in enumerate(settings.methods, 1):
            if (name, seed) in done:
                rec = done[(name, seed)]
                say(f"[seed {seed}] method {i}/{len(settings.methods)}: {name} (from the previous run)")
            else:
                if world is None:
                    world = build_world(settings, seed, say)
                    measure_capacities(world, say)
                    first = next((r for (m, s_), r in done.items() if s_ == seed and r.get("round0")), None)
                    if first is not None:
                        world.base_scores = first["round0"]
                say(f"[seed {seed}] method {i}/{len(settings.methods)}: {name} "
                    f"({time.perf_counter() - started:.0f} s elapsed)")  # fmt: skip
                torch.manual_seed(seed)
                rec = run_method(world, name, say)
                rec["settings_digest"] = settings_digest(settings, name)
                with (out / "records.jsonl").open("a") as handle:
                    handle.write(json.dumps(rec) + "\n")
            if not base_scores and rec.get("round0"):
                base_scores = rec["round0"]
            records.append(rec)
    return write_results(records, base_scores, settings, out, command, say, started)


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


# -- merging runs ----------------------------------------------------------------------------------
def settings_from_dict(data: dict[str, Any], where: str) -> BenchSettings:
    """The :class:`BenchSettings` a results.json was written with (lists back to tuples); a setting this
    fedbe does not know is refused (the file was written by another version)."""
    known = {f.name for f in fields(BenchSettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown bench setting(s) {', '.join(unknown)}: written by another fedbe "
                          "version; merge runs of one version")  # fmt: skip
    try:
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        for key, before in ADDED_LATER.items():  # a run from before a setting existed ran its old value
            values.setdefault(key, before)
        return BenchSettings(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: its settings are not valid bench settings ({e})") from None


def load_run(path: Path) -> tuple[BenchSettings, list[dict[str, Any]]]:
    """Settings and finished method runs of one ``fedbe bench`` run: its ``--out`` folder or its results.json."""
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(
            f"{path}: no results.json there; give a finished `fedbe bench --out` folder or its results.json "
            "(a stopped run's records.jsonl become a results.json when the same bench command is run again: "
            "it resumes and trains only what is missing)"
        )
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file}: not readable as JSON ({e})") from None
    if not (isinstance(data, dict) and isinstance(data.get("settings"), dict)
            and isinstance(data.get("records"), list)):  # fmt: skip
        raise ConfigError(f"{file}: not a fedbe bench results.json (it needs 'settings' and 'records')")
    settings = settings_from_dict(data["settings"], str(file))
    records = data["records"]
    for i, rec in enumerate(records):
        if not (isinstance(rec, dict) and isinstance(rec.get("method"), str) and isinstance(rec.get("seed"), int)
                and isinstance(rec.get("rounds"), list)):  # fmt: skip
            raise ConfigError(f"{file}: record {i} is not a method run (method, seed, rounds)")
    return settings, records


def settings_differences(first: BenchSettings, other: BenchSettings, method: str) -> str:
    """``"key: first against other, ..."`` for each setting ``method``'s digest holds that differs."""
    a, b = digested_settings(first, method), digested_settings(other, method)
    differ = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(f"{k}: {a.get(k)!r} against {b.get(k)!r}" for k in differ)


def merge_runs(runs: Sequence[tuple[str, BenchSettings, list[dict[str, Any]]]]
               ) -> tuple[BenchSettings, list[dict[str, Any]]]:  # fmt: skip
    """One run out of several ``(name, settings, records)`` runs of the same experiment, for example
    seeds run side by side in separate folders: every record must carry its run's settings digest, each
    method the same digest in every run (the settings that method depends on agree), and a
    (method, seed) pair may come from one run only. The merged settings are those of the first run
    that holds a block method (else the first run), each setting only some methods read
    (:data:`FIELD_READERS`) taken from the runs of those methods, with every method and seed.
    """
    if not runs:
        raise ConfigError("nothing to merge: give at least one run")
    digests: dict[str, tuple[str, str, BenchSettings]] = {}
    seen: dict[tuple[str, int], str] = {}
    merged: list[dict[str, Any]] = []
    for name, settings, records in runs:
        for rec in records:
            method, seed = rec["method"], rec["seed"]
            digest = settings_digest(settings, method)
            if rec.get("settings_digest", digest) != digest:
                raise ConfigError(f"{name}: the {method} run of seed {seed} was not made with the settings in "
                                  "its results.json (its settings digest differs); the file was edited or "
                                  "mixes runs, so it can not be merged")  # fmt: skip
            if method in digests and digests[method][0] != digest:
                raise ConfigError(
                    f"{method} ran under different settings in {digests[method][1]} and {name} ("
                    + settings_differences(digests[method][2], settings, method)
                    + "): their seeds are not one experiment; merge only runs of the same settings"
                )
            digests.setdefault(method, (digest, name, settings))
            if (method, seed) in seen:
                raise ConfigError(f"{method} seed {seed} is in both {seen[(method, seed)]} and {name}: "
                                  "keep one of them (give the other run without it)")  # fmt: skip
            seen[(method, seed)] = name
            merged.append(rec)
    methods = tuple(dict.fromkeys(rec["method"] for rec in merged))
    seeds = tuple(sorted({rec["seed"] for rec in merged}))
    lead = next((s for _, s, recs in runs if any(r["method"] in BLOCK_METHODS for r in recs)), runs[0][1])
    # a setting only some methods read comes from their runs: another method's run may carry any value
    # of it (one from before the setting existed, for example), which that method never depended on
    for key, readers in FIELD_READERS.items():
        values = {getattr(settings, key) for m, (_, _, settings) in digests.items() if m in readers}
        if len(values) == 1:
            lead = replace(lead, **{key: values.pop()})
    # the merged results.json holds one set of settings: every method must have run under them, or the
    # merged run could not be read back (nor merged again, nor resumed)
    for method, (digest, name, settings) in digests.items():
        if settings_digest(lead, method) != digest:
            raise ConfigError(
                f"{method} in {name} ran under other settings than the merged run's ("
                + settings_differences(settings, lead, method)
                + "), settings every method depends on; merge only runs that agree on them"
            )
    merged.sort(key=lambda r: (r["seed"], methods.index(r["method"])))
    return replace(lead, methods=methods, seeds=seeds), merged


def split_run_argument(text: str | Path) -> tuple[Path, tuple[str, ...]]:
    """``RUN`` or ``RUN::METHODS`` (comma-separated) of ``fedbe bench-merge``: the run and the methods to
    take from it (empty: all)."""
    path, sep, names = str(text).partition("::")
    if not sep:
        return Path(path), ()
    methods = tuple(m.strip() for m in names.split(",") if m.strip())
    unknown = [m for m in methods if m not in ALL_METHODS]
    if not methods or unknown:
        what = f"; unknown: {', '.join(unknown)}" if unknown else ""
        raise ConfigError(f"{text}: after '::' give comma-separated bench methods to take from that run "
                          f"({', '.join(ALL_METHODS)}){what}")  # fmt: skip
    return Path(path), methods


def merge_bench(paths: Sequence[Path | str], out: Path, command: str = "fedbe bench-merge",
                say: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Load, check and merge finished bench runs (:func:`merge_runs`) and write them as one run to ``out``.
    A path written ``RUN::METHODS`` contributes only those methods (:func:`split_run_argument`)."""
    chosen = [split_run_argument(p) for p in paths]
    for p, _ in chosen:
        if (p if p.is_dir() else p.parent).resolve() == out.resolve():
            raise ConfigError(
                f"--out {out} is one of the runs to merge; write the merged run to a new folder"
            )
    runs = []
    for p, methods in chosen:
        settings, records = load_run(p)
        if methods:
            missing = [m for m in methods if not any(r["method"] == m for r in records)]
            if missing:
                raise ConfigError(f"{p} holds no finished {', '.join(missing)} run; it has "
                                  f"{', '.join(dict.fromkeys(r['method'] for r in records)) or 'none'}")  # fmt: skip
            records = [r for r in records if r["method"] in methods]
        runs.append((str(p), settings, records))
    settings, records = merge_runs(runs)
    if not records:
        raise ConfigError("the runs given hold no finished method runs; nothing to merge")
    base = next((r["round0"] for r in records if r.get("round0")), None)
    if base is None:
        raise ConfigError(
            "no record holds the base model's scores (round0); were these runs written by fedbe bench?"
        )
    out.mkdir(parents=True, exist_ok=True)
    with (out / "records.jsonl").open("w") as handle:
        for rec in records:
            handle.write(json.dumps(rec) + "\n")
    say(f"merged {len(records)} method run(s) from {len(runs)} run(s): methods {', '.join(settings.methods)}, "
        f"seeds {', '.join(map(str, settings.seeds))}")  # fmt: skip
    seeds_of = {m: sorted(r["seed"] for r in recs) for m, recs in by_method(records).items()}
    if len({tuple(v) for v in seeds_of.values()}) > 1:
        say("warning: the methods ran on different seeds ("
            + "; ".join(f"{m} {','.join(map(str, v))}" for m, v in seeds_of.items())
            + "): each row of the table averages its own seeds; the paired comparison uses the seeds "
            "in common")  # fmt: skip
    return write_results(records, base, settings, out, command, say)


# relative run time of a method, roughly (fedbe = 1). In runs/bench-v3 every method of the
# default bench took 0.9-1.1x fedbe's run (evaluation dominates at 16 local steps a round); the
# costlier ones are estimates from earlier runs.
METHOD_COST = {"full-ft": 3.0, "fedbe-exact": 1.5}


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
    run_bench(settings, out, command, say=lambda text: print(f"[job {job}] {text}", flush=True))


def run_bench_jobs(settings: BenchSettings, out: Path, jobs: int, command: str = "fedbe bench",
                   say: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Run the methods in ``jobs`` worker processes that share the cores evenly, then report as one run.

    Every worker builds the same world (same seed: identical shards, profiles and evaluation items)
    and measures its own step times with the same number of threads, so the emulated times stay
    comparable between methods of different workers as long as the workers run side by side. Each
    worker writes ``out/job-K/``; their records are merged into ``out/records.jsonl`` and the table
    is rendered from them (an interrupted run resumes, per worker).
    """
    import multiprocessing  # noqa: PLC0415
    import os  # noqa: PLC0415

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


# -- command line ----------------------------------------------------------------------------------
BENCH_DESCRIPTION = """Run FedBE and its baselines on the same federation, one after another, and compare them.

Every method gets identical data splits (Dirichlet label shards of the BBC News train split), device
profiles, seeds, rounds, local steps and batch size, and the same evaluation after every round:
accuracy on held-out BBC articles, and general ability on text never used for training (WordNet
definition choice, perplexity on fortunes quotations). Writes results.json, results.md,
records.jsonl and plots (accuracy_retention.png, accuracy_vs_time.png) to --out and prints the table.

On 2 CPU cores with SmolLM2-135M a method takes 10-20 minutes a seed (v12: FedBE, FedIT, FFA-LoRA and
FedIT + distillation, 63 minutes a seed with three seeds side by side), so the default eight methods
take well over an hour (not timed end to end); --jobs N and side-by-side seeds (bench-merge) shorten it.
--quick is a smoke run (3 clients, 2 rounds x 3 steps, a few evaluation items)."""


MERGE_DESCRIPTION = """Merge finished `fedbe bench` runs into one: one table, one paired comparison, one set of plots.

For seeds or methods run in separate folders (side by side, on several machines, or a run extended
later): each RUN is a bench --out folder or its results.json. Every method must have run under the
same settings in every RUN (the settings that method depends on: FedBE's own knobs do not matter for
the LoRA baselines), and a method's seed may come from one RUN only; otherwise nothing is written and
the message says which setting or seed is in the way. Settings are checked, the machine is not:
emulated times compare only between methods of one seed that ran under the same conditions.
RUN::METHODS (comma-separated) takes only those methods from RUN, for example a rerun of one
method beside the other methods of an earlier run: `new-fedbe::fedbe old::fedit,fedit-distill`.

Writes results.json, results.md, records.jsonl and the plots to --out, as `fedbe bench` does."""


def add_merge_parser(sub: Any) -> None:
    import argparse  # noqa: PLC0415

    p = sub.add_parser("bench-merge", help="merge finished bench runs (seeds run in separate folders) into one",
                       description=MERGE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "runs", nargs="+", metavar="RUN",
        help="a fedbe bench --out folder or its results.json; RUN::METHODS takes only those methods from it",
    )  # fmt: skip
    p.add_argument(
        "--out", required=True, type=Path, help="folder for the merged results (not one of the RUNs)"
    )


def add_bench_parser(sub: Any, epilog: str) -> None:
    import argparse  # noqa: PLC0415

    p = sub.add_parser(
        "bench", help="compare FedBE with federated LoRA baselines and full fine-tuning on one federation",
        description=BENCH_DESCRIPTION + "\n\nmethods:\n" + "\n".join(
            "  " + line.strip("* ") for line in __doc__.split("Methods (``--methods``):")[1].strip().splitlines()
            if line.strip()
        ).replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog,
    )  # fmt: skip
    from fedbe.console import positive_int  # noqa: PLC0415

    d = BenchSettings()
    p.add_argument("--out", required=True, type=Path, help="folder for results.json, results.md and plots")
    p.add_argument(
        "--quick", action="store_true", help="3 clients, 2 rounds, smaller evaluation, fewer methods"
    )
    p.add_argument("--model", default=d.model, help=f"model source (default {d.model})")
    p.add_argument("--methods", help=f"comma-separated methods (default: {','.join(DEFAULT_METHODS)})")
    p.add_argument(
        "--profiles", help=f"comma-separated profile names or YAML files (default: {','.join(d.profiles)})"
    )
    p.add_argument("--clients", type=int, default=d.clients, help=f"clients (default {d.clients})")
    p.add_argument("--rounds", type=int, default=d.rounds, help=f"rounds (default {d.rounds})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"local steps per round (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate of new blocks (default {d.lr})")
    p.add_argument(
        "--full-ft-lr",
        type=float,
        default=d.full_ft_lr,
        help=f"learning rate of full FT (default {d.full_ft_lr})",
    )
    p.add_argument(
        "--lora-lr", type=float, default=d.lora_lr, help=f"learning rate of LoRA (default {d.lora_lr})"
    )
    p.add_argument("--alpha", type=float, default=d.alpha, help=f"Dirichlet label skew (default {d.alpha})")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; the table reports mean ± half-range")
    p.add_argument(
        "--split",
        default="test",
        choices=["test", "validation"],
        help="evaluate on the test split (report) or the validation split (choose settings)",
    )
    lambdas = ",".join(f"{v:g}" for v in (d.distill_lambda if isinstance(d.distill_lambda, tuple)
                                           else (d.distill_lambda,)))
    p.add_argument(
        "--distill-lambda",
        default=lambdas,
        help="FedBE's self-distillation weight; a comma-separated list is a per-round schedule whose last "
        f"value holds after it (default {lambdas}: 3 in rounds 1-2, 12 from round 3 on; one number: every round)",
    )
    p.add_argument(
        "--lora-distill-lambda",
        type=float,
        default=d.lora_distill_lambda,
        help=f"self-distillation lambda of fedit-distill (default {d.lora_distill_lambda})",
    )
    p.add_argument(
        "--lora-base",
        choices=LORA_BASES,
        default=d.lora_base,
        help="how the LoRA methods hold the frozen base: 'frozen', as FedBE does (16-bit layers, a float32 "
        "residual stream), so every method starts from the same computation; 'plain', the 16-bit model as "
        f"loaded (runs before session 28) (default {d.lora_base})",
    )
    p.add_argument("--distill-top-k", type=int, default=d.distill_top_k, help=f"default {d.distill_top_k}")
    p.add_argument("--eval-examples", type=int, default=d.eval_examples, help=f"default {d.eval_examples}")
    p.add_argument(
        "--probe-questions",
        type=int,
        default=d.probe_questions,
        help=f"WordNet four-way definition questions per evaluation (default {d.probe_questions}; about 40 s "
        "per evaluation on one core of this machine for SmolLM2)",
    )
    p.add_argument(
        "--final-probe-questions",
        type=int,
        default=d.final_probe_questions,
        help="more definition questions (none of them among the --probe-questions ones), scored with those on "
        "each method's model before training and after the last round only, so the final definitions "
        "retention and the methods' question-by-question comparison rest on both sets (default "
        f"{d.final_probe_questions}; 3-6 minutes per model for SmolLM2 with three runs sharing this machine's two "
        "cores; 0 = none)",
    )
    p.add_argument(
        "--probe-texts",
        type=int,
        default=d.probe_texts,
        help="fortunes quotations the general perplexity is measured on (the split's first N in a fixed "
        f"order; about 1,700 in each split; default {d.probe_texts})",
    )
    p.add_argument(
        "--distill-sample",
        type=int,
        default=d.distill_sample,
        help="distillation positions per step, drawn at random from the batch's article and template "
        f"positions (0 = all; default {d.distill_sample})",
    )
    p.add_argument(
        "--distill-rows",
        type=int,
        default=d.distill_rows,
        help="rows of each batch whose positions are distilled, drawn at random per step (0 = all); the "
        "base forward that fills the distillation cache runs on these rows only, which is most of a "
        f"distilled step's extra cost until the cache holds the client's data (default {d.distill_rows})",
    )
    p.add_argument(
        "--deadline-factor",
        type=float,
        default=d.deadline_factor,
        help="FedBE round deadline as a multiple of the median client's time to train every new block; "
        f"below 1 slow clients get only blocks near the output (default {d.deadline_factor})",
    )
    p.add_argument(
        "--max-block-divergence",
        type=float,
        default=d.max_block_divergence,
        help="FedBE leaves a block untrained for a round when the pooled label histogram of the clients "
        "that could train it is farther than this (Jensen-Shannon, 0-1) from the federation's: a block "
        f"trained by one label-skewed client learns its labels (1 = no limit; default {d.max_block_divergence})",
    )
    p.add_argument(
        "--block-average",
        choices=BLOCK_AVERAGES,
        default=d.block_average,
        help="what FedBE averages each block over: its trainers, or every client of the round with a "
        "non-trainer counting as a zero delta (FedAvg of each client's change; a client that trains "
        f"more blocks does not outweigh the others) (default {d.block_average})",
    )
    p.add_argument(
        "--lr-decay",
        type=float,
        default=d.lr_decay,
        help=f"FedBE clients train round r at lr x this^(r-1) (default {d.lr_decay:g}; 1 = a constant lr)",
    )
    p.add_argument(
        "--lora-lr-decay",
        type=float,
        default=d.lora_lr_decay,
        help=f"LoRA clients train round r at --lora-lr x this^(r-1) (default {d.lora_lr_decay:g}; 1 = a constant lr)",
    )
    p.add_argument(
        "--server-lr",
        type=float,
        default=d.server_lr,
        help="FedBE's server step: the averaged block deltas are applied times this "
        f"(default {d.server_lr:g} = FedAvg)",
    )
    p.add_argument(
        "--label-balance",
        action=argparse.BooleanOptionalAction,
        default=d.label_balance,
        help="FedBE clients train with a label-balanced loss: at the label word, their own label "
        "frequencies are added to the label words' logits (balanced softmax), so a client holding one "
        f"label mostly does not teach the blocks that label's prior (default {'on' if d.label_balance else 'off'})",
    )
    p.add_argument(
        "--download-level",
        choices=DOWNLOAD_LEVELS,
        default=d.download_level,
        help="precision every method's clients receive the global trainable weights in (blocks, LoRA "
        "adapters, full FT's weights; FedBE's frozen context blocks at this level but never above bf16); "
        "a client's update is its change from what it received, so the server's copy stays fp32 "
        f"(default {d.download_level}; the coordinator's training.task_weights_level)",
    )
    p.add_argument(
        "--placement",
        default=d.placement,
        help="where FedBE's new blocks go: interleave (after the last layer of each of --blocks groups "
        "of base layers, LLaMA Pro; the top block right under the output head), interleave-mid-top (the "
        "same, but the top group's block after its middle layer, so base layers stay above every new "
        "block), middle (every block after its group's middle layer) or comma-separated base-layer "
        f"indices (default {d.placement})",
    )
    p.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        help="run the methods in this many worker processes that share the CPU cores (default 1); "
        "all workers use the same threads each, so emulated times stay comparable",
    )
    p.add_argument("--full-ft-budget", type=float, default=d.full_ft_budget_seconds,
                   help="skip full fine-tuning when its estimated training seconds exceed this (default "
                        f"{d.full_ft_budget_seconds:.0f})")  # fmt: skip


def settings_from_args(args: Any) -> BenchSettings:
    def csv(text: str) -> tuple[str, ...]:
        return tuple(x.strip() for x in text.split(",") if x.strip())

    try:
        seeds = tuple(int(x) for x in csv(args.seeds))
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated whole numbers, got {args.seeds!r}") from None
    d = BenchSettings()
    settings = BenchSettings(
        model=args.model, methods=csv(args.methods) if args.methods else d.methods,
        profiles=csv(args.profiles) if args.profiles else d.profiles, clients=args.clients, rounds=args.rounds,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, lora_lr=args.lora_lr, alpha=args.alpha,
        full_ft_lr=args.full_ft_lr,
        seeds=seeds or (0,), split=args.split, distill_lambda=parse_schedule(args.distill_lambda, "--distill-lambda"),
        lora_distill_lambda=args.lora_distill_lambda, lora_base=args.lora_base,
        distill_top_k=args.distill_top_k, distill_sample=args.distill_sample, distill_rows=args.distill_rows,
        deadline_factor=args.deadline_factor, max_block_divergence=args.max_block_divergence,
        label_balance=args.label_balance, block_average=args.block_average,
        server_lr=args.server_lr,
        lr_decay=args.lr_decay, lora_lr_decay=args.lora_lr_decay,
        download_level=args.download_level, placement=args.placement,
        eval_examples=args.eval_examples,
        probe_questions=args.probe_questions, final_probe_questions=args.final_probe_questions,
        probe_texts=args.probe_texts, full_ft_budget_seconds=args.full_ft_budget,
    )  # fmt: skip
    if args.quick:
        settings = quick(settings, methods_given=bool(args.methods))
    for name in settings.profiles:
        resolve_profile(name)
    return settings
