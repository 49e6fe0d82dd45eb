"""The frozen base: precisions, exact identity of fresh new blocks, and gradients that are right."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.nn.modules import has_avx512bf16
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

import fedbe.quantization as quantization
from fedbe.blocks import set_trainable
from fedbe.errors import QuantizationError
from fedbe.expansion import (
    BlockRegistry,
    bypassed,
    decoder_layers,
    expand_model,
    new_block_module,
    plan_expansion,
)
from fedbe.quantization import (
    HALF_MATMUL_ENV,
    Fp32MatmulConv1D,
    Fp32MatmulLinear,
    FrozenBase,
    Precision,
    default_compute_dtype,
    dequantized_weight,
    fp32_matmuls,
    freeze_base,
    module_bytes,
    native_half_matmul,
    probe_precision,
)
from fedbe.sources import build_tiny_model

PRECISIONS = ["fp32", "bf16", "fp16", "nf4", "int8"]
# Linear projections per decoder block, counted from the tiny configs by hand.
PROJECTIONS = {"llama": 7, "qwen2": 7, "gpt2": 4}  # q k v o gate up down / c_attn c_proj c_fc c_proj
# Relative error of the logits against the float32 model: generous bounds for each storage format.
TOLERANCE = {"fp32": 0.0, "bf16": 0.03, "fp16": 0.01, "int8": 0.05, "nf4": 0.35}
NEW_LAYERS = (2, 5)  # 2 interleaved blocks in a 4-layer model


def token_ids(length: int = 24, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def expanded(arch: str = "llama") -> tuple[PreTrainedModel, BlockRegistry]:
    model = build_tiny_model(arch, seed=0)
    registry = expand_model(model, plan_expansion(4, 2, "interleave"))
    assert registry.new_layer_indices == NEW_LAYERS
    return model, registry


def frozen(arch: str, precision: str, **kwargs: object) -> tuple[PreTrainedModel, BlockRegistry, FrozenBase]:
    model, registry = expanded(arch)
    return model, registry, freeze_base(model, registry, precision, **kwargs)  # type: ignore[arg-type]


def logits(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def bnb_modules(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if type(m).__module__.startswith("bitsandbytes")]


# --- precisions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_freeze_base(arch: str, precision: str) -> None:
    reference, _ = expanded(arch)
    ids = token_ids()
    expected = logits(reference, ids)
    model, registry, info = frozen(arch, precision)
    assert (info.requested, info.precision, info.fallback_reason) == (Precision(precision),) * 2 + (None,)
    assert not any(p.requires_grad for p in model.parameters())

    for block_id in registry.block_ids:
        block = new_block_module(model, registry, block_id)
        assert {p.dtype for p in block.parameters()} == {torch.float32}
        assert not bnb_modules(block)

    expected_kind = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}.get(precision)
    storage = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    for index, layer in enumerate(decoder_layers(model)):
        if index in registry.new_layer_indices:
            continue
        quantized = bnb_modules(layer)
        if expected_kind is None:
            assert not quantized
        else:
            assert len(quantized) == PROJECTIONS[arch]
            assert all(isinstance(m, expected_kind) for m in quantized)
            assert not any(
                isinstance(m, nn.Linear | Conv1D) and not isinstance(m, expected_kind)
                for m in layer.modules()
            )
        if storage is not None:
            assert {p.dtype for p in layer.parameters()} == {storage}

    out = logits(model, ids)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    error = relative_error(out, expected)
    assert error <= TOLERANCE[precision]
    if precision != "fp32":
        assert error > 0  # the base really is held in another format


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_quantized_base_is_smaller(arch: str) -> None:
    sizes = {p: module_bytes(frozen(arch, p)[0]) for p in ("fp32", "bf16", "int8", "nf4")}
    fp32_model, _ = expanded(arch)
    buffers = sum(b.numel() * b.element_size() for b in fp32_model.buffers())  # e.g. rotary frequencies
    assert sizes["fp32"] == 4 * sum(p.numel() for p in fp32_model.parameters()) + buffers
    assert sizes["nf4"] < sizes["int8"] < sizes["bf16"] < sizes["fp32"]
    # A base layer alone: 4-bit weights plus per-64 scales against 32-bit weights (norms stay float32).
    fp32_layer = decoder_layers(frozen(arch, "fp32")[0])[0]
    nf4_layer = decoder_layers(frozen(arch, "nf4")[0])[0]
    assert module_bytes(nf4_layer) < 0.2 * module_bytes(fp32_layer)


def test_int8_bookkeeping_survives_a_forward() -> None:
    model, _, _ = frozen("llama", "int8")
    layer = decoder_layers(model)[0].self_attn.q_proj
    weight, size = dequantized_weight(layer), module_bytes(model)
    logits(model, token_ids())
    assert module_bytes(model) == size
    assert torch.equal(dequantized_weight(layer), weight)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("precision", ["nf4", "int8", "bf16"])
def test_fresh_new_blocks_are_exactly_identity_on_a_quantized_base(arch: str, precision: str) -> None:
    model, registry, _ = frozen(arch, precision)
    ids = token_ids()
    with_blocks = logits(model, ids)
    with bypassed(model, registry):
        without_blocks = logits(model, ids)
    assert torch.equal(with_blocks, without_blocks)


# --- the gradient trap: bitsandbytes' CPU eval-mode repack computes wrong gradients -------------


def _dequantized_reference(
    fp32_copy: PreTrainedModel, quantized: PreTrainedModel, registry: BlockRegistry
) -> PreTrainedModel:
    """``fp32_copy`` with every base weight replaced by the weight the quantized layer computes with.

    Embeddings are taken from the quantized model too (they are stored in 16 bits there); the head
    is not used by the loss below.
    """
    reference = copy.deepcopy(fp32_copy)
    replaced = 0
    with torch.no_grad():
        for index, layer in enumerate(decoder_layers(quantized)):
            if index in registry.new_layer_indices:
                continue
            for name, module in layer.named_modules():
                if isinstance(module, bnb.nn.Linear4bit):
                    target = decoder_layers(reference)[index].get_submodule(name)
                    weight = dequantized_weight(module)
                    # GPT-2's Conv1D keeps (in, out); the quantized layer holds nn.Linear's (out, in).
                    target.weight.copy_(weight.t() if isinstance(target, Conv1D) else weight)
                    replaced += 1
        for name, module in quantized.named_modules():
            if isinstance(module, nn.Embedding):
                reference.get_submodule(name).weight.copy_(module.weight.float())
    assert replaced == 4 * len(bnb_modules(decoder_layers(quantized)[0]))
    reference.requires_grad_(False)
    return reference.eval()


def _block_gradients(
    model: PreTrainedModel, registry: BlockRegistry, block_ids: list[int], ids: torch.Tensor
) -> dict[int, torch.Tensor]:
    """Train-like step on ``block_ids``: a loss on the last hidden state, backward, flat grads per block."""
    set_trainable(model, registry, block_ids)
    hidden = model.base_model(ids).last_hidden_state
    target = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1))
    ((hidden - target) ** 2).mean().backward()
    grads = {}
    for block_id in block_ids:
        params = list(new_block_module(model, registry, block_id).parameters())
        assert all(p.grad is not None for p in params)
        grads[block_id] = torch.cat([p.grad.flatten() for p in params])  # type: ignore[union-attr]
    return grads


def _trap_errors(arch: str, compute_dtype: torch.dtype | None, *, disable_guard: bool = False) -> list[float]:
    model, registry = expanded(arch)
    fp32_copy = copy.deepcopy(model)
    freeze_base(model, registry, "nf4", compute_dtype=compute_dtype)
    reference = _dequantized_reference(fp32_copy, model, registry)
    linear4bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4bit and not any(m.support_avx512bf16_for_cpu for m in linear4bit)  # the guard is on
    if disable_guard:
        for module in linear4bit:
            module.support_avx512bf16_for_cpu = True
    ids = token_ids(length=16)
    model.eval()  # what from_pretrained and evaluation leave behind ...
    logits(model, ids)  # ... and a no-grad forward: where bitsandbytes would repack the weights in place
    got = _block_gradients(model, registry, [0, 1], ids)
    want = _block_gradients(reference, registry, [0, 1], ids)
    return [relative_error(got[b], want[b]) for b in (0, 1)]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize(("compute_dtype", "bound"), [(torch.float32, 1e-3), (None, 5e-2)])
def test_gradients_through_nf4_base_match_dequantized_reference(
    arch: str, compute_dtype: torch.dtype | None, bound: float
) -> None:
    errors = _trap_errors(arch, compute_dtype)
    assert max(errors) < bound, errors


@pytest.mark.skipif(not has_avx512bf16(), reason="the in-place repack only happens on AVX512-BF16 CPUs")
def test_gradient_check_detects_the_repack_trap() -> None:
    # llama: bitsandbytes' repacked path crashes outright on layers with a bias, hiding nothing.
    errors = _trap_errors("llama", torch.float32, disable_guard=True)
    assert max(errors) > 0.1, errors


# --- where gradients go --------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "nf4"])
@pytest.mark.parametrize("block_id", [0, 1])
def test_only_the_assigned_block_gets_gradients(precision: str, block_id: int) -> None:
    model, registry, _ = frozen("llama", precision)
    params = set_trainable(model, registry, [block_id])
    own = {id(p) for p in new_block_module(model, registry, block_id).parameters()}
    assert {id(p) for p in params} == own
    model(token_ids(), labels=token_ids()).loss.backward()
    for name, param in model.named_parameters():
        if id(param) in own:
            assert param.grad is not None and param.requires_grad, name
        else:
            assert param.grad is None and not param.requires_grad, name
    assert any(p.grad.abs().sum() > 0 for p in params if p.grad is not None)


@contextmanager
def _outputs_require_grad(model: PreTrainedModel) -> Iterator[list[bool]]:
    """Context: record, per decoder layer in stack order, whether its output is part of the graph."""
    seen: list[bool] = []

    def hook(_module: nn.Module, _args: object, output: object) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        assert isinstance(hidden, torch.Tensor)
        seen.append(hidden.requires_grad)

    handles = [layer.register_forward_hook(hook) for layer in decoder_layers(model)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("precision", ["fp32", "nf4"])
@pytest.mark.parametrize(
    ("block_ids", "in_graph"),
    [
        ([0], [False, False, True, True, True, True]),  # block 0 is layer 2
        ([1], [False, False, False, False, False, True]),  # block 1 is layer 5
        ([0, 1], [False, False, True, True, True, True]),
        ([], [False] * 6),
    ],
)
def test_backprop_stops_at_the_lowest_trainable_block(
    precision: str, block_ids: list[int], in_graph: list[bool]
) -> None:
    model, registry, _ = frozen("llama", precision)
    set_trainable(model, registry, block_ids)
    with _outputs_require_grad(model) as seen:
        model(token_ids())
    assert seen == in_graph


def _bytes_saved_for_backward(model: PreTrainedModel, registry: BlockRegistry, block_ids: list[int]) -> int:
    set_trainable(model, registry, block_ids)
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(token_ids(), labels=token_ids())
    return sum(saved)


@pytest.mark.parametrize("precision", ["fp32", "nf4"])
def test_training_the_top_block_keeps_fewer_activations(precision: str) -> None:
    model, registry, _ = frozen("llama", precision)
    nothing = _bytes_saved_for_backward(model, registry, [])
    top = _bytes_saved_for_backward(model, registry, [1])
    bottom = _bytes_saved_for_backward(model, registry, [0])
    assert nothing == 0
    assert 0 < top < bottom


# --- training leaves the base alone --------------------------------------------------------------


def _snapshot(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as stored (packed 4-bit data included) and every 4-bit quant state."""
    tensors = {f"param {n}": p.data.clone() for n, p in model.named_parameters()}
    tensors.update({f"buffer {n}": b.clone() for n, b in model.named_buffers()})
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            for key, value in state.as_dict(packed=True).items():
                tensors[f"quant_state {name} {key}"] = value.clone()
    return tensors


