"""Block expansion: the plan, the function-preserving insertion for every tiny architecture, bypass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers import AutoModelForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedModel

import fedbe.expansion as expansion
from fedbe.errors import ExpansionError, UnsupportedArchitectureError
from fedbe.expansion import (
    BlockRegistry,
    NewBlock,
    bypassed,
    decoder_layers,
    expand_model,
    new_block_module,
    parse_placement,
    plan_expansion,
    registry_of,
)
from fedbe.quantization import freeze_base
from fedbe.sources import TINY_ARCHITECTURES, build_tiny_model

BASE_LAYERS = 4  # every tiny config
SEQ_LEN = 24  # longer than the tiny sliding windows (8): sliding and full attention differ
NEW_TOKENS = 8

# The output projections of each tiny architecture, named here rather than read from fedbe.
OUTPUT_PROJECTIONS = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
    "mistral": ("self_attn.o_proj", "mlp.down_proj"),
    "gemma3": ("self_attn.o_proj", "mlp.down_proj"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
}

# Placement of 2 new blocks in a 4-layer model, worked out by hand:
# (placement, expected new layer indices, expected source layers, base layer behind each position).
PLACEMENTS: dict[str, tuple[Any, tuple[int, ...], tuple[int, ...], list[int]]] = {
    # groups [0,1] [2,3]: a block after 1 and after 3
    "interleave": ("interleave", (2, 5), (1, 3), [0, 1, 1, 2, 3, 3]),
    "top": ("top", (4, 5), (3, 3), [0, 1, 2, 3, 3, 3]),
    # interleave with the top group's block after its middle layer: after 1 and after 2
    "interleave-mid-top": ("interleave-mid-top", (2, 4), (1, 2), [0, 1, 1, 2, 2, 3]),
    # the same groups, a block after the middle (lower) layer of each: after 0 and after 2
    "middle": ("middle", (1, 4), (0, 2), [0, 0, 1, 2, 2, 3]),
    "explicit": ([2, 0], (1, 4), (0, 2), [0, 0, 1, 2, 2, 3]),
}
CASES = [(arch, "interleave") for arch in TINY_ARCHITECTURES] + [
    (arch, placement)
    for arch in ("llama", "gemma3")
    for placement in ("top", "middle", "interleave-mid-top", "explicit")
]


def token_ids(length: int = SEQ_LEN, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def greedy(model: PreTrainedModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding with the KV cache: (the token ids, the logits of every generated step).

    The logits are compared, not only the tokens: a tiny random model soon repeats one token, and
    argmax alone would hide a corrupted cache.
    """
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences, torch.stack(out.logits, dim=1)


def same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def same_after_reload(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    """:func:`same` for a model reloaded from safetensors: the same tokens, logits to float32 rounding.

    A reloaded model can take other CPU kernel paths than the one it was saved from (seen on an AMD
    EPYC host: 1-2e-7 apart in cached decoding, tokens identical), while a corrupted cache or a
    layer-index clash moves the logits by orders of magnitude more (0.29 measured).
    """
    return len(a) == len(b) and all(
        torch.equal(x, y) if not x.is_floating_point() else torch.allclose(x, y, rtol=1e-5, atol=1e-5)
        for x, y in zip(a, b, strict=True)
    )


Expanded = tuple[PreTrainedModel, PreTrainedModel, BlockRegistry]


def expanded(arch: str, placement: str = "interleave") -> Expanded:
    """(the base model, an identical copy expanded with 2 new blocks, the registry)."""
    base = build_tiny_model(arch, seed=0)
    model = build_tiny_model(arch, seed=0)
    n_blocks = None if placement == "explicit" else 2
    registry = expand_model(model, plan_expansion(BASE_LAYERS, n_blocks, PLACEMENTS[placement][0]))
    return base, model, registry


# --- the plan ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layers", "n_blocks", "after"),
    [
        (30, 6, (4, 9, 14, 19, 24, 29)),  # SmolLM2: six groups of five
        (4, 3, (0, 1, 3)),  # groups [0] [1] [2,3]
        (4, 2, (1, 3)),
        (4, 4, (0, 1, 2, 3)),
        (4, 1, (3,)),
        (10, 3, (2, 5, 9)),  # groups of 3, 3, 4
        (7, 5, (0, 1, 3, 4, 6)),  # groups of 1, 1, 2, 1, 2
        (1, 1, (0,)),
    ],
)
def test_interleave_puts_a_block_after_each_group(layers: int, n_blocks: int, after: tuple[int, ...]) -> None:
    plan = plan_expansion(layers, n_blocks, "interleave")
    assert plan.after == after
    assert plan.base_num_layers == layers


