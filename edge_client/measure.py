"""Measure the expanded model on this device: activation memory and compute time.

Both run the real model at the training shape and are cached under
``<fedbe cache>/measurements/`` (JSON, one file per measurement) keyed by the model's shape
(type, layers, new-block positions, hidden/intermediate/vocabulary sizes), the base precision,
batch size, tokens, the device, torch's thread count, the torch version, whether 16-bit matmuls run
natively or in fp32 and :data:`CACHE_VERSION` (bumped when the measured step changes), so a second
``fedbe-edge profile`` skips them; ``use_cache=False`` measures again and refreshes the entry. A
compute timing taken while the machine was oversubscribed (1-minute load average above its cores,
:func:`busy_reason`) is used but not cached, so one start on a crowded machine does not slow every
later plan down.

**Activations** (:func:`measure_activations`) are counted with
:func:`torch.autograd.graph.saved_tensors_hooks`: one forward with only the top new block
trainable and one with only the lowest, summing the distinct storages autograd saves for
backward (parameters and buffers excluded). Nothing is saved below the lowest trainable block, so
the difference divided by the layer distance is the memory per layer above it; what remains of
the top-block figure is the step's fixed part (loss, masks). Two logits-sized tensors are added to
that fixed part: the logits themselves and the gradient of the loss' log-softmax at the start of
backward, which are alive at the peak but are not saved tensors.

**Compute** (:func:`measure_compute`): one warm-up and ``steps`` repeats, median, of a no-grad
forward timed per decoder layer with hooks (giving one frozen layer's and one new block's
forward), and of an AdamW step training only the top new block through
:func:`edge_client.trainer.train_blocks` (its weights are restored afterwards).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from edge_client.hardware import cpu_description
from edge_client.trainer import train_blocks
from fedbe import expansion, sources
from fedbe.blocks import get_block_state, set_block_state, set_trainable
from fedbe.datasets import Batch
from fedbe.errors import FedbeError
from fedbe.progress_bar import progress
from fedbe.recipe import PLAIN

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComputeMeasurement:
    """Seconds at one training shape, as measured on this device (no emulated slowdown)."""

    block_step_seconds: float  # AdamW step training only the top new block (forward + backward + update)
    layer_forward_seconds: float  # no-grad forward of one frozen base layer
    block_forward_seconds: float  # no-grad forward of one (float32) new block
    forward_seconds: float  # no-grad forward of the whole model
    cached: bool = False


@dataclass(frozen=True)
class ActivationMeasurement:
    activation_bytes_per_layer: int
    fixed_bytes: int  # saved tensors outside the per-layer part + logits and their gradient
    cached: bool = False


# Bumped when the measured step changes for the same key (an entry of another version never matches):
# 2 = 16-bit bases multiplied in fp32 on CPUs without native 16-bit matmuls.
CACHE_VERSION = 2


def measurement_cache_dir() -> Path:
    return sources.cache_dir() / "measurements"


def _device_of(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


def _device_name(model: PreTrainedModel) -> str:
    device = _device_of(model)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_description(Path("/proc"))[0]


def _cache_key(
    what: str,
    model: PreTrainedModel,
    registry: expansion.BlockRegistry,
    precision: str,
    batch: int,
    tokens: int,
) -> dict[str, Any]:
    config = model.config
    return {
        "what": what,
        "model_type": config.model_type,
        "num_layers": registry.num_layers,
        "new_layer_indices": list(registry.new_layer_indices),
        "hidden_size": getattr(config, "hidden_size", None),
        "intermediate_size": getattr(config, "intermediate_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "precision": precision,
        "batch_size": batch,
        "max_tokens": tokens,
        "device": f"{_device_of(model).type}: {_device_name(model)}",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        # how this fedbe runs the step: a change of code path (16-bit matmuls native or in fp32,
        # bitsandbytes' compute dtype) changes the timing, so entries from another path must not match
        "version": CACHE_VERSION,
        "half_matmul": _half_matmul_mode(_device_of(model)),
    }


def _half_matmul_mode(device: torch.device) -> str:
    from fedbe.quantization import half_dtype, native_half_matmul  # noqa: PLC0415

    return "native" if native_half_matmul(half_dtype(device), str(device)) else "fp32"


def _cache_path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return measurement_cache_dir() / f"{key['what']}-{digest}.json"


def _cache_read(key: dict[str, Any]) -> dict[str, Any] | None:
    path = _cache_path(key)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable measurement cache %s: %s", path, exc)
        return None
    if not isinstance(record, dict) or record.get("key") != key or not isinstance(record.get("value"), dict):
        log.warning("ignoring measurement cache %s: it does not match this model and device", path)
        return None
    log.debug("measurement cache hit: %s", path)
    return record["value"]


def _cache_write(key: dict[str, Any], value: dict[str, Any]) -> None:
    path = _cache_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"key": key, "value": value}, handle, indent=2)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache only costs the next run its speed-up
        log.warning("could not write measurement cache %s: %s", path, exc)


def _random_batch(model: PreTrainedModel, batch_size: int, max_tokens: int) -> Batch:
    if batch_size < 1 or max_tokens < 2:
        raise FedbeError(f"need batch size >= 1 and max tokens >= 2, got {batch_size} x {max_tokens}")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(model.config.vocab_size), (batch_size, max_tokens), generator=generator)
    return Batch(ids, torch.ones_like(ids), ids.clone())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_compute(
    model: PreTrainedModel,
    registry: expansion.BlockRegistry,
    batch_size: int,
    max_tokens: int,
    steps: int = 2,
) -> ComputeMeasurement:
    """Time one warm-up and ``steps`` repeats (median) of a no-grad forward and of a training step.

    The forward times each decoder layer with hooks; the training step trains only the top new
    block through :func:`edge_client.trainer.train_blocks`. The block's weights are restored after.
    """
    if steps < 1:
        raise FedbeError(f"steps must be >= 1, got {steps}")
    batch = _random_batch(model, batch_size, max_tokens)
    device = _device_of(model)
    layers = expansion.decoder_layers(model)
    new = set(registry.new_layer_indices)
    starts: dict[int, float] = {}
    spans: dict[int, float] = {}

    def before(index: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            _sync(device)
            starts[index] = time.perf_counter()

        return hook

    def after(index: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            _sync(device)
            spans[index] = time.perf_counter() - starts[index]

        return hook

    handles = [layer.register_forward_pre_hook(before(i)) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(after(i)) for i, layer in enumerate(layers)]
    base_means, block_means, totals = [], [], []
    model.eval()
    try:
        with torch.no_grad():
            for repeat in progress(range(steps + 1), "timing forwards", "forwards"):
                spans.clear()
                _sync(device)
                t0 = time.perf_counter()
                model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
                _sync(device)
                if repeat == 0:
                    continue  # warm-up
                totals.append(time.perf_counter() - t0)
                base_means.append(statistics.mean(s for i, s in spans.items() if i not in new))
                block_means.append(statistics.mean(s for i, s in spans.items() if i in new))
    finally:
        for handle in handles:
            handle.remove()

    top = registry.block_ids[-1]
    saved = get_block_state(model, registry, [top])
    marks: list[float] = []
    try:
        marks.append(time.perf_counter())
        train_blocks(
            model,
            registry,
            [top],
            [batch],
            replace(PLAIN, steps=steps + 1),
            on_step=lambda _step, _loss: marks.append(time.perf_counter()),
        )
    finally:
        set_block_state(model, registry, saved)
    step_times = [b - a for a, b in zip(marks[1:], marks[2:], strict=False)]  # first step is the warm-up
    return ComputeMeasurement(
        block_step_seconds=statistics.median(step_times),
        layer_forward_seconds=statistics.median(base_means),
        block_forward_seconds=statistics.median(block_means),
        forward_seconds=statistics.median(totals),
    )


def measure_compute(
    model: PreTrainedModel,
    registry: expansion.BlockRegistry,
    batch_size: int,
    max_tokens: int,
    precision: str,
    steps: int = 2,
    *,
    use_cache: bool = True,
) -> ComputeMeasurement:
    """:func:`benchmark_compute`, cached per (model shape, precision, shape, device, torch version).

    ``use_cache=False`` measures again (and refreshes the cache).
    """
    key = _cache_key("compute", model, registry, precision, batch_size, max_tokens)
    hit = _cache_read(key) if use_cache else None
    if hit is not None:
        names = [f.name for f in fields(ComputeMeasurement) if f.name != "cached"]
        try:
            return ComputeMeasurement(**{name: float(hit[name]) for name in names}, cached=True)
        except (KeyError, TypeError, ValueError):
            log.warning("ignoring malformed measurement cache entry %s", _cache_path(key))
    busy = busy_reason()
    measured = benchmark_compute(model, registry, batch_size, max_tokens, steps)
    busy = busy or busy_reason()
    if busy is None:
        _cache_write(key, {k: v for k, v in asdict(measured).items() if k != "cached"})
    else:  # a timing taken on a crowded machine would slow every later start's plan down
        log.warning(
            "profile: compute timing not cached: the machine was busy while it ran (%s); the next "
            "start measures again. Profile on an idle device to cache it (fedbe-edge profile).",
            busy,
        )
    return measured


def busy_reason() -> str | None:
    """Why a timing taken now must not be cached (more runnable threads than cores), or None.

    The 1-minute load average is compared with the cores this process may run on: above it, a
    step measured now is slower than the device's own, and a cached one would be kept for good.
    """
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform: nothing to go on
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return f"load average {load:.1f} on {cores} cores" if load > cores else None


def saved_tensor_bytes(
    model: PreTrainedModel, registry: expansion.BlockRegistry, block_id: int, batch: Batch
) -> tuple[int, int]:
    """(bytes autograd saves for backward with only ``block_id`` trainable, bytes of the logits)."""
    device = _device_of(model)
    exclude = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    set_trainable(model, registry, [block_id])
    model.eval()
    expansion.new_block_module(model, registry, block_id).train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = model(
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
                labels=batch.labels.to(device),
                use_cache=False,
            )
        logits = out.logits.untyped_storage().nbytes()
        del out
    finally:
        model.eval()
        model.requires_grad_(False)
    return sum(seen.values()), logits


def measure_activations(
    model: PreTrainedModel,
    registry: expansion.BlockRegistry,
    batch_size: int,
    max_tokens: int,
    precision: str,
    *,
    use_cache: bool = True,
) -> ActivationMeasurement:
    """Bytes kept for backward per layer above the lowest trainable block, and the fixed part."""
    key = _cache_key("activations", model, registry, precision, batch_size, max_tokens)
    hit = _cache_read(key) if use_cache else None
    if hit is not None and all(
        isinstance(hit.get(k), int) for k in ("activation_bytes_per_layer", "fixed_bytes")
    ):
        return ActivationMeasurement(hit["activation_bytes_per_layer"], hit["fixed_bytes"], cached=True)
    if hit is not None:
        log.warning("ignoring malformed measurement cache entry %s", _cache_path(key))
    batch = _random_batch(model, batch_size, max_tokens)
    bottom, top = registry.blocks[0], registry.blocks[-1]
    top_saved, logits = saved_tensor_bytes(model, registry, top.block_id, batch)
    span_top = registry.num_layers - top.layer_index
    if bottom.layer_index == top.layer_index:  # one new block: everything counts as per-layer
        per_layer, fixed_saved = top_saved // span_top, 0
    else:
        bottom_saved, _ = saved_tensor_bytes(model, registry, bottom.block_id, batch)
        per_layer = max(0, bottom_saved - top_saved) // (top.layer_index - bottom.layer_index)
        fixed_saved = max(0, top_saved - per_layer * span_top)
    measured = ActivationMeasurement(per_layer, fixed_saved + 2 * logits)
    _cache_write(key, {k: v for k, v in asdict(measured).items() if k != "cached"})
    return measured
