"""The same base weights through each bench method's arithmetic: how far apart are the untrained models?

``fedbe bench`` measures retention against each method's own untrained model (round 0). FedBE's is
the expanded model over the frozen base of :func:`fedbe.quantization.freeze_base` (16-bit layers
whose outputs join a float32 residual stream, new blocks adding exact zeros); the LoRA methods'
is the plain 16-bit model with PEFT adapters whose B is 0. Both hold the same pretrained weights.
This script scores four untrained models on the same probe questions and quotations, built exactly
as the bench builds them: the plain 16-bit model, the LoRA methods' on each ``--lora-base`` (the
plain model, as in earlier runs, or FedBE's frozen base, the default) and FedBE's, and
prints how many definition answers differ between each pair and the largest difference in any
token's log-probability. ``docs/research.md`` uses it to say how
large a difference between two methods the definition probe can resolve at all.

Run: ``.venv/bin/python benchmarks/base_arithmetic.py [--questions 400] [--split test]`` (about
5 minutes here for 400 questions, 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import torch

from fedbe import general_ability, sources
from fedbe.console import positive_int
from fedbe_sim import bench


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--questions", type=positive_int, default=400, help="definition questions (default 400)"
    )
    parser.add_argument("--texts", type=positive_int, default=24, help="quotations for the log-probabilities")
    parser.add_argument("--split", default="test", choices=general_ability.SPLITS, help="probe split (default test)")
    parser.add_argument("--seed", type=int, default=0, help="which questions (the bench seed; default 0)")
    args = parser.parse_args(argv)
    settings = bench.BenchSettings(split=args.split, seeds=(args.seed,), methods=("fedbe", "fedit"))
    federation = bench.build_federation(settings, args.seed, print)
    bench.measure_capacities(federation, print)
    tokenizer = federation.tokenizer
    questions = general_ability.definition_questions(args.questions, args.split, seed=args.seed)
    texts = general_ability.general_texts(args.texts, args.split)

    def score(name: str, model: Any) -> tuple[list[bool], torch.Tensor]:
        model.eval()
        with torch.no_grad():
            answers = general_ability.definition_answers(model, tokenizer, questions)
            ids = tokenizer(texts, return_tensors="pt", padding=True)
            logits = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
        logp = torch.log_softmax(logits.float(), dim=-1).masked_fill(
            ~ids["attention_mask"].bool()[..., None], 0.0
        )
        print(f"{name}: {sum(answers)} of {len(answers)} definitions right, perplexity "
              f"{general_ability.perplexity(model, tokenizer, texts):.3f}", flush=True)  # fmt: skip
        return answers, logp

    plain = sources.load_model(federation.source)
    plain.requires_grad_(False)
    bench.cast_plain_base(plain, settings.precision)
    scored = {"plain": score(f"plain {settings.precision} model", plain)}
    plain_lora = dataclasses.replace(federation, settings=dataclasses.replace(settings, lora_base="plain"))
    scored["fedit-plain"] = score(
        "fedit, --lora-base plain (PEFT, B = 0)", bench.make_method("fedit", plain_lora).eval_model()
    )
    scored["fedit"] = score(
        "fedit, --lora-base frozen (PEFT, B = 0)", bench.make_method("fedit", federation).eval_model()
    )
    scored["fedbe"] = score(
        "fedbe (expanded, frozen base)", bench.make_method("fedbe", federation).eval_model()
    )
    for a, b in (("plain", "fedit-plain"), ("plain", "fedbe"), ("fedit-plain", "fedbe"), ("fedit", "fedbe")):
        differ = sum(x != y for x, y in zip(scored[a][0], scored[b][0], strict=True))
        gap = float((scored[a][1] - scored[b][1]).abs().max())
        print(f"{a} against {b}: {differ} of {len(questions)} definition answers differ; largest "
              f"|log p| difference over the quotations' tokens {gap:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
