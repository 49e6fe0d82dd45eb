"""The device report (``fedbe-edge profile``): what this device can train, measured on the real
expanded model.

The pieces, I/O at the edges and pure arithmetic in the middle:

* :func:`probe_device` (:mod:`edge_client.hardware`) — kind, name, memory, 16-bit support, which
  quantizations run;
* :func:`measure_activations`, :func:`measure_compute` (:mod:`edge_client.measure`) — activation
  memory and step/forward times at the training shape, cached;
* :func:`memory_model`, :class:`StepTimeModel` (:mod:`edge_client.step_cost`) — what fits and how long
  a step takes, as formulas over those numbers;
* :func:`build_report` — all of it for one :class:`~fedbe.device_profile.DeviceProfile`, as a
  :class:`DeviceReport` whose :meth:`~DeviceReport.to_announce_fields` are the capacity fields of
  :class:`fedbe.protocol.AnnounceMessage`.

Emulation (``emulating=True``, simulating the profile's device on another machine): the budget is
also capped by ``emulate.memory_cap_bytes``, every time is multiplied by
``emulate.compute_slowdown`` and the link is ``emulate.link_bandwidth_mbps``. Without it, the
profile's ``emulate`` section is ignored and the numbers are this machine's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from edge_client.hardware import DeviceInfo, probe_device
from edge_client.measure import (
    ActivationMeasurement,
    ComputeMeasurement,
    benchmark_compute,
    measure_activations,
    measure_compute,
    measurement_cache_dir,
)
from edge_client.step_cost import ALLOCATOR_SLACK, MemoryModel, StepTimeModel, memory_model
from fedbe import expansion, quantization, sources
from fedbe.device_profile import DeviceProfile, combine_budget

__all__ = [
    "ActivationMeasurement",
    "ComputeMeasurement",
    "DeviceInfo",
    "DeviceReport",
    "MemoryModel",
    "StepTimeModel",
    "benchmark_compute",
    "build_report",
    "measure_activations",
    "measure_compute",
    "measurement_cache_dir",
    "memory_model",
    "probe_device",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL = sources.SMOLLM2
DEFAULT_BLOCKS = 6
Progress = Callable[[str], None]


@dataclass(frozen=True)
class BlockCost:
    """Training one new block alone: its step time and memory, and whether it fits the budget."""

    block_id: int
    layer_index: int
    step_seconds: float
    memory_bytes: int
    fits: bool


@dataclass(frozen=True)
class DeviceReport:
    """Everything ``fedbe-edge profile`` found; times already include any emulated slowdown."""

    profile: DeviceProfile
    device: DeviceInfo
    emulating: bool
    model: str
    new_layer_indices: tuple[int, ...]
    requested_precision: str
    precision: str  # in effect (after any fallback)
    precision_fallback: str | None
    batch_size: int
    max_tokens: int
    memory_budget_bytes: int
    memory: MemoryModel
    measured: ComputeMeasurement  # as measured here, before the slowdown
    activations: ActivationMeasurement
    compute_slowdown: float
    cost: StepTimeModel  # slowdown applied
    link_bandwidth_bps: float

    @property
    def max_trainable_blocks(self) -> int:
        return self.memory.max_trainable_blocks(self.memory_budget_bytes)

    def block_costs(self) -> list[BlockCost]:
        """Per new block: a step training only it, and its memory."""
        out = []
        for block_id, layer in enumerate(self.new_layer_indices):
            need = self.memory.required_bytes([layer])
            out.append(
                BlockCost(
                    block_id, layer, self.cost.step_seconds(layer, 1), need, need <= self.memory_budget_bytes
                )
            )
        return out

    def to_announce_fields(self) -> dict[str, object]:
        """The capacity fields of :class:`fedbe.protocol.AnnounceMessage` (the caller adds client_id,
        profile_name, num_examples, label_histogram and base_fingerprint)."""
        return {
            "device_kind": self.device.kind,
            "device_name": self.device.name,
            "precision": self.precision,
            "memory_budget_bytes": self.memory_budget_bytes,
            "base_memory_bytes": self.memory.static_bytes,
            "block_memory_bytes": self.memory.block_bytes,
            "activation_bytes_per_layer": self.memory.activation_bytes_per_layer,
            "max_trainable_blocks": self.max_trainable_blocks,
            "block_step_seconds": self.cost.block_step_seconds,
            "layer_forward_seconds": self.cost.layer_forward_seconds,
            "link_bandwidth_bps": self.link_bandwidth_bps,
            "batch_size": self.batch_size,
            "max_tokens": self.max_tokens,
        }

    def to_json(self) -> dict[str, object]:
        """A JSON-ready summary: the announce fields plus what they were made of."""
        gpu = self.device.gpu
        return {
            "profile": self.profile.name,
            "profile_file": self.profile.source,
            "emulating": self.emulating,
            **self.to_announce_fields(),
            "device_details": self.device.details,
            "torch_device": self.device.torch_device,
            "memory_total_bytes": self.device.memory_total_bytes,
            "memory_available_bytes": self.device.memory_available_bytes,
            "fp16": self.device.fp16,
            "bf16": self.device.bf16,
            "quantization": dict(self.device.quantization),
            "quantization_errors": dict(self.device.quantization_errors),
            "gpu": None if gpu is None else gpu.__dict__,
            "model": self.model,
            "num_layers": self.memory.num_layers,
            "new_layer_indices": list(self.new_layer_indices),
            "requested_precision": self.requested_precision,
            "precision_fallback": self.precision_fallback,
            "model_bytes": self.memory.base_bytes,
            "fixed_activation_bytes": self.memory.fixed_bytes,
            "allocator_slack": self.memory.allocator_slack,
            "measured_activation_bytes_per_layer": self.activations.activation_bytes_per_layer,
            "measured_fixed_activation_bytes": self.activations.fixed_bytes,
            "compute_slowdown": self.compute_slowdown,
            "measured_block_step_seconds": self.measured.block_step_seconds,
            "measured_layer_forward_seconds": self.measured.layer_forward_seconds,
            "measured_block_forward_seconds": self.measured.block_forward_seconds,
            "measured_forward_seconds": self.measured.forward_seconds,
            "from_cache": self.measured.cached and self.activations.cached,
            "step_seconds_by_block": [c.__dict__ for c in self.block_costs()],
        }


def build_report(
    profile: DeviceProfile,
    model_source: str = DEFAULT_MODEL,
    *,
    n_blocks: int | None = None,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    precision: str | None = None,
    emulating: bool = False,
    use_cache: bool = True,
    device: DeviceInfo | None = None,
    progress: Progress | None = None,
) -> DeviceReport:
    """Probe the device, load and expand the model (``n_blocks`` interleaved new blocks, default
    ``min(6, layers)``), freeze the base in the profile's precision and measure everything."""
    say = progress or (lambda message: log.info("%s", message))
    if device is None:
        say("probing the device")
        device = probe_device()
    batch = batch_size or profile.batch_size
    tokens = max_tokens or profile.max_tokens
    requested = precision or profile.precision
    _check_expectations(profile, device, requested, emulating)
    source = sources.resolve_source(model_source)
    say(f"loading {source.describe()}")
    model = sources.load_model(source)
    base_layers = int(model.config.num_hidden_layers)
    blocks = n_blocks if n_blocks is not None else min(DEFAULT_BLOCKS, base_layers)
    registry = expansion.expand_model(model, expansion.plan_expansion(base_layers, blocks, "interleave"))
    frozen = quantization.freeze_base(model, registry, requested, device=device.torch_device)
    effective = frozen.precision.value
    say(
        f"expanded to {registry.num_layers} layers (new blocks at {list(registry.new_layer_indices)}), "
        f"base in {effective}; measuring activation memory at batch {batch} x {tokens} tokens"
    )
    activations = measure_activations(model, registry, batch, tokens, effective, use_cache=use_cache)
    say(
        "timing a forward and a training step of the top block"
        + (" (cached)" if use_cache and activations.cached else "")
    )
    measured = measure_compute(model, registry, batch, tokens, effective, use_cache=use_cache)
    memory = memory_model(
        base_bytes=quantization.module_bytes(model),
        fixed_bytes=activations.fixed_bytes,
        block_params=sum(p.numel() for p in expansion.new_block_module(model, registry, 0).parameters()),
        activation_bytes_per_layer=activations.activation_bytes_per_layer,
        num_layers=registry.num_layers,
        new_layer_indices=registry.new_layer_indices,
        allocator_slack=ALLOCATOR_SLACK.get(device.torch_device, 1.0),
    )
    slowdown = profile.compute_slowdown(emulating)
    cost = StepTimeModel(
        measured.block_step_seconds, measured.layer_forward_seconds, registry.blocks[-1].layer_index
    )
    return DeviceReport(
        profile=profile,
        device=device,
        emulating=emulating,
        model=source.spec,
        new_layer_indices=registry.new_layer_indices,
        requested_precision=requested,
        precision=effective,
        precision_fallback=frozen.fallback_reason,
        batch_size=batch,
        max_tokens=tokens,
        memory_budget_bytes=combine_budget(
            profile, device.memory_available_bytes, device.memory_total_bytes, emulating=emulating
        ),
        memory=memory,
        measured=measured,
        activations=activations,
        compute_slowdown=slowdown,
        cost=cost.slowed(slowdown),
        link_bandwidth_bps=profile.link_bandwidth_bps(emulating),
    )


def _check_expectations(profile: DeviceProfile, device: DeviceInfo, precision: str, emulating: bool) -> None:
    """Log where the profile's declarations disagree with the measurement (the measurement wins)."""
    if emulating:
        if profile.emulate is None:
            log.warning("profile %s has no emulate section: emulating it changes nothing", profile.name)
        return
    if profile.device_kind is not None and profile.device_kind != device.kind:
        log.warning(
            "profile %s (%s) declares a %s device but this is a %s (%s); the numbers are this device's. "
            "Pass --emulate to simulate the profile's device here.",
            profile.name,
            profile.source,
            profile.device_kind,
            device.kind,
            device.name,
        )
    runs = device.quantization.get(precision)
    if runs is None:
        return
    if profile.quantized_kernels and not runs:
        log.warning(
            "profile %s expects bitsandbytes kernels, but %s does not run here: %s",
            profile.name,
            precision,
            device.quantization_errors.get(precision, "unknown reason"),
        )
    elif not profile.quantized_kernels and runs:
        log.info("profile %s expects no bitsandbytes kernels, but %s runs here", profile.name, precision)