@pytest.mark.parametrize(
    ("layers", "n_blocks", "after"),
    [
        (30, 6, (2, 7, 12, 17, 22, 27)),  # SmolLM2-135M: groups of 5, the middle of each
        (5, 2, (0, 3)),  # groups [0, 1] and [2, 3, 4]
        (4, 4, (0, 1, 2, 3)),  # groups of one: the same as interleave
        (10, 3, (1, 4, 7)),  # groups of 3, 3, 4: the lower middle of 6..9 is 7
        (1, 1, (0,)),
    ],
)
def test_middle_puts_a_block_after_the_middle_of_each_group(
    layers: int, n_blocks: int, after: tuple[int, ...]
) -> None:
    assert plan_expansion(layers, n_blocks, "middle").after == after


@pytest.mark.parametrize(
    ("layers", "n_blocks", "after"),
    [
        (30, 6, (4, 9, 14, 19, 24, 27)),  # SmolLM2-135M: only the top block moves, under layers 28-29
        (4, 2, (1, 2)),  # groups [0, 1] and [2, 3]: the top block after 2
        (4, 4, (0, 1, 2, 3)),  # groups of one: nowhere lower to go
        (10, 3, (2, 5, 7)),  # groups of 3, 3, 4
        (1, 1, (0,)),
    ],
)
def test_interleave_mid_top_moves_only_the_top_block_to_its_groups_middle(
    layers: int, n_blocks: int, after: tuple[int, ...]
) -> None:
    assert plan_expansion(layers, n_blocks, "interleave-mid-top").after == after
    assert plan_expansion(layers, n_blocks, "interleave").after[:-1] == after[:-1]


@given(st.integers(1, 64).flatmap(lambda layers: st.tuples(st.just(layers), st.integers(1, layers))))
def test_middle_keeps_each_block_in_its_interleave_group(layers_and_blocks: tuple[int, int]) -> None:
    layers, n_blocks = layers_and_blocks
    middle = plan_expansion(layers, n_blocks, "middle").after
    interleave = plan_expansion(layers, n_blocks, "interleave").after
    assert list(middle) == sorted(set(middle))
    # each block at or below its interleave position, and above the previous group's last layer
    assert all(lo < m <= hi for lo, m, hi in zip((-1, *interleave), middle, interleave, strict=False))
    # and at most half its group below the top of the group
    assert all(
        hi - m <= (hi - lo) // 2 for lo, m, hi in zip((-1, *interleave), middle, interleave, strict=False)
    )


def test_top_stacks_every_block_after_the_last_layer() -> None:
    assert plan_expansion(4, 2, "top").after == (3, 3)
    assert plan_expansion(30, 3, "top").after == (29, 29, 29)


@pytest.mark.parametrize(
    ("n_blocks", "placement", "after"),
    [(None, [3, 0], (0, 3)), (2, [1, 2], (1, 2)), (None, "4,9", (4, 9)), (3, " 0, 5 ,29 ", (0, 5, 29))],
)
def test_explicit_positions_are_sorted(n_blocks: int | None, placement: Any, after: tuple[int, ...]) -> None:
    assert plan_expansion(30, n_blocks, placement).after == after


@pytest.mark.parametrize(
    ("layers", "n_blocks", "placement", "indices", "sources"),
    [
        (4, 2, "interleave", (2, 5), (1, 3)),
        (4, 3, "interleave", (1, 3, 6), (0, 1, 3)),
        (4, 2, "top", (4, 5), (3, 3)),
        (30, 6, "interleave", (5, 11, 17, 23, 29, 35), (4, 9, 14, 19, 24, 29)),
        (30, None, [0, 29], (1, 31), (0, 29)),
    ],
)
def test_registry_layer_indices(
    layers: int, n_blocks: int | None, placement: Any, indices: tuple[int, ...], sources: tuple[int, ...]
) -> None:
    registry = plan_expansion(layers, n_blocks, placement).registry()
    assert registry.new_layer_indices == indices
    assert tuple(b.source_layer for b in registry.blocks) == sources
    assert registry.block_ids == tuple(range(len(indices)))
    assert registry.num_layers == layers + len(indices)
    assert BlockRegistry.from_dict(registry.to_dict()) == registry


