"""What one training step costs on a device, in memory (:class:`MemoryModel`) and in time
(:class:`StepTimeModel`): pure arithmetic over a few measured numbers, which tells what a device can train.

Memory of one training step that trains the new blocks at layer indices ``S`` (``n = |S|``) of an
``L``-layer expanded model::

    required(S) = base_bytes + fixed_bytes + n * block_bytes + activation_bytes_per_layer * (L - min(S))

* ``base_bytes`` — the expanded model as held in memory: frozen base as stored (packed 4-bit
  weights counted in bytes, not parameters) plus every new block's float32 weights.
* ``fixed_bytes`` — per-step memory that does not depend on which blocks train: the logits, the
  saved log-softmax of the loss and their gradients (grows with batch x tokens x vocabulary).
* ``block_bytes`` — one trainable block: float32 weights, gradients and two AdamW moments,
  16 bytes per parameter. The weights are also in ``base_bytes``; counting them twice (4 of the
  16 bytes) is a deliberate margin for allocator slack and backward temporaries, which this model
  does not otherwise count.
* ``activation_bytes_per_layer`` — tensors autograd keeps for backward in each layer from the
  lowest trainable block up; nothing is kept below it (the base is frozen and the inputs carry no
  grad). Measured, not estimated: see :func:`edge_client.measure.measure_activations`.
* ``allocator_slack`` — what the memory allocator adds on top of the live tensors, applied to
  the per-step parts (``fixed_bytes`` and ``activation_bytes_per_layer`` are stored with it
  applied). On CPU, glibc's malloc fragments its heap across a step: for SmolLM2-135M (batch
  4 x 128, lowest block at layer 5) the live-tensor prediction was exact (778 MiB predicted,
  776 MiB peak RSS growth with ``MALLOC_MMAP_THRESHOLD_=65536``), but with the default malloc
  the peak RSS grew by 1173 MiB (nf4 base) and 797 for 629 predicted (bf16): 1.27-1.51x, hence
  :data:`ALLOCATOR_SLACK` ``["cpu"] = 1.5``. Forcing mmap for large blocks removes the slack but
  made steps 1.6x slower. CUDA's caching allocator was not measured (no GPU here): 1.0.

The coordinator sees ``base_bytes + fixed_bytes`` as ``base_memory_bytes`` and evaluates the
same formula, so edge and coordinator agree on what fits.

Time of one step (:class:`StepTimeModel`): the measured step that trains only the top new block,
plus the backward through every layer between the lowest trainable block and the top one, plus
the weight gradients and optimizer update of each further trainable block::

    step(lowest, n) = block_step + (top - lowest) * BACKWARD_PER_FORWARD * layer_forward
                      + (n - 1) * EXTRA_PER_TRAINED_BLOCK * layer_forward
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from fedbe.errors import FedbeError

BYTES_PER_TRAINABLE_PARAM = 16  # fp32 weight + fp32 grad + AdamW exp_avg + exp_avg_sq
# Backward through a frozen layer computes input gradients only: about one forward's work per
# matmul, plus the attention backward. Calibrated on SmolLM2-135M (see docs/profiles.md).
BACKWARD_PER_FORWARD = 1.5
# A trainable block adds weight gradients (one more forward's matmuls) and its AdamW update.
# Not calibrated: the difference was below the timing noise of a shared 2-core machine.
EXTRA_PER_TRAINED_BLOCK = 1.0
# Peak memory growth / live tensors, per torch device type (see the module docstring).
ALLOCATOR_SLACK = {"cpu": 1.5}


@dataclass(frozen=True)
class MemoryModel:
    base_bytes: int
    fixed_bytes: int
    block_bytes: int
    activation_bytes_per_layer: int
    num_layers: int
    new_layer_indices: tuple[int, ...]
    allocator_slack: float = 1.0  # already applied to fixed_bytes and activation_bytes_per_layer

    @property
    def static_bytes(self) -> int:
        """Memory that does not depend on the assignment (announced as ``base_memory_bytes``)."""
        return self.base_bytes + self.fixed_bytes

    def required_bytes(self, layer_indices: Sequence[int]) -> int:
        """Peak memory of a step that trains the new blocks at ``layer_indices``."""
        layers = self._check(layer_indices)
        return self.required_bytes_at(min(layers), len(layers))

    def required_bytes_at(self, lowest_layer: int, n_blocks: int, num_layers: int | None = None) -> int:
        """The same formula by position only: ``n_blocks`` trained, the lowest at ``lowest_layer`` of a
        ``num_layers``-layer stack (default: the measured one). For an expansion other than the one
        measured (a coordinator may place blocks differently)."""
        total = self.num_layers if num_layers is None else num_layers
        return (
            self.static_bytes
            + n_blocks * self.block_bytes
            + self.activation_bytes_per_layer * (total - lowest_layer)
        )

    def fits(self, layer_indices: Sequence[int], budget_bytes: int) -> bool:
        return self.required_bytes(layer_indices) <= budget_bytes

    def max_trainable_blocks(self, budget_bytes: int) -> int:
        """Most new blocks trainable at once, in the worst case: the lowest new block among them."""
        lowest = min(self.new_layer_indices)
        for n in range(len(self.new_layer_indices), 0, -1):
            needed = self.static_bytes + n * self.block_bytes
            needed += self.activation_bytes_per_layer * (self.num_layers - lowest)
            if needed <= budget_bytes:
                return n
        return 0

    def _check(self, layer_indices: Sequence[int]) -> list[int]:
        layers = list(layer_indices)
        if not layers:
            raise FedbeError("an assignment must name at least one new block")
        unknown = sorted(set(layers) - set(self.new_layer_indices))
        if unknown or len(set(layers)) != len(layers):
            raise FedbeError(
                f"layer indices {layers} are not distinct new blocks of this model "
                f"(new blocks are at {list(self.new_layer_indices)})"
            )
        return layers


def memory_model(
    *,
    base_bytes: int,
    fixed_bytes: int,
    block_params: int,
    activation_bytes_per_layer: int,
    num_layers: int,
    new_layer_indices: Sequence[int],
    allocator_slack: float = 1.0,
) -> MemoryModel:
    """Build a :class:`MemoryModel`; ``block_params`` is the parameter count of one new block and
    ``fixed_bytes`` / ``activation_bytes_per_layer`` are live-tensor measurements (the slack is
    applied here)."""
    for name, value in (
        ("base_bytes", base_bytes),
        ("fixed_bytes", fixed_bytes),
        ("block_params", block_params),
        ("activation_bytes_per_layer", activation_bytes_per_layer),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise FedbeError(f"{name} must be a whole number >= 0, got {value!r}")
    if not 1.0 <= allocator_slack < 10.0:
        raise FedbeError(f"allocator slack must be in [1, 10), got {allocator_slack!r}")
    indices = tuple(new_layer_indices)
    if not indices or any(not 0 <= i < num_layers for i in indices) or len(set(indices)) != len(indices):
        raise FedbeError(f"new layer indices {list(indices)} must be distinct layers of 0..{num_layers - 1}")
    return MemoryModel(
        base_bytes=base_bytes,
        fixed_bytes=math.ceil(fixed_bytes * allocator_slack),
        block_bytes=BYTES_PER_TRAINABLE_PARAM * block_params,
        activation_bytes_per_layer=math.ceil(activation_bytes_per_layer * allocator_slack),
        num_layers=num_layers,
        new_layer_indices=tuple(sorted(indices)),
        allocator_slack=allocator_slack,
    )


@dataclass(frozen=True)
class StepTimeModel:
    """Seconds per training step, from the two announced measurements."""

    block_step_seconds: float  # training only the top new block
    layer_forward_seconds: float  # no-grad forward of one frozen layer
    top_layer_index: int  # layer index of the top new block

    def step_seconds(self, lowest_layer_index: int, n_blocks: int) -> float:
        """One step training ``n_blocks`` new blocks, the lowest at ``lowest_layer_index``."""
        if not 0 <= lowest_layer_index <= self.top_layer_index:
            raise FedbeError(
                f"lowest trainable layer {lowest_layer_index} must be in 0..{self.top_layer_index} "
                "(the top new block)"
            )
        if n_blocks < 1:
            raise FedbeError(f"a step trains at least one block, got {n_blocks}")
        span = self.top_layer_index - lowest_layer_index
        return (
            self.block_step_seconds
            + span * BACKWARD_PER_FORWARD * self.layer_forward_seconds
            + (n_blocks - 1) * EXTRA_PER_TRAINED_BLOCK * self.layer_forward_seconds
        )

    def slowed(self, factor: float) -> StepTimeModel:
        """The same device ``factor`` times slower (emulation)."""
        if not factor > 0:
            raise FedbeError(f"slowdown factor must be > 0, got {factor}")
        return replace(
            self,
            block_step_seconds=self.block_step_seconds * factor,
            layer_forward_seconds=self.layer_forward_seconds * factor,
        )
