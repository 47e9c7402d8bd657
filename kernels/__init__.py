"""Fused masked-LoRA linear: y = x W^T + scale * dropout(x) A^T B^T with element-masked dA, dB.

`masked_lora_linear` is the one public entry point; LoRALinear.forward calls it where `use_triton` holds
(CUDA tensors) and writes the same equation out in PyTorch elsewhere. It dispatches to the Triton kernels
(kernels/triton_masked_lora.py) for CUDA tensors and to the PyTorch reference (kernels/reference.py, the
kernels' ground truth) elsewhere; LORAPAR_FORCE_TRITON=1 forces Triton (the tests use it with
TRITON_INTERPRET=1). Formulas and what is saved for backward: reference.py and function.py.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kernels.function import MaskedLoRALinear, use_triton

__all__ = ["masked_lora_linear", "use_triton"]


def _check(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    mask_A: Optional[Tensor],
    mask_B: Optional[Tensor],
    dropout_p: float,
) -> None:
    if weight.requires_grad:
        raise ValueError(
            "masked_lora_linear: the base weight must be frozen (requires_grad=False); "
            "only lora_A and lora_B are trained and no gradient is computed for W"
        )
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(
            f"masked_lora_linear: weight, lora_A, lora_B must be 2-D, got shapes "
            f"{tuple(weight.shape)}, {tuple(lora_A.shape)}, {tuple(lora_B.shape)}"
        )
    out_features, in_features = weight.shape
    rank = lora_A.shape[0]
    expected = {
        "x[-1]": (x.shape[-1:], (in_features,)),
        "lora_A": (lora_A.shape, (rank, in_features)),
        "lora_B": (lora_B.shape, (out_features, rank)),
    }
    for name, (got, want) in expected.items():
        if tuple(got) != want:
            raise ValueError(
                f"masked_lora_linear: {name} has shape {tuple(got)}, expected {want} "
                f"for weight (out={out_features}, in={in_features}) and rank {rank}"
            )
    for name, tensor in (
        ("weight", weight),
        ("lora_A", lora_A),
        ("lora_B", lora_B),
        ("mask_A", mask_A),
        ("mask_B", mask_B),
    ):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"masked_lora_linear: {name} is on {tensor.device}, x on {x.device}")
    for name, mask, param in (("mask_A", mask_A, lora_A), ("mask_B", mask_B, lora_B)):
        if mask is not None and (mask.dtype != torch.bool or mask.shape != param.shape):
            raise ValueError(
                f"masked_lora_linear: {name} must be a bool tensor of shape "
                f"{tuple(param.shape)}, got {mask.dtype} {tuple(mask.shape)}"
            )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"masked_lora_linear: dropout_p must be in [0, 1), got {dropout_p}")


def masked_lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    mask_A: Optional[Tensor] = None,
    mask_B: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """x (..., in) -> (..., out) = x W^T + scale * dropout(x) A^T B^T.

    weight (out, in) is frozen (an error if it requires grad). mask_A (r, in) / mask_B (out, r) are
    bool; None means every element trains. Masked-out entries of lora_A.grad / lora_B.grad are
    exactly zero. Dropout (on the LoRA branch only, as in peft) applies when `training` is True.
    Under autocast every operand is cast to the autocast dtype (gradients flow back to the fp32
    parameters through the cast); otherwise all operands must share x's dtype.
    """
    _check(x, weight, lora_A, lora_B, mask_A, mask_B, dropout_p)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, lora_A, lora_B = (t.to(dtype) for t in (x, weight, lora_A, lora_B))
    elif not x.dtype == weight.dtype == lora_A.dtype == lora_B.dtype:
        raise ValueError(
            f"masked_lora_linear: x, weight, lora_A, lora_B must share one dtype outside "
            f"autocast, got {x.dtype}, {weight.dtype}, {lora_A.dtype}, {lora_B.dtype}"
        )
    leading = x.shape[:-1]
    p = float(dropout_p) if training else 0.0
    with torch.autocast(device_type, enabled=False):
        y = MaskedLoRALinear.apply(x.reshape(-1, x.shape[-1]), weight, lora_A, lora_B, float(scale), mask_A, mask_B, p)
    return y.reshape(*leading, weight.shape[0])
