"""Block state: the weights of new blocks, addressed by block id, and the arithmetic on them.

A :data:`BlockState` maps block id -> parameter name *relative to the block* -> tensor. The names
come from the block module's own ``state_dict`` (structure, not a search through key strings), and
:func:`flat_key`/:func:`split_key` are the one mapping used to save and load them.

Reading and writing state touches a model; the arithmetic (deltas, weighted averages) is pure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from fedbe.compression import BlockLayout, BlockState, layout_of
from fedbe.errors import BlockStateError
from fedbe.expansion import BlockRegistry, new_block_module

__all__ = [
    "BlockLayout",
    "BlockState",
    "apply_delta",
    "block_delta",
    "block_layout",
    "flat_key",
    "get_block_state",
    "load_block_state",
    "save_block_state",
    "set_block_state",
    "set_trainable",
    "split_key",
    "trainable_parameters",
    "weighted_average",
]


def block_layout(
    model: PreTrainedModel, registry: BlockRegistry, block_ids: Iterable[int] | None = None
) -> BlockLayout:
    """Expected shapes of the given new blocks (default: all)."""
    return layout_of(get_block_state(model, registry, block_ids))


def get_block_state(
    model: PreTrainedModel, registry: BlockRegistry, block_ids: Iterable[int] | None = None
) -> BlockState:
    """Detached float32 copies of the given new blocks' parameters (default: all new blocks)."""
    ids = registry.block_ids if block_ids is None else registry.check_ids(list(block_ids))
    state: BlockState = {}
    for block_id in ids:
        module = new_block_module(model, registry, block_id)
        state[block_id] = {
            name: t.detach().to("cpu", torch.float32).clone() for name, t in _params(module).items()
        }
    return state


def set_block_state(model: PreTrainedModel, registry: BlockRegistry, state: BlockState) -> None:
    """Copy ``state`` into the model's new blocks. Every named parameter must match exactly."""
    # Validate everything first, so a rejected state leaves the model untouched.
    targets = {block_id: _params(new_block_module(model, registry, block_id)) for block_id in state}
    for block_id, tensors in state.items():
        _check_names(block_id, set(tensors), set(targets[block_id]))
        for name, target in targets[block_id].items():
            _check_shape(block_id, name, tensors[name], target)
    with torch.no_grad():
        for block_id, tensors in state.items():
            for name, target in targets[block_id].items():
                target.copy_(tensors[name].to(target.device, target.dtype))


def set_trainable(
    model: PreTrainedModel, registry: BlockRegistry, block_ids: Sequence[int]
) -> list[nn.Parameter]:
    """Make exactly the given new blocks trainable: everything else is frozen.

    Returns the trainable parameters (give these, and only these, to the optimizer). Because the
    base and every block below the lowest trainable one are frozen and the input ids carry no grad,
    autograd records nothing below that block: backprop stops there and no activations are kept.
    """
    ids = registry.check_ids(list(block_ids))
    model.requires_grad_(False)
    params: list[nn.Parameter] = []
    for block_id in ids:
        module = new_block_module(model, registry, block_id)
        for p in module.parameters():
            if not p.is_floating_point() or p.dtype != torch.float32:
                raise BlockStateError(
                    f"new block {block_id} holds a {p.dtype} parameter; new blocks must be float32"
                )
            p.requires_grad_(True)
            params.append(p)
    return params


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def block_delta(new: BlockState, reference: BlockState) -> BlockState:
    """``new - reference`` for every block and parameter in ``new``."""
    delta: BlockState = {}
    for block_id, tensors in new.items():
        if block_id not in reference:
            raise BlockStateError(f"block {block_id} has no reference state to compute a delta against")
        ref = reference[block_id]
        _check_names(block_id, set(tensors), set(ref))
        for name, tensor in tensors.items():
            _check_shape(block_id, name, tensor, ref[name])
        delta[block_id] = {name: tensors[name].float() - ref[name].float() for name in tensors}
    return delta


