"""The masked LoRA linear in plain PyTorch: the CPU path and the ground truth for the Triton kernels.

Shapes: x (N, in), W (out, in) frozen, A (r, in), B (out, r), s the LoRA scale, D the dropout
(x_d = x * keep / (1 - p), keep ~ Bernoulli(1 - p) per element of x; keep = None means no dropout).

    forward   y  = x W^T + s * (x_d A^T) B^T        xa = x_d A^T  (N, r), saved for backward
    backward  dX = dY W + s * ((dY B) A) * keep / (1 - p)
              dA = s * (dY B)^T x_d  masked by mask_A          (r, in)
              dB = s * dY^T xa       masked by mask_B          (out, r)

No gradient is ever formed for W. Masked-out gradient entries are set (not multiplied) to zero, so
they are exactly 0.0 even when a neighbouring activation overflows to inf or nan.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def dropped(x: Tensor, keep: Optional[Tensor], p: float) -> Tensor:
    """x_d: x with the dropped elements zeroed and the kept ones scaled by 1 / (1 - p)."""
    return x if keep is None else x * keep / (1.0 - p)


def forward(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    keep: Optional[Tensor] = None,
    p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Return (y, xa). The LoRA term is added into y in place: no second (N, out) tensor exists."""
    xa = dropped(x, keep, p) @ lora_A.t()
    y = x @ weight.t()
    y.addmm_(xa, lora_B.t(), alpha=scale)
    return y, xa


def backward(
    dy: Tensor,
    x: Tensor,
    xa: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    mask_A: Optional[Tensor],
    mask_B: Optional[Tensor],
    keep: Optional[Tensor] = None,
    p: float = 0.0,
    needs: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Return (dX, dA, dB) following the formulas in the module docstring; None where not needed.

    dA and dB are accumulated and returned in fp32 (fp64 for fp64 inputs) whatever the input dtype
    (the caller casts them to the parameter dtype); dX has the dtype of dy.
    """
    need_x, need_A, need_B = needs
    acc = torch.promote_types(dy.dtype, torch.float32)
    dyb = dy @ lora_B  # (N, r)
    dx = da = db = None
    if need_x:
        dx = dy @ weight
        if keep is None:
            dx.addmm_(dyb, lora_A, alpha=scale)
        else:
            dx.add_((dyb @ lora_A) * keep, alpha=scale / (1.0 - p))
    if need_A:
        da = (dyb.t().to(acc) @ dropped(x, keep, p).to(acc)).mul_(scale)
        if mask_A is not None:
            da.masked_fill_(~mask_A, 0.0)
    if need_B:
        # (xa^T dY)^T, not dY^T xa: the GEMM then streams dY along its rows (far faster on the CPU)
        db = (xa.t().to(acc) @ dy.to(acc)).t().contiguous().mul_(scale)
        if mask_B is not None:
            db.masked_fill_(~mask_B, 0.0)
    return dx, da, db
