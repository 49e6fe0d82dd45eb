"""Which new block costs general ability: a FedBE run's global model with each block bypassed, and scaled back.

Runs one ``fedbe bench`` FedBE method for its rounds (same federation, splits and defaults as the bench),
then scores the final global model (BBC accuracy, definition choice, quotation perplexity and their
retention against the untrained model, as the bench does) three ways:

* as trained;
* with each new block bypassed in turn (the others kept): what that block adds to accuracy and
  what it costs in perplexity;
* with every block interpolated toward the identity it started as, ``W0 + s (W - W0)`` for each
  ``--scales`` value (``s = 0`` is exactly the base; weight-space interpolation as in WiSE-FT).

``docs/research.md`` used it to see whether the
perplexity FedBE loses sits in one block or can be bought back by scaling the blocks down.

Run: ``.venv/bin/python benchmarks/block_diagnosis.py --seed 0 [--split validation]
[--scales 0.9,0.8,0.7,0.5] [--out runs/block-diag-s0.json]`` (about 10 minutes for the 4 rounds
and 1-2 minutes per scored model here, one thread).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch

from fedbe.blocks import set_block_state
from fedbe.console import positive_int
from fedbe.expansion import bypassed
from fedbe_sim import bench


def scales_arg(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scales must be comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"--scales must be numbers in [0, 1], got {text!r}")
    return values


def interpolate(initial: Any, final: Any, scale: float) -> Any:
    """``initial + scale * (final - initial)`` for every parameter of every block."""
    return {b: {n: initial[b][n] + scale * (final[b][n] - initial[b][n]) for n in final[b]} for b in final}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.add_diagnosis_arguments(parser, bench.BLOCK_METHODS)
    parser.add_argument(
        "--rounds", type=positive_int, default=None, help="rounds to run (default: the bench's)"
    )
    parser.add_argument("--scales", type=scales_arg, default=(0.9, 0.8, 0.7, 0.5),
                        help="interpolation factors toward the identity, comma-separated in [0, 1] "
                        "(default 0.9,0.8,0.7,0.5)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="also write the scores to this JSON file")
    args = parser.parse_args(argv)
    overrides = {"rounds": args.rounds} if args.rounds else {}
    settings, federation, method = bench.diagnosis_run(args, **overrides)
    initial = copy.deepcopy(method.global_state)
    with torch.no_grad():
        before = bench.evaluate(federation, method.eval_model())
    for round_ in range(1, settings.rounds + 1):
        results = method.round(round_)
        print(f"round {round_}: " + ", ".join(f"{r.client_id} blocks {list(r.blocks)}" for r in results)
              + (f"; withdrawn {sorted(method.withdrawn)}" if method.withdrawn else ""), flush=True)  # fmt: skip
    final = method.global_state  # nothing changes it from here on (the scores copy weights into the model)
    model = method.eval_model()
    scores: dict[str, dict[str, float]] = {}

    def score(label: str) -> None:
        s = bench.evaluate_against(federation, model, before)
        del s["definition_answers"]  # the counts against `before` stay
        scores[label] = s
        print(f"{label:>22}: accuracy {s['accuracy']:.2f}, definitions {s['definition_accuracy']:.2f} "
              f"(-{s['definitions_lost']} +{s['definitions_gained']} questions), "
              f"perplexity {s['perplexity']:.2f} (retention {s['perplexity_retention']:.4f})", flush=True)  # fmt: skip

    score("as trained")
    for block in method.registry.block_ids:
        with bypassed(model, method.registry, [block]):
            score(f"without block {block}")
    for scale in args.scales:
        set_block_state(model, method.registry, interpolate(initial, final, scale))
        score(f"blocks scaled to {scale:g}")
    method.eval_model()  # the trained blocks back in place
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"before": before, "scores": scores}, indent=1))
    return scores


if __name__ == "__main__":
    main()
