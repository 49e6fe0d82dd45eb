"""The bench's settings: the lists of method names, :class:`BenchSettings`, ``--quick`` and placement.

Why each default is what it is: docs/research.md, "How each default was chosen".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from coordinator.aggregation import BLOCK_AVERAGES
from fedbe.errors import ConfigError, ExpansionError
from fedbe_sim.bench.method_table import METHODS

if TYPE_CHECKING:
    from coordinator.privacy import PrivacyPolicy

DEFAULT_PROFILES = ("rtx-4090-24gb", "cpu-laptop", "jetson-orin-nano-8gb", "jetson-xavier-nx")
# FedBE and its ablations: new blocks at BenchSettings.placement
BLOCK_METHODS = tuple(m for m, s in METHODS.items() if s.family == "block" and s.position is None)
POSITION_METHODS = tuple(m for m, s in METHODS.items() if s.position is not None)  # one block at a depth
LORA_BASES = ("frozen", "plain")  # BenchSettings.lora_base
LORA_METHODS = tuple(m for m, s in METHODS.items() if s.family == "lora")
NEW_BLOCK_METHODS = BLOCK_METHODS + POSITION_METHODS  # the methods BlockMethod runs (they train new blocks)
ALL_METHODS = tuple(METHODS)
DEFAULT_METHODS = tuple(m for m, s in METHODS.items() if s.default)
QUICK_METHODS = tuple(m for m, s in METHODS.items() if s.quick)  # --quick's, unless --methods says
DOWNLOAD_LEVELS = ("fp32", "bf16", "fp16", "int8")
# the first quotations of the perplexity probe, the whole probe of the earliest runs: reported beside
# the larger one (the same first texts), so those runs stay comparable
PROBE_HEAD = 48


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
    # FedBE's lr in round 1, x lr_decay every round after (2e-3, 1e-3, 5e-4, 2.5e-4): a constant 1e-3
    # kept moving the blocks once clients trained on fresh articles every round (docs/research.md)
    lr: float = 2e-3
    lora_lr: float = 2e-3  # the LoRA methods', with lora_lr_decay: the same schedule, chosen the same way
    full_ft_lr: float = 3e-4
    lora_rank: int = 16
    blocks: int = 6
    # where FedBE's new blocks go (fedbe.expansion.plan_expansion): interleave (LLaMA Pro: after the
    # last layer of each group, the top block right under the output head), interleave-mid-top (the
    # top group's block after its middle layer instead), middle (every block there) or base-layer
    # indices. interleave-mid-top: the block right under the head forgets most, and moving it down
    # kept perplexity retention 0.9985 on --split validation against interleave's 0.995
    placement: str = "interleave-mid-top"
    alpha: float = 0.5
    seeds: tuple[int, ...] = (0,)
    examples_per_client: int = 48
    eval_examples: int = 100
    # WordNet definition questions: at 100, one changed answer moved retention by 0.017, too coarse to
    # say whether a method lost or gained on the probe; the per-question answers are recorded, so lost
    # and gained questions are counted too
    probe_questions: int = 400
    # more definition questions (disjoint from those), scored on each method's model before training and
    # after the last round only, together with the per-round ones: 400 a seed could not say whether
    # FedBE and FedIT + distillation differ on the probe; 0 = none
    final_probe_questions: int = 1600
    # quotations for the perplexity probe (about 6,000 tokens): 48 could not resolve the retention
    # differences the goal compares (about 0.003); the first PROBE_HEAD of them are scored apart too
    probe_texts: int = 192
    split: str = "test"  # "validation": choose settings here, never on test
    # FedBE's self-distillation weight; a tuple is a per-round schedule (rounds 1, 2, ...; its last
    # value holds after it; fedbe.recipe.Recipe.distill_lambda_in_round). 3 while the blocks learn (rounds 1-2),
    # 12 after: strong distillation pays once the blocks have learned (docs/research.md)
    distill_lambda: float | tuple[float, ...] = (3.0, 3.0, 12.0)
    lora_distill_lambda: float = 3.0  # fedit-distill's own lambda, chosen on --split validation
    distill_top_k: int = 32
    # distillation positions per step (0 = all), for every distilling method; chosen on --split
    # validation (0 / 64 / 128: 128 keeps the retention of all positions at half the step cost)
    distill_sample: int = 128
    # rows of each batch distilled per step (0 = all): the base forward that fills the cache runs
    # on these rows only, for every distilling method; one row: a third cheaper step at about the
    # same retention on --split validation
    distill_rows: int = 1
    # FedBE's round deadline: this x the median client's time to train every new block (1.0: the
    # median client trains all it holds; lower: slow clients get only blocks near the output);
    # chosen on --split validation (1.0 / 0.6 / 0.4)
    deadline_factor: float = 0.6
    # FedBE leaves a block untrained for a round when its trainers' pooled labels are farther than
    # this (Jensen-Shannon, 0-1) from the federation's (1.0 = no limit). With the label-balanced loss
    # no bound won on --split validation (docs/research.md, "Label skew")
    max_block_divergence: float = 1.0
    # balanced softmax over the label words with each client's own label frequencies, offsets relative
    # to the uniform label mix (FedBE methods); on --split validation final accuracy 0.960 / 0.863
    # against 0.940 / 0.843 at alpha 0.5 / 0.1, at the same perplexity retention
    label_balance: bool = True
    # what a block's aggregate averages over: "trainers" (its trainers) or "round" (every client of
    # the round, a non-trainer counting as a zero delta, so each client's change enters with its data
    # share however many blocks it trains); see coordinator.aggregation. "round" reached the target
    # in fewer rounds on --split validation at the same final accuracy
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
    # model is the same computation; "plain": the 16-bit model as loaded (the earlier runs; its
    # untrained model rounds differently from FedBE's: benchmarks/base_arithmetic.py)
    lora_base: str = "frozen"
    # client-level DP of the new-block methods' updates (coordinator.privacy, through close_round):
    # None = off. Each client's update is clipped to dp_clip_norm (L2 over all its blocks); 5.0 is the
    # median update norm of the default fedbe run (--split test, seed 0: 16 updates, 1.1 to 16.7, the
    # norms shrinking with the lr), so about half the updates are clipped. The noise is drawn from a
    # generator seeded from the seed (a simulation: reproducible, not unpredictable as the daemon's is)
    dp_noise_multiplier: float | None = None
    dp_clip_norm: float = 5.0
    dp_delta: float = 1e-5

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
        if self.dp_noise_multiplier is not None:
            from coordinator.privacy import PrivacyError  # noqa: PLC0415

            try:
                self.privacy()
            except PrivacyError as e:
                raise ConfigError(f"--dp-*: {e}") from None

    def privacy(self) -> PrivacyPolicy | None:
        """The DP policy the new-block methods' rounds run under (None: DP off)."""
        if self.dp_noise_multiplier is None:
            return None
        from coordinator.privacy import PrivacyPolicy  # noqa: PLC0415

        return PrivacyPolicy(self.dp_noise_multiplier, self.dp_clip_norm, self.dp_delta)


def quick(settings: BenchSettings, methods_given: bool = False) -> BenchSettings:
    """The ``--quick`` variant: fewer methods (unless given), rounds and evaluation items."""
    return replace(
        settings, methods=settings.methods if methods_given else QUICK_METHODS,
        clients=3, rounds=2, steps=3, examples_per_client=24, eval_examples=40, probe_questions=40,
        final_probe_questions=0, probe_texts=24, profiles=settings.profiles[:3],
        full_ft_budget_seconds=min(settings.full_ft_budget_seconds, 120.0),
    )  # fmt: skip


def method_placement(settings: BenchSettings, method: str) -> str | None:
    """The placement ``method`` expands the model with (None: it adds no placed blocks: a LoRA or full
    fine-tuning method, a position method, or a name not in the table)."""
    spec = METHODS.get(method)
    if spec is None or spec.family != "block" or spec.position is not None:
        return None
    return spec.placement or settings.placement
