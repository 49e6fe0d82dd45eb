"""Function-preserving block expansion (LLaMA Pro style).

A new block is a deep copy of the decoder block it follows, with its attention-output and
MLP-output projections (weights and biases) zeroed. In a pre-norm residual block
``h + attn(norm(h))`` and ``h + mlp(norm(h))`` both branches then add exactly zero, so the
expanded model computes exactly what the base computed, bit for bit, until the new blocks train.

Three steps, kept apart:

* :func:`plan_expansion` — a pure function from (number of base layers, N, placement) to the
  sorted base-layer indices that each get a new block after them. Nothing is rounded silently.
* :func:`expand_model` — applies a plan to a transformers model in place, updates the config
  (layer count, per-layer lists such as ``layer_types``) and every layer index used by the KV
  cache, and returns the :class:`BlockRegistry`.
* :class:`BlockRegistry` — which layer indices are new blocks, by block id. It is recorded in the
  model config under ``fedbe_expansion`` so a saved expanded model describes itself.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from fedbe.errors import ExpansionError, UnsupportedArchitectureError

log = logging.getLogger(__name__)

CONFIG_KEY = "fedbe_expansion"
# Per-layer config lists that must grow with the layer stack (a new block inherits its source's entry).
PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers")


@dataclass(frozen=True)
class Architecture:
    """Where an architecture keeps its decoder blocks and which projections write to the residual."""

    layers_path: tuple[str, ...]
    output_projections: tuple[str, ...]


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(("model", "layers"), ("self_attn.o_proj", "mlp.down_proj")),
    "mistral": Architecture(("model", "layers"), ("self_attn.o_proj", "mlp.down_proj")),
    "qwen2": Architecture(("model", "layers"), ("self_attn.o_proj", "mlp.down_proj")),
    "qwen3": Architecture(("model", "layers"), ("self_attn.o_proj", "mlp.down_proj")),
    "gemma3_text": Architecture(("model", "layers"), ("self_attn.o_proj", "mlp.down_proj")),
    "gpt2": Architecture(("transformer", "h"), ("attn.c_proj", "mlp.c_proj")),
}


def architecture_of(model: PreTrainedModel) -> Architecture:
    model_type = getattr(model.config, "model_type", type(model).__name__)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise UnsupportedArchitectureError(
            f"block expansion does not support architecture {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(sorted(ARCHITECTURES))}. Adding one means naming its layer list "
            "and output projections in fedbe.expansion.ARCHITECTURES and adding a test."
        )
    return arch


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The model's ModuleList of decoder blocks."""
    module: Any = model
    for name in architecture_of(model).layers_path:
        module = getattr(module, name, None)
    if not isinstance(module, nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: expected a ModuleList of decoder blocks at "
            f"{'.'.join(architecture_of(model).layers_path)}, found {type(module).__name__}"
        )
    return module


@dataclass(frozen=True)
class NewBlock:
    block_id: int
    layer_index: int  # position in the expanded stack
    source_layer: int  # index of the base layer it was copied from (in the base model)


