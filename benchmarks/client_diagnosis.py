"""Which client decides the global model: every client's model right after its local training, and the average.

Runs the first rounds of one ``fedbe bench`` method (same federation, splits and defaults as the bench)
and, after each client's local training, scores that client's model on the evaluation articles;
after the round's aggregation it scores the global model. For each it prints the accuracy and how
often each label is predicted, so a global model dragged toward one client's labels shows up.
This is how ``docs/validation-sweep.md`` found that per-trainer block averaging lets the client
that trains the most blocks decide FedBE's round 1.

Run: ``.venv/bin/python benchmarks/client_diagnosis.py --seed 0 --method fedbe [--rounds 2]
[--split validation] [--block-average round]`` (about 5 minutes a round here, 2 cores).
"""

from __future__ import annotations

import argparse
import collections
from typing import Any

import torch

import edge_client.trainer as trainer
from coordinator.aggregation import BLOCK_AVERAGES
from fedbe.console import positive_int
from fedbe.evaluation import label_log_likelihoods
from fedbe_sim import bench


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.add_diagnosis_arguments(parser, bench.BLOCK_METHODS + bench.LORA_METHODS)
    parser.add_argument("--rounds", type=positive_int, default=2, help="rounds to run (default 2)")
    parser.add_argument("--block-average", choices=BLOCK_AVERAGES, default=None,
                        help="override the bench's block averaging")  # fmt: skip
    args = parser.parse_args(argv)
    overrides = {"block_average": args.block_average} if args.block_average else {}
    settings, federation, method = bench.diagnosis_run(args, **overrides)

    def score(model: Any) -> str:
        with torch.no_grad():
            scores = label_log_likelihoods(
                model, federation.tokenizer, federation.eval_examples, federation.labels, settings.max_tokens
            )
        predicted = scores.argmax(1).tolist()
        truth = [federation.labels.index(e.label) for e in federation.eval_examples]
        accuracy = sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)
        counts = collections.Counter(federation.labels[p] for p in predicted)
        return f"accuracy {accuracy:.2f}, predicts {dict(counts.most_common())}"

    # the bench imports the trainer function at call time, so wrapping the module attribute reaches
    # every client (only the method's own entry point: train_blocks itself calls train_parameters)
    name = "train_blocks" if args.method in bench.BLOCK_METHODS else "train_parameters"
    original = getattr(trainer, name)

    def wrapped(model: Any, *rest: Any, **kw: Any) -> Any:
        result = original(model, *rest, **kw)
        print(f"    a client's local model: {score(model)}, mean loss {result.mean_loss:.3f}", flush=True)
        return result

    setattr(trainer, name, wrapped)
    try:
        print("evaluation labels:", dict(collections.Counter(e.label for e in federation.eval_examples)))
        for round_ in range(1, args.rounds + 1):
            results = method.round(round_)
            print(f"round {round_}: " + ", ".join(f"{r.client_id} blocks {list(r.blocks)}" for r in results))
            print(f"  global model: {score(method.eval_model())}", flush=True)
    finally:  # whoever called main() in this process trains with the real function again
        setattr(trainer, name, original)


if __name__ == "__main__":
    main()
