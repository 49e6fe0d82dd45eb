"""What one local training step costs, per mechanism: FedBE's block configurations against FedIT-LoRA.

Builds the ``fedbe bench`` federation (same model, seed, shards and defaults), takes one client's
round-1 batches and times ``steps`` optimiser steps of each configuration on this machine:

- FedBE with the given new blocks trained: plain cross-entropy; self-distilled with every row
  of the batch distilled (``distill_rows 0``) and with ``--rows`` rows, each for a first pass over
  the batches while the base cache fills (the base forward runs) and a second pass over the same
  batches (every row cached with ``distill_rows 0``; with fewer rows the second pass draws other
  rows, some of them not yet cached, so it still runs a few base forwards: they are printed);
- FedIT-LoRA plain, and FedIT-LoRA self-distilled with ``--rows`` rows (as ``fedbe bench``'s
  fedit-distill), first and second pass.

It prints the median step time of each and its ratio to plain FedIT-LoRA's, measured in this
one run: the README's step costs per mechanism (what a one-block FedBE client's step costs against
FedIT's, and what ``distill_rows`` saves; "Retention mechanisms", ``distill_rows``). Use ``--threads 1`` to match a
``fedbe bench --jobs 2`` worker.

Run: ``.venv/bin/python benchmarks/step_cost.py --client 2 --blocks 4 [--blocks 3,4,5]
[--rows 1] [--steps 4] [--threads 1]`` (about 6 minutes with two block sets here, 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

import torch

from edge_client.loss import BaseCache
from edge_client.trainer import TrainResult, train_blocks, train_parameters
from fedbe.console import positive_int
from fedbe.recipe import Recipe
from fedbe_sim import bench

# a distilled configuration runs twice over the same batches: while the base cache fills, then again
PASSES = ("first pass (cache fills)", "second pass")


def block_list(text: str) -> tuple[int, ...]:
    """``"3,4,5"`` -> (3, 4, 5), with a clear error for anything else."""
    try:
        ids = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--blocks takes comma-separated new-block indices such as 4 or 3,4,5, not {text!r}"
        ) from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"--blocks indices must be 0 or more, got {text!r}")
    return ids


def median_step(result: TrainResult) -> float:
    # the first step also pays one-off warm-up (allocations, optimizer state): report the median
    return statistics.median(result.step_seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model source (default smollm2-135m)")
    parser.add_argument("--seed", type=int, default=0, help="the bench seed (shards); default 0")
    parser.add_argument("--client", type=int, default=2,
                        help="whose round-1 batches to train on (default 2, the Orin Nano's)")  # fmt: skip
    parser.add_argument("--blocks", type=block_list, action="append",
                        help="new blocks FedBE trains, e.g. 4 or 3,4,5; repeat for more sets (default 4)")  # fmt: skip
    parser.add_argument("--rows", type=positive_int, default=1,
                        help="distill_rows of the sampled-rows configuration (default 1)")  # fmt: skip
    parser.add_argument("--steps", type=positive_int, default=4, help="steps per configuration (default 4)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads (default: torch's own choice)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = bench.BenchSettings(model=args.model, split="validation", seeds=(args.seed,),
                                   methods=("fedbe", "fedit"))  # fmt: skip
    federation = bench.build_federation(settings, args.seed, print)
    if not 0 <= args.client < len(federation.clients):
        parser.error(
            f"--client must be 0-{len(federation.clients) - 1} "
            f"(the bench has {len(federation.clients)} clients)"
        )
    batches = federation.clients[args.client].batches_for(1)
    rows: list[tuple[str, float]] = []

    def record(label: str, result: TrainResult) -> None:
        rows.append((label, median_step(result)))
        print(f"  {label}: steps {[round(s, 2) for s in result.step_seconds]} s, "
              f"base forwards {result.base_forwards}", flush=True)  # fmt: skip

    lora = bench.LoraMethod("fedit", federation)
    params = lora._params()
    config = replace(lora.config, steps=args.steps)

    def trainable() -> list[torch.nn.Parameter]:
        for p in params:  # train_parameters freezes the model when it returns
            p.requires_grad_(True)
        return params

    record("fedit, plain CE", train_parameters(lora.model, trainable(), batches, config))
    distilled = replace(config, distill_lambda=settings.lora_distill_lambda, distill_rows=args.rows)
    cache = BaseCache(distilled.distill_top_k)
    for phase in PASSES:
        record(f"fedit-distill, distilled {args.rows} row(s), {phase}", train_parameters(
            lora.model, trainable(), batches, distilled, base=lora.model.disable_adapter, base_cache=cache
        ))  # fmt: skip
    del lora, config, distilled  # free the LoRA model before the expanded one is built

    blocks = bench.BlockMethod("fedbe", federation)
    known = blocks.registry.block_ids
    base_config: Recipe = replace(blocks.policy.recipe, steps=args.steps)
    for ids in args.blocks or [(4,)]:
        if not set(ids) <= set(known):
            parser.error(f"--blocks {ids}: the expanded model's new blocks are {list(known)}")
        name = ",".join(map(str, ids))
        plain = replace(base_config, distill_lambda=0.0)
        record(
            f"fedbe blocks {name}, plain CE", train_blocks(blocks.model, blocks.registry, ids, batches, plain)
        )
        for distill_rows in (0, args.rows):
            cfg = replace(base_config, distill_rows=distill_rows)
            cache = BaseCache(cfg.distill_top_k)
            which = "every row" if distill_rows == 0 else f"{distill_rows} row(s)"
            for phase in PASSES:
                record(f"fedbe blocks {name}, distilled {which}, {phase}",
                       train_blocks(blocks.model, blocks.registry, ids, batches, cfg, base_cache=cache))  # fmt: skip

    reference = rows[0][1]
    width = max(len(label) for label, _ in rows)
    print(
        f"\nmedian s/step over {args.steps} steps, threads {torch.get_num_threads()}, client {args.client}:"
    )
    for label, seconds in rows:
        print(f"  {label:<{width}}  {seconds:6.3f} s  {seconds / reference:4.2f}x fedit")


if __name__ == "__main__":
    main()