def apply_delta(reference: BlockState, delta: BlockState, scale: float = 1.0) -> BlockState:
    """``reference + scale * delta`` for the blocks in ``delta``; other blocks are returned unchanged."""
    out: BlockState = {b: dict(t) for b, t in reference.items()}
    for block_id, tensors in delta.items():
        if block_id not in reference:
            raise BlockStateError(f"delta for block {block_id}, which the reference does not have")
        _check_names(block_id, set(tensors), set(reference[block_id]))
        for name, tensor in tensors.items():
            _check_shape(block_id, name, tensor, reference[block_id][name])
        out[block_id] = {name: reference[block_id][name] + scale * tensors[name] for name in tensors}
    return out


def weighted_average(
    deltas: Sequence[BlockState], weights: Sequence[float], absent_as_zero: bool = False
) -> BlockState:
    """Per block, the weighted mean of the deltas that contain it (weights renormalised per block).

    A client that did not train a block contributes nothing to that block; a block no delta
    contains is absent from the result (so its weights stay as they were). With
    ``absent_as_zero`` a delta that lacks a block counts as a zero delta for it: every block is
    divided by the total weight of all deltas, not only of those that hold it.
    """
    if len(deltas) != len(weights):
        raise BlockStateError(f"{len(deltas)} deltas but {len(weights)} weights")
    for w in weights:
        if isinstance(w, bool) or not (isinstance(w, int | float) and math.isfinite(w) and w >= 0):
            raise BlockStateError(f"aggregation weight {w!r} must be a finite number >= 0")
    result: BlockState = {}
    for block_id in sorted({b for d in deltas for b in d}):
        members = [
            (d[block_id], float(w)) for d, w in zip(deltas, weights, strict=True) if block_id in d and w > 0
        ]
        total = sum(w for _, w in members)
        if total == 0:
            continue
        if absent_as_zero:
            total = sum(float(w) for w in weights)
        first = members[0][0]
        names = set(first)
        for tensors, _ in members[1:]:
            _check_names(block_id, set(tensors), names)
            for name in names:
                _check_shape(block_id, name, tensors[name], first[name])
        result[block_id] = {
            name: sum((tensors[name].float() * (w / total) for tensors, w in members), torch.zeros(()))
            for name in sorted(names)
        }
    return result


def flat_key(block_id: int, name: str) -> str:
    """The one key mapping for saved block state: ``"<block id>/<parameter name>"``."""
    return f"{block_id}/{name}"


def split_key(key: str) -> tuple[int, str]:
    head, sep, name = key.partition("/")
    if not sep or not head.isdigit() or not name:
        raise BlockStateError(f"malformed block-state key {key!r}; expected '<block id>/<parameter name>'")
    return int(head), name


def save_block_state(state: BlockState, path: str | Path) -> None:
    tensors = {flat_key(b, n): t.contiguous() for b, ts in state.items() for n, t in ts.items()}
    save_file(tensors, str(path))


def load_block_state(path: str | Path) -> BlockState:
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several unrelated types
        raise BlockStateError(f"could not read block state {path}: {exc}") from exc
    state: BlockState = {}
    for key, value in tensors.items():
        block_id, name = split_key(key)
        state.setdefault(block_id, {})[name] = value
    return state


def _params(module: nn.Module) -> Mapping[str, torch.Tensor]:
    return dict(module.named_parameters())


def _check_shape(block_id: int, name: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    if tuple(got.shape) != tuple(expected.shape):
        raise BlockStateError(
            f"block {block_id} parameter {name}: shape {tuple(got.shape)} does not match {tuple(expected.shape)}"
        )


def _check_names(block_id: int, got: set[str], expected: set[str]) -> None:
    if got != expected:
        missing, extra = sorted(expected - got), sorted(got - expected)
        raise BlockStateError(
            f"block {block_id} parameters do not match: missing {missing[:5]}, unexpected {extra[:5]}"
        )
