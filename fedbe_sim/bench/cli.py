"""``fedbe bench`` and ``fedbe bench-merge`` on the command line: their parsers and the settings the
flags give."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coordinator.aggregation import BLOCK_AVERAGES
from fedbe.device_profile import resolve_profile
from fedbe.errors import ConfigError
from fedbe.recipe import parse_schedule
from fedbe_sim.bench.settings import DEFAULT_METHODS, DOWNLOAD_LEVELS, LORA_BASES, BenchSettings, quick

BENCH_DESCRIPTION = """Run FedBE and its baselines on the same federation, one after another, and compare them.

Every method gets identical data splits (Dirichlet label shards of the BBC News train split), device
profiles, seeds, rounds, local steps and batch size, and the same evaluation after every round:
accuracy on held-out BBC articles, and general ability on text never used for training (WordNet
definition choice, perplexity on fortunes quotations). Writes results.json, results.md,
records.jsonl and plots (accuracy_retention.png, accuracy_vs_time.png) to --out and prints the table.

On 2 CPU cores with SmolLM2-135M a method takes 10-20 minutes a seed (FedBE, FedIT, FFA-LoRA and
FedIT + distillation: 63 minutes a seed with three seeds side by side), so the default eight methods
take well over an hour (not timed end to end); --jobs N and side-by-side seeds (bench-merge) shorten it.
--quick is a smoke run (3 clients, 2 rounds x 3 steps, a few evaluation items)."""


# what --help says of each method (METHODS), in the order it explains them
METHODS_HELP = """  fedbe: new blocks (lr 2e-3 in round 1, halved every round), the coordinator's allocation with a
  deadline of 0.6 x the median client's all-blocks time, self-distillation (lambda 3, 3, then 12;
  cached top-32 of the base, 128 positions of one row a step), the label-balanced loss, each block
  averaged over the round (a client that did not train it counting as a zero change); a client runs
  every new block, the ones it does not train frozen; every method's clients receive the global
  weights as int8 (--download-level)
  fedbe-plain: the same without self-distillation (ablation)
  fedbe-exact: self-distillation with the exact KL and no cache (cost ablation)
  fedbe-interleave: fedbe with its blocks interleaved (LLaMA Pro) whatever --placement says
  pos-bottom / pos-middle / pos-top: one new block at that depth, plain CE (where forgetting happens)
  fedbe-random / fedbe-all: random allocation / every client trains all blocks it can hold
  fedit: FedAvg of LoRA adapters (PEFT, r=16 on every linear layer of the base; the same lr schedule)
  fedit-distill: FedIT with the same self-distillation as fedbe (adapters disabled = base)
  ffa-lora: LoRA with A frozen at its random init, only B trained and averaged
  full-ft: FedAvg of every weight; skipped (and said so) when its estimated time exceeds the budget
  FedBE's round is :func:`coordinator.round.plan_round` and :func:`coordinator.round.close_round`, the
  functions the coordinator daemon runs; the methods above are settings of it."""


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
        description=BENCH_DESCRIPTION + "\n\nmethods:\n" + METHODS_HELP,
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
        f"loaded, whose untrained model rounds differently from FedBE's (default {d.lora_base})",
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
    p.add_argument(
        "--dp-noise-multiplier",
        type=float,
        default=d.dp_noise_multiplier,
        help="client-level differential privacy of the new-block methods' updates (DP-FedAvg, the "
        "coordinator's privacy: section): the Gaussian noise on each block's sum of clipped updates has "
        "standard deviation this x --dp-clip-norm; epsilon is recorded each round and reported "
        "(default: DP off)",
    )
    p.add_argument(
        "--dp-clip-norm",
        type=float,
        default=d.dp_clip_norm,
        help="with --dp-noise-multiplier: each client's update is clipped to this L2 norm over all its blocks "
        f"(default {d.dp_clip_norm:g}: the median update norm of the default fedbe run)",
    )
    p.add_argument(
        "--dp-delta",
        type=float,
        default=d.dp_delta,
        help=f"the delta epsilon is reported at (default {d.dp_delta:g})",
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
        dp_noise_multiplier=args.dp_noise_multiplier, dp_clip_norm=args.dp_clip_norm, dp_delta=args.dp_delta,
    )  # fmt: skip
    if args.quick:
        settings = quick(settings, methods_given=bool(args.methods))
    for name in settings.profiles:
        resolve_profile(name)
    return settings
