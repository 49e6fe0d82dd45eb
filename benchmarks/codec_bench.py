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
the median of ``--repeats`` runs. Error is ``||decoded - original|| / ||original||``.

Run: ``.venv/bin/python benchmarks/codec_bench.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

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


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _relative_error(decoded: BlockState, original: BlockState) -> float:
    diff = sum(float((decoded[b][n] - t).norm() ** 2) for b, p in original.items() for n, t in p.items())
    norm = sum(float(t.norm() ** 2) for p in original.values() for t in p.values())
    return (diff / norm) ** 0.5


def measure(
    payload: BlockState, level: Level, compression: BodyCompression, repeats: int
) -> dict[str, float]:
    """Bytes on the wire, encode/decode seconds and relative error for one configuration."""
    layout = layout_of(payload)

    def encode_once() -> bytes:
        blocks, _ = compress_state(payload, level)
        msg = UpdateMessage(
            round=1,
            client_id="bench-client",
            task_id="bench-task",
            level=level,
            blocks=blocks,
            num_samples=256,
            num_steps=8,
            mean_loss=2.5,
            wall_seconds=60.0,
            peak_memory_bytes=1 << 30,
        )
        return encode(msg, compression=compression)

    frame = encode_once()

    def decode_once() -> BlockState:
        return decompress_state(decode(frame, expected_type=UpdateMessage, expected_layout=layout).blocks)

    return {
        "bytes": len(frame),
        "encode_s": _median_seconds(encode_once, repeats),
        "decode_s": _median_seconds(decode_once, repeats),
        "error": _relative_error(decode_once(), payload),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per cell; the median is shown")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and delta")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    weights = smollm2_block(args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    delta = {name: 1e-3 * torch.randn(t.shape, generator=g) for name, t in weights.items()}
    numel = sum(t.numel() for t in weights.values())
    fp32_mb = numel * 4 / 1e6
    print(
        f"# codec benchmark: one SmolLM2-135M-shaped decoder block, "
        f"{numel:,} parameters ({fp32_mb:.1f} MB fp32)"
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
        f"median of {args.repeats} repeats"
    )
    print("delta = 1e-3 * randn (a round's update); weights = randn * 0.02, norms 1.0 (a block as sent)")
    print("encode = compress_state + encode; decode = decode with layout check + decompress_state;")
    print("MB/s = MB of fp32 payload per second; error = ||decoded - original|| / ||original||\n")
    print("| payload | level | body | bytes on wire | vs fp32 | encode MB/s | decode MB/s | rel. error |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for payload_name, params in (("delta", delta), ("weights", weights)):
        payload: BlockState = {BLOCK_ID: params}
        baseline = 0
        for level in Level:
            for compression in BodyCompression:
                r = measure(payload, level, compression, args.repeats)
                baseline = baseline or int(r["bytes"])  # fp32 / none comes first
                print(
                    f"| {payload_name} | {level.value} | {compression.name.lower()} | {int(r['bytes']):,} "
                    f"| {r['bytes'] / baseline:.3f} | {fp32_mb / r['encode_s']:.0f} "
                    f"| {fp32_mb / r['decode_s']:.0f} | {r['error']:.2e} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