def _unchanged(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize(
    ("arch", "precision", "block_ids"),
    [
        ("llama", "nf4", [1]),
        ("llama", "nf4", [0, 1]),
        ("qwen2", "int8", [0]),
        pytest.param("qwen2", "nf4", [0]),
    ],
)
def test_training_changes_only_the_assigned_blocks(arch: str, precision: str, block_ids: list[int]) -> None:
    model, registry, _ = frozen(arch, precision)
    before = _snapshot(model)
    assert any(key.startswith("quant_state") for key in before) == (precision == "nf4")
    params = set_trainable(model, registry, block_ids)
    trained = {f"param {n}" for n, p in model.named_parameters() if any(p is q for q in params)}
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = token_ids(length=16, batch=1)
    model.train()
    losses = []
    for _ in range(20):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    after = _snapshot(model)
    assert after.keys() == before.keys()
    changed = {key for key in before if not _unchanged(before[key], after[key])}
    assert changed - trained == set()
    assert trained - changed == set()  # every tensor of the assigned blocks moved


# --- probing and fallback ------------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_runs_on_this_cpu(precision: str) -> None:
    assert probe_precision(Precision(precision), "cpu") is None


def test_probe_reports_why_a_precision_does_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> nn.Module:
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(quantization, "_quantized_linear", broken)
    reason = probe_precision.__wrapped__(Precision.NF4, "cpu")
    assert reason is not None
    assert "nf4" in reason and "RuntimeError: no kernel for this device" in reason


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(QuantizationError, match="unknown base precision 'fp8'"):
        Precision.parse("fp8")
    model, registry = expanded()
    with pytest.raises(QuantizationError, match="nf4"):
        freeze_base(model, registry, "int4")


def test_falls_back_to_16_bits_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    reason = "bitsandbytes kernels do not run on this test device"
    monkeypatch.setattr(quantization, "probe_precision", lambda precision, device="cpu": reason)
    reference, _ = expanded()
    model, registry = expanded()
    with caplog.at_level(logging.WARNING, logger="fedbe.quantization"):
        info = freeze_base(model, registry, "nf4")
    assert info.requested is Precision.NF4
    assert info.precision is Precision.BF16
    assert info.fallback_reason == reason
    assert info.storage_dtype == torch.bfloat16 and info.compute_dtype is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "fedbe.quantization"]
    assert len(warnings) == 1
    assert reason in warnings[0].getMessage() and "nf4" in warnings[0].getMessage()
    assert not bnb_modules(model)
    assert {p.dtype for p in decoder_layers(model)[0].parameters()} == {torch.bfloat16}
    ids = token_ids()
    out = logits(model, ids)
    assert torch.isfinite(out).all()
    assert relative_error(out, logits(reference, ids)) < TOLERANCE["bf16"]


