"""What each bench method is, as data: :data:`METHODS` maps a method's name to its :class:`MethodSpec`.

The method classes (:mod:`fedbe_sim.bench.methods`) and the settings read a method's spec, never its
name, and the lists of method names (:data:`fedbe_sim.bench.settings.ALL_METHODS`, ...) are drawn from
this table. It imports nothing of the bench, so every other module of it can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class MethodSpec:
    """One bench method.

    ``family`` picks the class that runs it: ``block`` trains new blocks through the coordinator's
    round (:class:`~fedbe_sim.bench.methods.BlockMethod`), ``lora`` LoRA adapters on the frozen base,
    ``full`` every weight.
    """

    family: Literal["block", "lora", "full"]
    # self-distillation against the base: a block method with BenchSettings.distill_lambda, a LoRA
    # method with lora_distill_lambda (adapters disabled = the base)
    distill: bool = False
    # distil with the exact KL over the whole vocabulary and no cache of the base's top-k (a cost ablation)
    exact_kl: bool = False
    # the coordinator's allocation strategy (coordinator.allocation.AllocationPolicy.strategy)
    strategy: Literal["fedbe", "random", "all"] = "fedbe"
    # the round deadline (BenchSettings.deadline_factor) applies; without it every client trains
    # every block it can hold
    deadline: bool = True
    # train with the label-balanced loss when BenchSettings.label_balance is on
    label_balance: bool = False
    # where the new blocks go whatever BenchSettings.placement says (None: that setting)
    placement: str | None = None
    # one new block at this depth of the base instead of BenchSettings.blocks placed blocks (None: those)
    position: Literal["bottom", "middle", "top"] | None = None
    # LoRA with A frozen at its random init: only the B matrices are trained and averaged (FFA-LoRA)
    lora_b_only: bool = False
    # in the default method list / in --quick's
    default: bool = False
    quick: bool = False
    # rough run time relative to fedbe's, for spreading methods over --jobs workers
    cost: float = 1.0


# In this order: the order of --methods' choices and of every list drawn from the table. Costs: every
# method of the default bench took 0.9-1.1x fedbe's run (evaluation dominates at 16 local steps a
# round); full-ft's and fedbe-exact's are estimates.
METHODS: dict[str, MethodSpec] = {
    # FedBE: the coordinator's allocation under the deadline, self-distillation, the label-balanced loss
    "fedbe": MethodSpec("block", distill=True, label_balance=True, default=True, quick=True),
    "fedbe-plain": MethodSpec("block", label_balance=True, default=True),  # without distillation
    "fedbe-exact": MethodSpec("block", distill=True, exact_kl=True, label_balance=True, cost=1.5),
    "fedbe-interleave": MethodSpec("block", distill=True, label_balance=True, placement="interleave"),
    "fedbe-random": MethodSpec("block", distill=True, strategy="random", label_balance=True, default=True,
                               quick=True),  # fmt: skip
    "fedbe-all": MethodSpec("block", distill=True, strategy="all", label_balance=True, default=True),
    "fedit": MethodSpec("lora", default=True, quick=True),
    "fedit-distill": MethodSpec("lora", distill=True, default=True),
    "ffa-lora": MethodSpec("lora", lora_b_only=True, default=True, quick=True),
    "full-ft": MethodSpec("full", default=True, quick=True, cost=3.0),
    # one new block at a depth, for every client, plain cross-entropy: where forgetting happens
    "pos-bottom": MethodSpec("block", strategy="all", deadline=False, position="bottom"),
    "pos-middle": MethodSpec("block", strategy="all", deadline=False, position="middle"),
    "pos-top": MethodSpec("block", strategy="all", deadline=False, position="top"),
}
