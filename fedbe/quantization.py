"""The frozen base: original blocks, embeddings and head held in 4-bit, 8-bit, 16-bit or fp32.

Only the base is quantized; the new blocks stay float32 and are the only trainable parameters.
4-bit (NF4) and 8-bit use bitsandbytes, on CUDA and on CPU. Whether they actually run is tried
on a tiny layer (:func:`probe_precision`), not assumed from the platform; where they do not run
(e.g. PyPI's bitsandbytes on a Jetson) the base falls back to 16-bit with a warning saying why.

The residual stream between blocks is float32. A 16-bit part of the base casts its inputs to its
own dtype and its output back (forward hooks), so a 16-bit base and float32 new blocks compose
without autocast. bitsandbytes layers do that cast themselves.

A CPU without native 16-bit matmuls (AVX2 only: no AVX512 or AMX) multiplies bf16 matrices 40-50
times slower than float32 ones. There a 16-bit base keeps its 16-bit weights (the memory saving)
but its linear layers multiply in float32 (:func:`fp32_matmuls`): inputs and weights are widened,
multiplied with float32 accumulation and the product rounded back to 16 bits, which is what a
native bf16 matmul does up to the order of the sums; bitsandbytes layers get a float32 compute
dtype there for the same reason (:func:`default_compute_dtype`).

Trap avoided: on CPUs with AVX512-BF16, a bitsandbytes ``Linear4bit`` in eval mode that
sees an input without grad repacks its weight in place for an inference path with no autograd,
after which gradients through it are wrong. Every ``Linear4bit`` made here has that path disabled.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from fedbe.errors import QuantizationError
from fedbe.expansion import BlockRegistry, base_layer_modules, decoder_layers

log = logging.getLogger(__name__)

RESIDUAL_DTYPE = torch.float32


class Precision(str, Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    NF4 = "nf4"
    INT8 = "int8"

    @property
    def quantized(self) -> bool:
        return self in (Precision.NF4, Precision.INT8)

    @classmethod
    def parse(cls, value: str | Precision) -> Precision:
        try:
            return cls(value)
        except ValueError:
            raise QuantizationError(
                f"unknown base precision {value!r}; choose one of {', '.join(p.value for p in cls)}"
            ) from None


@dataclass(frozen=True)
class FrozenBase:
    """What :func:`freeze_base` did: the precision asked for, the one in effect, and why they differ."""

    requested: Precision
    precision: Precision
    device: str
    storage_dtype: torch.dtype  # of embeddings/head (and 16-bit blocks)
    compute_dtype: torch.dtype | None  # of bitsandbytes matmuls
    fallback_reason: str | None = None


def _bnb() -> Any:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes as bnb  # noqa: PLC0415 - optional dependency, imported on use

    return bnb


def half_dtype(device: str | torch.device) -> torch.dtype:
    """The 16-bit dtype to store a frozen base in on this device."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


HALF_MATMUL_ENV = "FEDBE_HALF_MATMUL"  # "native" or "fp32": overrides native_half_matmul's answer


def native_half_matmul(dtype: torch.dtype, device: str = "cpu") -> bool:
    """Whether ``device`` multiplies ``dtype`` (bf16 or fp16) matrices at native speed.

    Always on CUDA. On a CPU, what oneDNN reports (AVX512 or AMX): without it PyTorch falls back to
    a scalar 16-bit matmul (on an AVX2 EPYC, 47x slower than float32 for bf16). ``FEDBE_HALF_MATMUL``
    set to ``native`` or ``fp32`` overrides the answer.
    """
    forced = os.environ.get(HALF_MATMUL_ENV, "").strip().lower()
    if forced in ("native", "fp32"):
        return forced == "native"
    if forced:
        raise QuantizationError(f"{HALF_MATMUL_ENV}={forced!r} is not understood: set it to native (16-bit "
                                "matmuls) or fp32 (16-bit weights multiplied in float32), or unset it")  # fmt: skip
    if torch.device(device).type != "cpu":
        return True
    return _cpu_native_half_matmul(dtype)


@lru_cache(maxsize=4)
def _cpu_native_half_matmul(dtype: torch.dtype) -> bool:
    checks = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}
    check = checks.get(dtype)
    if check is None:
        return True
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):  # a torch without the check: assume the slow path
        return False


def default_compute_dtype(device: str | torch.device) -> torch.dtype:
    """bitsandbytes compute dtype: 16-bit where this device multiplies it natively (fastest NF4 mode on
    AVX512-BF16 CPUs and GPUs), else float32 (16-bit matmuls would be the slow scalar path)."""
    half = half_dtype(device)
    return half if native_half_matmul(half, str(torch.device(device))) else torch.float32


