"""Wire cost of one expanded block: bytes, speed and error for each level x body compression.

Builds one real ``LlamaDecoderLayer`` of SmolLM2-135M's shape (hidden 576, intermediate 1536,
9 heads, 3 KV heads: 3.54M parameters, 14.2 MB in fp32) and measures two payloads:

* ``delta``: what a client returns after a round, modelled as ``1e-3 * randn`` per parameter
  (the order of magnitude of a few AdamW steps at lr 1e-4..1e-3; gaussian, so it has no
  redundancy for zlib/zstd to find, which is the pessimistic case for the body compression);
* ``weights``: the block itself, as a coordinator would send it, initialised like the model
  (normal, std = ``initializer_range`` = 0.02; norm weights 1.0).

Every row is measured in the same run: ``encode`` is compress_state + encode, ``decode`` is
decode (with the layout check) + decompress_state; speeds are MB of fp32 payload per second,
the median of ``--repeats`` runs, interleaved across rows. Error is ``||decoded - original|| / ||original||``.

Run: ``.venv/bin/python benchmarks/codec_bench.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from fedbe.compression import BlockState, Level, compress_state, decompress_state, layout_of
from fedbe.protocol import BodyCompression, UpdateMessage, decode, encode

BLOCK_ID = 30  # the first block appended after SmolLM2's 30 layers


def smollm2_block(seed: int) -> dict[str, torch.Tensor]:
    """The parameters of one decoder layer of SmolLM2-135M's shape, with realistic random weights."""
    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        num_hidden_layers=1,
        vocab_size=49152,
    )
    layer = LlamaDecoderLayer(config, layer_idx=0)
    g = torch.Generator().manual_seed(seed)
    params: dict[str, torch.Tensor] = {}
    for name, p in layer.named_parameters():
        if p.ndim >= 2:
            params[name] = torch.randn(p.shape, generator=g) * config.initializer_range
        else:
            params[name] = torch.ones(p.shape)
    return params


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _relative_error(decoded: BlockState, original: BlockState) -> float:
    diff = sum(float((decoded[b][n] - t).norm() ** 2) for b, p in original.items() for n, t in p.items())
    norm = sum(float(t.norm() ** 2) for p in original.values() for t in p.values())
    return (diff / norm) ** 0.5


@dataclass
class Cell:
    """One row of the table: a payload sent at one level with one body compression."""

    payload_name: str
    payload: BlockState
    level: Level
    compression: BodyCompression
    frame: bytes = b""
    encode_times: list[float] = field(default_factory=list)
    decode_times: list[float] = field(default_factory=list)

    def encode_once(self) -> bytes:
        blocks, _ = compress_state(self.payload, self.level)
        msg = UpdateMessage(
            round=1,
            client_id="bench-client",
            task_id="bench-task",
            level=self.level,
            blocks=blocks,
            num_samples=256,
            num_steps=8,
            mean_loss=2.5,
            wall_seconds=60.0,
            peak_memory_bytes=1 << 30,
        )
        return encode(msg, compression=self.compression)

    def decode_once(self) -> BlockState:
        msg = decode(self.frame, expected_type=UpdateMessage, expected_layout=layout_of(self.payload))
        return decompress_state(msg.blocks)


def run(cells: list[Cell], repeats: int) -> None:
    """Time every cell, interleaved: repeat r of every cell runs before repeat r + 1 of any,
    so a load change on the machine affects all rows alike rather than a few."""
    for cell in cells:
        cell.frame = cell.encode_once()  # also the warm-up
        cell.decode_once()
    for _ in range(repeats):
        for cell in cells:
            cell.encode_times.append(_seconds(cell.encode_once))
            cell.decode_times.append(_seconds(cell.decode_once))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per cell; the median is shown")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and delta")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    weights = smollm2_block(args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    delta = {name: 1e-3 * torch.randn(t.shape, generator=g) for name, t in weights.items()}
    numel = sum(t.numel() for t in weights.values())
    fp32_mb = numel * 4 / 1e6
    cells = [
        Cell(name, {BLOCK_ID: params}, level, compression)
        for name, params in (("delta", delta), ("weights", weights))
        for level in Level
        for compression in BodyCompression
    ]
    load_before = os.getloadavg()[0]
    run(cells, args.repeats)
    load_after = os.getloadavg()[0]

    print(
        f"# codec benchmark: one SmolLM2-135M-shaped decoder block, {numel:,} parameters ({fp32_mb:.1f} MB)"
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"{platform.machine()}; load average {load_before:.1f} before, {load_after:.1f} after; "
        f"median of {args.repeats} interleaved repeats"
    )
    print("delta = 1e-3 * randn (a round's update); weights = randn * 0.02, norms 1.0 (a block as sent)")
    print("encode = compress_state + encode; decode = decode with layout check + decompress_state;")
    print("MB/s = MB of fp32 payload per second; error = ||decoded - original|| / ||original||\n")
    print("| payload | level | body | bytes on wire | vs fp32 | encode MB/s | decode MB/s | rel. error |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    baseline = {c.payload_name: len(c.frame) for c in reversed(cells)}  # the fp32/none row of each
    for c in cells:
        encode_rate = fp32_mb / statistics.median(c.encode_times)
        decode_rate = fp32_mb / statistics.median(c.decode_times)
        error = _relative_error(c.decode_once(), c.payload)
        print(
            f"| {c.payload_name} | {c.level.value} | {c.compression.name.lower()} | {len(c.frame):,} "
            f"| {len(c.frame) / baseline[c.payload_name]:.3f} | {encode_rate:.0f} | {decode_rate:.0f} "
            f"| {error:.2e} |"
        )


if __name__ == "__main__":
    main()