@pytest.mark.parametrize(
    ("layers", "n_blocks", "placement", "message"),
    [
        (4, 0, "interleave", "choose 1..4"),
        (4, -1, "interleave", "choose 1..4"),
        (4, 5, "interleave", "choose 1..4"),
        (4, 5, "top", "choose 1..4"),
        (4, True, "interleave", "must be an integer"),
        (4, None, "interleave", "must be an integer"),
        (4, 2.0, "top", "must be an integer"),
        (4, None, [4], "out of range"),
        (4, None, [-1], "out of range"),
        (4, None, [True], "out of range"),
        (4, None, [1, 1], r"repeats layer\(s\) \[1\]"),
        (4, 3, [0, 1], "disagrees"),
        (4, None, [], "no positions"),
        (4, None, "4,x", "invalid placement '4,x'"),
        (4, None, "centre", "invalid placement 'centre'"),
        (4, 5, "middle", "choose 1..4"),
        (4, None, "1,,2", "invalid placement"),
        (0, 1, "interleave", "at least one layer"),
    ],
)
def test_bad_plans_are_rejected(layers: int, n_blocks: Any, placement: Any, message: str) -> None:
    with pytest.raises(ExpansionError, match=message):
        plan_expansion(layers, n_blocks, placement)


def test_parse_placement() -> None:
    assert parse_placement(" interleave ") == "interleave"
    assert parse_placement("top") == "top"
    assert parse_placement("middle") == "middle"
    assert parse_placement("interleave-mid-top") == "interleave-mid-top"
    assert parse_placement("4,9,14") == [4, 9, 14]
    with pytest.raises(ExpansionError, match="comma-separated"):
        parse_placement("4;9")


@given(st.integers(1, 64).flatmap(lambda layers: st.tuples(st.just(layers), st.integers(1, layers))))
def test_interleave_property(layers_and_blocks: tuple[int, int]) -> None:
    layers, n_blocks = layers_and_blocks
    after = plan_expansion(layers, n_blocks, "interleave").after
    assert len(after) == n_blocks
    assert list(after) == sorted(set(after))
    assert all(0 <= i < layers for i in after)
    assert after[-1] == layers - 1
    sizes = [b - a for a, b in zip((-1, *after), after, strict=False)]
    assert sum(sizes) == layers
    assert max(sizes) - min(sizes) <= 1
    registry = plan_expansion(layers, n_blocks, "interleave").registry()
    assert [b.layer_index - b.block_id - 1 for b in registry.blocks] == list(after)


def test_registry_rejects_bad_ids_and_records() -> None:
    registry = plan_expansion(4, 2, "interleave").registry()
    assert registry.check_ids([1, 0]) == (0, 1)
    with pytest.raises(ExpansionError, match="unknown block id 2"):
        registry.check_ids([2])
    with pytest.raises(ExpansionError, match="duplicate"):
        registry.check_ids([0, 0])
    with pytest.raises(ExpansionError, match="malformed"):
        BlockRegistry.from_dict({"base_num_layers": 4, "new_layer_indices": [5, 2], "source_layers": [1, 3]})
    with pytest.raises(ExpansionError, match="out of range"):
        BlockRegistry.from_dict({"base_num_layers": 4, "new_layer_indices": [2, 6], "source_layers": [1, 3]})
    with pytest.raises(ExpansionError, match="malformed"):
        BlockRegistry.from_dict({"new_layer_indices": [2]})


# --- expansion of every tiny architecture --------------------------------------------------------