class _WideLinear(torch.autograd.Function):
    """``linear(x, w, b)`` for 16-bit x and frozen 16-bit w, b, multiplied in float32.

    Saves only the 16-bit weight for backward (no float32 copy lives between forward and backward),
    and gives the input's gradient in the input's dtype, as a native 16-bit linear does.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.input_dtype = x.dtype
        wide_bias = None if bias is None else bias.float()
        return nn.functional.linear(x.float(), weight.float(), wide_bias).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return (grad.float() @ weight.float()).to(ctx.input_dtype), None, None


def _trains_itself(layer: nn.Linear | Conv1D) -> bool:
    """A layer whose own weight or bias trains takes its class's usual forward (``_WideLinear`` gives
    gradients to the input only)."""
    return layer.weight.requires_grad or (layer.bias is not None and layer.bias.requires_grad)


class Fp32MatmulLinear(nn.Linear):
    """An ``nn.Linear`` with frozen 16-bit weights that multiplies in float32 (see :func:`fp32_matmuls`)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear's signature
        if _trains_itself(self):
            return super().forward(input)
        return _WideLinear.apply(input, self.weight, self.bias)


class Fp32MatmulConv1D(Conv1D):
    """GPT-2's ``Conv1D`` (weight stored in x out) with frozen 16-bit weights, multiplied in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _trains_itself(self):
            return super().forward(x)
        return _WideLinear.apply(x, self.weight.t(), self.bias)


def fp32_matmuls(module: nn.Module, device: str | torch.device = "cpu") -> int:
    """Make the 16-bit linear layers in ``module`` multiply in float32 where ``device`` has no native
    16-bit matmul (:func:`native_half_matmul`); a no-op elsewhere. Weights, names and state dicts are
    unchanged (the layers keep their class's parameters; ``isinstance(m, nn.Linear)`` still holds).
    Returns how many layers were switched."""
    switched = 0
    dev = str(torch.device(device))
    for sub in module.modules():
        kind = type(sub)
        if kind not in (nn.Linear, Conv1D):
            continue
        weight = sub.weight
        if not isinstance(weight, torch.Tensor) or weight.dtype not in (torch.bfloat16, torch.float16):
            continue
        if native_half_matmul(weight.dtype, dev):
            continue
        sub.__class__ = Fp32MatmulLinear if kind is nn.Linear else Fp32MatmulConv1D
        switched += 1
    return switched


@lru_cache(maxsize=16)
def probe_precision(precision: Precision, device: str = "cpu") -> str | None:
    """Try forward and backward through a tiny quantized layer on ``device``.

    Returns None when it works, else the reason it does not (import error, missing kernel, ...).
    """
    precision = Precision.parse(precision)
    if not precision.quantized:
        return None
    try:
        lin = nn.Linear(128, 64)
        q = _quantized_linear(lin.weight.data, lin.bias.data, precision, torch.device(device), torch.float32)
        x = torch.randn(4, 128, device=device, requires_grad=True)
        y = q(x)
        y.float().sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all() or not torch.isfinite(y).all():
            return f"{precision.value} layer on {device} gave non-finite output or no input gradient"
        ref = nn.functional.linear(x.detach(), lin.weight.to(device), lin.bias.to(device))
        err = (y.detach().float() - ref).norm() / ref.norm()
        if err > 0.2:
            return f"{precision.value} layer on {device} is numerically wrong (relative error {err:.2f})"
        return None
    except Exception as exc:  # noqa: BLE001 - any failure of the probe is a reason to fall back
        return f"{precision.value} via bitsandbytes does not run on {device}: {type(exc).__name__}: {exc}"


def _quantized_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    precision: Precision,
    device: torch.device,
    compute_dtype: torch.dtype,
) -> nn.Module:
    bnb = _bnb()
    out_features, in_features = weight.shape
    module: nn.Module
    if precision is Precision.NF4:
        module = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=bias is not None,
            compute_dtype=compute_dtype,
            quant_type="nf4",
            device="meta",
        )
        module.weight = bnb.nn.Params4bit(
            weight.detach().clone(), requires_grad=False, quant_type="nf4", module=module
        )
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            raise QuantizationError(
                "this bitsandbytes version has no Linear4bit.support_avx512bf16_for_cpu, the switch fedbe turns "
                "off because the eval-mode CPU repack it guards computes wrong gradients; install the "
                "bitsandbytes version of requirements.lock, or check that tests/fedbe/test_quantization.py's "
                "gradient comparison passes with this one before adapting fedbe.quantization"
            )
        setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010 - repack has no autograd: never take it
    elif precision is Precision.INT8:
        module = bnb.nn.Linear8bitLt(
            in_features,
            out_features,
            bias=bias is not None,
            has_fp16_weights=False,
            threshold=6.0,
            device="meta",
        )
        module.weight = bnb.nn.Int8Params(
            weight.detach().clone(), requires_grad=False, has_fp16_weights=False
        )
    else:
        raise QuantizationError(f"{precision.value} is not a quantized precision")
    if bias is not None:
        # Linear4bit casts its bias to the compute dtype in place on the first forward; store it in
        # that dtype from the start so the frozen base never changes after freeze_base.
        bias_dtype = compute_dtype if precision is Precision.NF4 else torch.float32
        module.bias = nn.Parameter(bias.detach().clone().to(bias_dtype), requires_grad=False)
    return module.to(device)  # bitsandbytes quantizes on .to(device), on CPU too


def freeze_base(
    model: PreTrainedModel,
    registry: BlockRegistry,
    precision: Precision | str = Precision.FP32,
    device: str = "cpu",
    compute_dtype: torch.dtype | None = None,
) -> FrozenBase:
    """Freeze every parameter and hold the base (not the new blocks) in ``precision`` on ``device``.

    Afterwards no parameter requires grad; :func:`fedbe.blocks.set_trainable` opens the assigned
    new blocks. Falls back to a 16-bit base, with a warning, when bitsandbytes can not run here.
    """
    requested = Precision.parse(precision)
    dev = torch.device(device)
    actual = requested
    reason = probe_precision(requested, str(dev)) if requested.quantized else None
    if reason is not None:
        actual = Precision.BF16 if half_dtype(dev) == torch.bfloat16 else Precision.FP16
        log.warning(
            "base precision %s unavailable, using %s instead: %s", requested.value, actual.value, reason
        )
    storage = {
        Precision.FP32: torch.float32,
        Precision.BF16: torch.bfloat16,
        Precision.FP16: torch.float16,
    }.get(actual, half_dtype(dev))
    compute = compute_dtype or default_compute_dtype(dev)
    model.requires_grad_(False)
    model.to(dev)  # type: ignore[arg-type]
    if actual is not Precision.FP32:
        for layer in base_layer_modules(model, registry):
            if actual.quantized:
                _quantize_linears(layer, actual, dev, compute)
            else:
                layer.to(storage)
                fp32_matmuls(layer, dev)
                _add_dtype_boundary(layer, storage, cast_inputs=True)
        _store_outside_layers_in(model, storage, dev)
    return FrozenBase(requested, actual, str(dev), storage, compute if actual.quantized else None, reason)


def _quantize_linears(
    layer: nn.Module, precision: Precision, device: torch.device, compute: torch.dtype
) -> None:
    for name, child in list(layer.named_children()):
        if isinstance(child, nn.Linear):
            setattr(layer, name, _quantized_linear(child.weight, child.bias, precision, device, compute))
        elif isinstance(child, Conv1D):  # GPT-2 stores (in, out): transpose to nn.Linear's (out, in)
            setattr(layer, name, _quantized_linear(child.weight.t(), child.bias, precision, device, compute))
        else:
            _quantize_linears(child, precision, device, compute)


def _store_outside_layers_in(model: PreTrainedModel, dtype: torch.dtype, device: torch.device) -> None:
    """Embeddings and head in ``dtype`` (the head multiplying in float32 where ``device`` has no native
    ``dtype`` matmul); the residual stream they feed or read stays float32."""
    in_layers = {id(m) for m in decoder_layers(model).modules()}
    for module in model.modules():
        if id(module) not in in_layers and isinstance(module, nn.Embedding):
            module.to(dtype)
            _add_dtype_boundary(module, dtype, cast_inputs=False)
    head = model.get_output_embeddings()
    if head is not None:
        head.to(dtype)
        fp32_matmuls(head, device)
        _add_dtype_boundary(head, dtype, cast_inputs=True)


def _add_dtype_boundary(module: nn.Module, dtype: torch.dtype, *, cast_inputs: bool) -> None:
    if cast_inputs:
        module.register_forward_pre_hook(_caster(dtype), with_kwargs=True)
    module.register_forward_hook(lambda _m, _args, output: _cast(output, RESIDUAL_DTYPE))


def _caster(dtype: torch.dtype) -> Callable[..., tuple[Any, Any]]:
    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        return _cast(args, dtype), _cast(kwargs, dtype)

    return hook


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The float32 weight a bitsandbytes layer computes with (for reference checks and exports)."""
    bnb = _bnb()
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        return module.weight.data.float() * _int8_scales(module).float().unsqueeze(1) / 127.0
    raise QuantizationError(f"{type(module).__name__} is not a bitsandbytes layer")


def _int8_scales(module: nn.Module) -> torch.Tensor:
    """Row scales of a Linear8bitLt: on the weight until the first forward, then on ``module.state``."""
    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if scb is None:
        raise QuantizationError("int8 layer has no row scales (SCB); was it quantized with .to(device)?")
    return scb


def module_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers as stored (packed 4-bit counted correctly)."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    total += sum(b.numel() * b.element_size() for b in module.buffers())
    for sub in module.modules():
        state = getattr(getattr(sub, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "absmax", None) is not None:
            total += state.absmax.numel() * state.absmax.element_size()
        bnb = sys.modules.get("bitsandbytes")
        if bnb is not None and isinstance(sub, bnb.nn.Linear8bitLt):
            scb = _int8_scales(sub)
            total += scb.numel() * scb.element_size()
    return total