# --- 16-bit weights multiplied in float32 (CPUs without native 16-bit matmuls) --------------------


def _wide_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (Fp32MatmulLinear, Fp32MatmulConv1D))]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fp32_matmuls_compute_what_native_16_bit_matmuls_do(
    arch: str, precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(HALF_MATMUL_ENV, "native")
    native, registry, _ = frozen(arch, precision)
    monkeypatch.setenv(HALF_MATMUL_ENV, "fp32")
    wide, _, _ = frozen(arch, precision)
    assert not _wide_modules(native)
    # every projection of the 4 base layers, and the head
    assert len(_wide_modules(wide)) == 4 * PROJECTIONS[arch] + 1
    assert {k: (v.dtype, v.shape) for k, v in wide.state_dict().items()} == {
        k: (v.dtype, v.shape) for k, v in native.state_dict().items()
    }
    ids = token_ids()
    assert relative_error(logits(wide, ids), logits(native, ids)) < 1e-2
    for name in ("q_proj", "c_attn"):  # still a plain Linear / Conv1D to PEFT and to isinstance checks
        found = [m for n, m in wide.named_modules() if n.endswith(name)]
        assert all(isinstance(m, (nn.Linear, Conv1D)) for m in found)
    got = _block_gradients(wide, registry, [0, 1], ids)
    want = _block_gradients(native, registry, [0, 1], ids)
    assert max(relative_error(got[b], want[b]) for b in (0, 1)) < 2e-2
    assert relative_error(copy.deepcopy(wide)(ids).logits.detach(), logits(wide, ids)) == 0.0


def test_fp32_matmul_linear_trains_its_own_weight_the_usual_way(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HALF_MATMUL_ENV, "fp32")
    layer = nn.Linear(8, 4).to(torch.bfloat16)
    assert fp32_matmuls(layer) == 1 and isinstance(layer, Fp32MatmulLinear)
    x = torch.randn(3, 8, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()  # weight requires grad: the native path, gradients for both
    assert layer.weight.grad is not None and x.grad is not None
    layer.requires_grad_(False)
    x.grad = None
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    want = layer.weight.float().sum(0).expand(3, 8)  # d(sum(x W^T))/dx
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    assert relative_error(x.grad.float(), want) < 1e-2


def test_half_matmul_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HALF_MATMUL_ENV, "native")
    assert native_half_matmul(torch.bfloat16) and default_compute_dtype("cpu") == torch.bfloat16
    assert fp32_matmuls(nn.Linear(8, 4).to(torch.bfloat16)) == 0
    monkeypatch.setenv(HALF_MATMUL_ENV, "fp32")
    assert not native_half_matmul(torch.bfloat16) and default_compute_dtype("cpu") == torch.float32
    assert fp32_matmuls(nn.Linear(8, 4)) == 0  # float32 layers are left alone
    monkeypatch.setenv(HALF_MATMUL_ENV, "fast")
    with pytest.raises(QuantizationError, match="FEDBE_HALF_MATMUL='fast'.*native.*fp32"):
        native_half_matmul(torch.bfloat16)
    monkeypatch.delenv(HALF_MATMUL_ENV)
    # without the override: what oneDNN says about this CPU
    assert native_half_matmul(torch.bfloat16) == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