@dataclass(frozen=True)
class BlockRegistry:
    """The new blocks of an expanded model, by id (0 = lowest in the stack)."""

    base_num_layers: int
    blocks: tuple[NewBlock, ...]

    @property
    def num_layers(self) -> int:
        return self.base_num_layers + len(self.blocks)

    @property
    def block_ids(self) -> tuple[int, ...]:
        return tuple(b.block_id for b in self.blocks)

    @property
    def new_layer_indices(self) -> tuple[int, ...]:
        return tuple(b.layer_index for b in self.blocks)

    def block(self, block_id: int) -> NewBlock:
        if not isinstance(block_id, int) or not 0 <= block_id < len(self.blocks):
            raise ExpansionError(
                f"unknown block id {block_id!r}; this model has new blocks 0..{len(self.blocks) - 1}"
            )
        return self.blocks[block_id]

    def check_ids(self, block_ids: Sequence[int]) -> tuple[int, ...]:
        """Validate and sort a set of block ids; duplicates and unknown ids are errors."""
        ids = [self.block(b).block_id for b in block_ids]
        if len(set(ids)) != len(ids):
            raise ExpansionError(f"duplicate block ids in {list(block_ids)}")
        return tuple(sorted(ids))

    def to_dict(self) -> dict[str, Any]:
        return {
            "base_num_layers": self.base_num_layers,
            "new_layer_indices": list(self.new_layer_indices),
            "source_layers": [b.source_layer for b in self.blocks],
        }

    @classmethod
    def from_dict(cls, data: Any) -> BlockRegistry:
        try:
            base = int(data["base_num_layers"])
            indices = [int(i) for i in data["new_layer_indices"]]
            sources = [int(i) for i in data["source_layers"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ExpansionError(f"malformed {CONFIG_KEY} record {data!r}: {exc}") from exc
        if len(indices) != len(sources) or indices != sorted(set(indices)):
            raise ExpansionError(f"malformed {CONFIG_KEY} record {data!r}: indices must be unique and sorted")
        if any(not 0 <= i < base + len(indices) for i in indices) or any(not 0 <= s < base for s in sources):
            raise ExpansionError(f"malformed {CONFIG_KEY} record {data!r}: index out of range")
        return cls(
            base, tuple(NewBlock(k, i, s) for k, (i, s) in enumerate(zip(indices, sources, strict=True)))
        )


@dataclass(frozen=True)
class ExpansionPlan:
    """``after[k]`` is the base-layer index that new block ``k`` follows (sorted, repeats allowed for 'top')."""

    base_num_layers: int
    after: tuple[int, ...]

    def registry(self) -> BlockRegistry:
        blocks: list[NewBlock] = []
        position = 0
        k = 0
        for base_index in range(self.base_num_layers):
            position += 1  # the base layer itself
            while k < len(self.after) and self.after[k] == base_index:
                blocks.append(NewBlock(block_id=k, layer_index=position, source_layer=base_index))
                position += 1
                k += 1
        return BlockRegistry(self.base_num_layers, tuple(blocks))


PLACEMENTS = ("interleave", "interleave-mid-top", "middle", "top")


def plan_expansion(
    base_num_layers: int, n_blocks: int | None, placement: str | Sequence[int]
) -> ExpansionPlan:
    """Decide where N new blocks go.

    * ``interleave``: the base layers are split into N groups whose sizes differ by at most one;
      a new block follows the last layer of each group (LLaMA Pro). Needs 1 <= N <= layers.
    * ``interleave-mid-top``: interleave, except that the top group's block follows that group's
      middle layer (the lower one of two), so base layers stay above every new block and the others
      keep LLaMA Pro's places: with 30 layers and 6 blocks, after 4, 9, 14, 19, 24 and 27. Chosen for
      ``fedbe bench`` on the validation split (the block right under the output head forgets most).
    * ``middle``: the same groups, a new block after the middle layer of each (the lower one of two
      middles), so base layers stay above the top new block: with 30 layers and 6 blocks, after
      layers 2, 7, ..., 27 instead of 4, 9, ..., 29. Needs 1 <= N <= layers.
    * ``top``: N new blocks stacked after the last base layer. Needs 1 <= N <= layers.
    * explicit base-layer indices ``[i, j, ...]`` (0-based): a new block after each; no duplicates,
      each in range. ``n_blocks`` may be None or must equal the number of indices.
    """
    if not isinstance(base_num_layers, int) or base_num_layers < 1:
        raise ExpansionError(f"the base model must have at least one layer, got {base_num_layers!r}")
    if isinstance(placement, str) and placement not in PLACEMENTS:
        placement = parse_placement(placement)
    if not isinstance(placement, str):
        indices = list(placement)
        if n_blocks is not None and n_blocks != len(indices):
            raise ExpansionError(
                f"--blocks {n_blocks} disagrees with the {len(indices)} positions given in --placement {indices}; "
                "give one position per new block (or leave --blocks out)"
            )
        if not indices:
            raise ExpansionError("--placement lists no positions; give at least one base-layer index")
        bad = [
            i
            for i in indices
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < base_num_layers
        ]
        if bad:
            raise ExpansionError(
                f"placement indices {bad} are out of range: the base model has layers 0..{base_num_layers - 1}"
            )
        if len(set(indices)) != len(indices):
            dupes = sorted({i for i in indices if indices.count(i) > 1})
            raise ExpansionError(
                f"placement repeats layer(s) {dupes}; each base layer can get at most one new block"
            )
        return ExpansionPlan(base_num_layers, tuple(sorted(indices)))
    if n_blocks is None or isinstance(n_blocks, bool) or not isinstance(n_blocks, int):
        raise ExpansionError(f"number of new blocks must be an integer, got {n_blocks!r}")
    if not 1 <= n_blocks <= base_num_layers:
        raise ExpansionError(
            f"cannot add {n_blocks} new blocks with placement {placement!r} to a {base_num_layers}-layer model: "
            f"choose 1..{base_num_layers}"
        )
    if placement == "top":
        return ExpansionPlan(base_num_layers, (base_num_layers - 1,) * n_blocks)
    # Group g covers base layers [floor(g*L/N), floor((g+1)*L/N)); the new block follows its last
    # layer (interleave) or its middle one (middle; interleave-mid-top for the top group only).
    starts = [g * base_num_layers // n_blocks for g in range(n_blocks + 1)]
    middles = [lo + (hi - lo - 1) // 2 for lo, hi in itertools.pairwise(starts)]
    if placement == "middle":
        after = tuple(middles)
    else:
        after = tuple(hi - 1 for hi in starts[1:])
        if placement == "interleave-mid-top":
            after = (*after[:-1], middles[-1])
    return ExpansionPlan(base_num_layers, after)


def parse_placement(text: str) -> str | list[int]:
    """Parse a --placement argument: one of :data:`PLACEMENTS` or comma-separated base-layer indices."""
    text = text.strip()
    if text in PLACEMENTS:
        return text
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ExpansionError(
            f"invalid placement {text!r}: use {', '.join(PLACEMENTS)} or comma-separated base-layer "
            "indices like 4,9,14"
        ) from None


def expand_model(model: PreTrainedModel, plan: ExpansionPlan) -> BlockRegistry:
    """Insert the planned new blocks into ``model`` in place; return their registry.

    The model must be unexpanded and in full or half precision (expand before quantizing: a copy of
    a quantized block would not be a full-precision trainable block).
    """
    arch = architecture_of(model)
    if getattr(model.config, CONFIG_KEY, None):
        raise ExpansionError("this model is already expanded; expand the base model instead")
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        raise ExpansionError(
            "this GPT-2 config scales attention by 1/(layer index + 1), so moving layers changes their "
            "function; block expansion can not preserve it"
        )
    layers = decoder_layers(model)
    if len(layers) != plan.base_num_layers or model.config.num_hidden_layers != plan.base_num_layers:
        raise ExpansionError(
            f"plan is for {plan.base_num_layers} layers but the model has {len(layers)} "
            f"(config says {model.config.num_hidden_layers})"
        )
    _check_full_precision(layers)
    registry = plan.registry()
    new_at = {b.layer_index: b for b in registry.blocks}
    stack: list[nn.Module] = []
    base_iter = iter(layers)
    for position in range(registry.num_layers):
        if position in new_at:
            block = copy.deepcopy(layers[new_at[position].source_layer])
            _zero_output_projections(block, arch)
            stack.append(block)
        else:
            stack.append(next(base_iter))
    for position, block in enumerate(stack):
        _set_layer_index(block, position)
    _replace_module_list(model, arch, nn.ModuleList(stack))
    _update_config(model, registry)
    log.info(
        "expanded %s from %d to %d layers; new blocks at %s",
        model.config.model_type,
        registry.base_num_layers,
        registry.num_layers,
        list(registry.new_layer_indices),
    )
    return registry


def registry_of(model: PreTrainedModel) -> BlockRegistry:
    """The registry recorded in an expanded model's config (e.g. after ``from_pretrained``)."""
    record = getattr(model.config, CONFIG_KEY, None)
    if not record:
        raise ExpansionError("this model carries no fedbe_expansion record: it was not expanded by fedbe")
    registry = BlockRegistry.from_dict(record)
    if registry.num_layers != len(decoder_layers(model)):
        raise ExpansionError(
            f"the fedbe_expansion record describes {registry.num_layers} layers but the model has "
            f"{len(decoder_layers(model))}"
        )
    return registry


def new_block_module(model: PreTrainedModel, registry: BlockRegistry, block_id: int) -> nn.Module:
    return decoder_layers(model)[registry.block(block_id).layer_index]


def base_layer_modules(model: PreTrainedModel, registry: BlockRegistry) -> list[nn.Module]:
    new = set(registry.new_layer_indices)
    return [m for i, m in enumerate(decoder_layers(model)) if i not in new]


class _Bypass(nn.Module):
    """Stands in for a bypassed block: returns the residual stream unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@contextmanager
def bypassed(
    model: PreTrainedModel, registry: BlockRegistry, block_ids: Sequence[int] | None = None
) -> Iterator[None]:
    """Run ``model`` with some new blocks (default: all) skipped; with all skipped it is the base model.

    The blocks are swapped out of the layer list for the duration and put back afterwards, so no
    second copy of the model exists. Use it for the base model's predictions (self-distillation).
    """
    ids = registry.block_ids if block_ids is None else registry.check_ids(block_ids)
    layers = decoder_layers(model)
    saved = {}
    try:
        for block_id in ids:
            index = registry.block(block_id).layer_index
            saved[index] = layers[index]
            layers[index] = _Bypass()
        yield
    finally:
        for index, module in saved.items():
            layers[index] = module


def _zero_output_projections(block: nn.Module, arch: Architecture) -> None:
    with torch.no_grad():
        for path in arch.output_projections:
            proj = block.get_submodule(path)
            for name in ("weight", "bias"):
                tensor = getattr(proj, name, None)
                if tensor is not None:
                    tensor.zero_()


def _set_layer_index(block: nn.Module, index: int) -> None:
    for module in block.modules():
        if hasattr(module, "layer_idx"):
            setattr(module, "layer_idx", index)  # noqa: B010


def _replace_module_list(model: PreTrainedModel, arch: Architecture, layers: nn.ModuleList) -> None:
    parent: Any = model
    for name in arch.layers_path[:-1]:
        parent = getattr(parent, name)
    setattr(parent, arch.layers_path[-1], layers)


def _update_config(model: PreTrainedModel, registry: BlockRegistry) -> None:
    config = model.config
    for name in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, list | tuple) and len(values) == registry.base_num_layers:
            grown = list(values)
            for block in registry.blocks:  # ascending layer_index: each insert shifts the later ones
                grown.insert(block.layer_index, values[block.source_layer])
            setattr(config, name, grown)
    config.num_hidden_layers = registry.num_layers
    setattr(config, CONFIG_KEY, registry.to_dict())


def _check_full_precision(layers: nn.ModuleList) -> None:
    for module in layers.modules():
        if type(module).__module__.startswith("bitsandbytes"):
            raise ExpansionError(
                "the model's blocks are already quantized; expand the full-precision model first, "
                "then quantize the base (fedbe.quantization.freeze_base)"
            )