@pytest.mark.parametrize(("arch", "placement"), CASES)
def test_expansion_preserves_logits_and_structure(arch: str, placement: str) -> None:
    base, model, registry = expanded(arch, placement)
    _, indices, sources, origin = PLACEMENTS[placement]
    assert registry == BlockRegistry(
        BASE_LAYERS, tuple(NewBlock(k, i, s) for k, (i, s) in enumerate(zip(indices, sources, strict=True)))
    )
    ids = token_ids()
    assert torch.equal(logits(model, ids), logits(base, ids))
    assert model.config.num_hidden_layers == 6
    assert len(decoder_layers(model)) == 6
    assert registry_of(model) == registry

    base_types = getattr(base.config, "layer_types", None)
    if arch in ("qwen2", "gemma3"):
        assert base_types is not None and len(set(base_types)) == 2  # both kinds present: a real check
        assert model.config.layer_types == [base_types[i] for i in origin]

    with_layer_idx = 0
    for position, layer in enumerate(decoder_layers(model)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                with_layer_idx += 1
                assert module.layer_idx == position
    assert with_layer_idx >= 6  # at least every attention module carries one


@pytest.mark.parametrize(("arch", "placement"), CASES)
def test_new_blocks_are_copies_with_zero_output_projections(arch: str, placement: str) -> None:
    base, model, registry = expanded(arch, placement)
    origin = PLACEMENTS[placement][3]
    base_layers, layers = decoder_layers(base), decoder_layers(model)
    outputs = OUTPUT_PROJECTIONS[arch]
    zeroed_biases = 0
    for position, layer in enumerate(layers):
        source = dict(base_layers[origin[position]].named_parameters())
        params = dict(layer.named_parameters())
        assert params.keys() == source.keys()
        is_new = position in registry.new_layer_indices
        if is_new:
            assert layer is not base_layers[origin[position]]
        for name, param in params.items():
            if is_new and name.rsplit(".", 1)[0] in outputs:
                assert not source[name].eq(0).all()  # it really was zeroed, not zero already
                assert param.eq(0).all(), f"{arch} new block at {position}: {name} is not zero"
                zeroed_biases += name.endswith("bias")
            else:
                assert torch.equal(param, source[name]), f"{arch} layer {position}: {name} changed"
    if arch == "gpt2":  # Conv1D projections have biases: they must have been zeroed too
        assert zeroed_biases == 2 * len(registry.blocks)
    for block_id in registry.block_ids:
        assert new_block_module(model, registry, block_id) is layers[registry.block(block_id).layer_index]


@pytest.mark.parametrize(("arch", "placement"), CASES)
def test_saved_expansion_reloads_with_plain_transformers(arch: str, placement: str, tmp_path: Path) -> None:
    base, model, registry = expanded(arch, placement)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(reloaded) is type(model)
    assert reloaded.config.num_hidden_layers == 6
    assert registry_of(reloaded) == registry
    assert getattr(reloaded.config, "layer_types", None) == getattr(model.config, "layer_types", None)
    ids = token_ids()
    assert torch.equal(logits(reloaded, ids), logits(base, ids))
    prompt = token_ids(batch=1, seed=1)
    assert same_after_reload(greedy(reloaded, prompt), greedy(base, prompt))


@pytest.mark.parametrize(("arch", "placement"), CASES)
def test_greedy_generation_with_kv_cache_matches_the_base(arch: str, placement: str) -> None:
    base, model, _ = expanded(arch, placement)
    prompt = token_ids(batch=1, seed=1)
    expected = greedy(base, prompt)
    assert expected[0].shape == (1, SEQ_LEN + NEW_TOKENS)
    assert same(greedy(model, prompt), expected)


# --- the checks above can fail -------------------------------------------------------------------


def _matches_base(base: PreTrainedModel, model: PreTrainedModel, folder: Path) -> bool:
    """True only if forward and save + reload reproduce the base exactly, and cached generation after
    the reload does to float32 rounding (:func:`same_after_reload`)."""
    ids, prompt = token_ids(), token_ids(batch=1, seed=1)
    try:
        if not torch.equal(logits(model, ids), logits(base, ids)):
            return False
        model.save_pretrained(folder)
        reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        return torch.equal(logits(reloaded, ids), logits(base, ids)) and same_after_reload(
            greedy(reloaded, prompt), greedy(base, prompt)
        )
    except Exception:  # noqa: BLE001 - a crash is as much a failure to match as a wrong number
        return False


def _append_layer_types_at_the_end(original: Any) -> Any:
    """A wrong _update_config: grows layer_types by appending the new entries instead of inserting."""

    def update(model: PreTrainedModel, registry: BlockRegistry) -> None:
        base_types = list(model.config.layer_types)
        original(model, registry)
        model.config.layer_types = base_types + [base_types[b.source_layer] for b in registry.blocks]

    return update


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
@pytest.mark.parametrize("sabotage", ["not grown", "appended"])
def test_wrong_layer_types_are_detected(
    arch: str, sabotage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if sabotage == "not grown":
        monkeypatch.setattr(expansion, "PER_LAYER_CONFIG_LISTS", ())
    else:
        wrong = _append_layer_types_at_the_end(expansion._update_config)
        monkeypatch.setattr(expansion, "_update_config", wrong)
    base, model, _ = expanded(arch)
    assert not _matches_base(base, model, tmp_path)


def test_wrong_layer_indices_are_detected_by_cached_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(expansion, "_set_layer_index", lambda block, index: None)
    base, model, _ = expanded("llama")
    assert torch.equal(logits(model, token_ids()), logits(base, token_ids()))  # a plain forward can not tell
    prompt = token_ids(batch=1, seed=1)
    try:
        generated = greedy(model, prompt)
    except Exception:  # noqa: BLE001 - the cache may also just crash on the clash
        return
    assert not same(generated, greedy(base, prompt))


def test_the_matcher_accepts_a_correct_expansion(tmp_path: Path) -> None:
    base, model, _ = expanded("gemma3")
    assert _matches_base(base, model, tmp_path)


# --- bypass --------------------------------------------------------------------------------------


def _perturb_new_blocks(model: PreTrainedModel, registry: BlockRegistry, arch: str) -> None:
    """What training does to a new block: its output projections stop being zero."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for block_id in registry.block_ids:
            block = new_block_module(model, registry, block_id)
            for path in OUTPUT_PROJECTIONS[arch]:
                weight = block.get_submodule(path).weight
                weight.add_(torch.randn(weight.shape, generator=generator) * 0.05)


def _layer_objects(model: PreTrainedModel) -> list[nn.Module]:
    return list(decoder_layers(model))


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_bypassing_all_new_blocks_gives_the_base_model(arch: str) -> None:
    base, model, registry = expanded(arch)
    _perturb_new_blocks(model, registry, arch)
    ids = token_ids()
    expected = logits(base, ids)
    assert not torch.equal(logits(model, ids), expected)
    before = _layer_objects(model)
    with bypassed(model, registry):
        assert torch.equal(logits(model, ids), expected)
        assert all(decoder_layers(model)[i] is not before[i] for i in registry.new_layer_indices)
    assert all(a is b for a, b in zip(_layer_objects(model), before, strict=True))
    assert not torch.equal(logits(model, ids), expected)


def test_bypassing_one_block_equals_resetting_it() -> None:
    base, model, registry = expanded("llama")
    _perturb_new_blocks(model, registry, "llama")
    ids = token_ids()
    with bypassed(model, registry, [1]):
        only_block_0 = logits(model, ids)
    with torch.no_grad():
        for path in OUTPUT_PROJECTIONS["llama"]:
            new_block_module(model, registry, 1).get_submodule(path).weight.zero_()
    assert torch.equal(only_block_0, logits(model, ids))
    assert not torch.equal(only_block_0, logits(base, ids))


def test_bypass_restores_the_layers_after_an_exception() -> None:
    _, model, registry = expanded("qwen2")
    before = _layer_objects(model)
    with pytest.raises(RuntimeError, match="inside"), bypassed(model, registry):
        raise RuntimeError("failure inside the context")
    assert all(a is b for a, b in zip(_layer_objects(model), before, strict=True))
    with pytest.raises(ExpansionError, match="unknown block id 5"), bypassed(model, registry, [0, 5]):
        pass
    assert all(a is b for a, b in zip(_layer_objects(model), before, strict=True))


# --- refusals ------------------------------------------------------------------------------------


def _tiny_opt() -> OPTForCausalLM:
    config = OPTConfig(
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
        word_embed_proj_dim=16,
    )
    return OPTForCausalLM(config)


def test_unsupported_architecture_is_named() -> None:
    model = _tiny_opt()
    with pytest.raises(UnsupportedArchitectureError, match="'opt'") as info:
        expand_model(model, plan_expansion(2, 1, "interleave"))
    assert "OPTForCausalLM" in str(info.value)
    assert "llama" in str(info.value)  # and says what is supported
    with pytest.raises(UnsupportedArchitectureError):
        decoder_layers(model)
    assert model.config.num_hidden_layers == 2


def test_expanding_twice_is_refused(tmp_path: Path) -> None:
    _, model, _ = expanded("llama")
    with pytest.raises(ExpansionError, match="already expanded"):
        expand_model(model, plan_expansion(6, 1, "top"))
    assert len(decoder_layers(model)) == 6
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with pytest.raises(ExpansionError, match="already expanded"):
        expand_model(reloaded, plan_expansion(6, 1, "top"))


def test_gpt2_with_inverse_layer_scaling_is_refused() -> None:
    model = build_tiny_model("gpt2", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ExpansionError, match="scales attention"):
        expand_model(model, plan_expansion(4, 2, "interleave"))
    assert len(decoder_layers(model)) == 4
    assert model.config.num_hidden_layers == 4


def test_plan_for_another_layer_count_is_refused() -> None:
    model = build_tiny_model("mistral")
    with pytest.raises(ExpansionError, match="plan is for 5 layers but the model has 4"):
        expand_model(model, plan_expansion(5, 1, "top"))
    assert len(decoder_layers(model)) == 4


def test_quantized_model_is_refused() -> None:
    model = build_tiny_model("llama")
    freeze_base(model, BlockRegistry(BASE_LAYERS, ()), "nf4")
    with pytest.raises(ExpansionError, match="already quantized"):
        expand_model(model, plan_expansion(4, 1, "top"))


def test_unexpanded_model_has_no_registry() -> None:
    with pytest.raises(ExpansionError, match="not expanded"):
        registry_of(build_tiny_model("llama"))
