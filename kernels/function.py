"""The autograd Function of the masked LoRA linear and the choice between Triton and PyTorch.

Formulas: kernels/reference.py (module docstring). What is saved for backward: x (the layer input,
which the surrounding graph mostly keeps alive anyway: the norm output feeding q/k/v or gate/up; the
down projection's input is rebuilt in backward instead, see lorapar.model.FeedForward), xa = x_d A^T
(N, r) and the frozen W, A, B, masks (references, not copies). Dropout costs one bool (N, in) `keep` tensor on
the PyTorch path; the Triton path saves a 31-bit seed and regenerates the same Philox stream in
every kernel instead. No (N, out) tensor is saved.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from kernels import reference

_FORCE_TRITON_ENV = "LORAPAR_FORCE_TRITON"
_triton_module: Optional[ModuleType] = None
_triton_error: Optional[BaseException] = None


def triton_kernels() -> Optional[ModuleType]:
    """kernels.triton_masked_lora, imported on first use, or None when Triton cannot be imported.

    Lazy because Triton decides at decoration time whether a kernel is interpreted
    (TRITON_INTERPRET=1, the CPU tests) or compiled, so the env var must be set before this runs.
    """
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        try:
            _triton_module = importlib.import_module("kernels.triton_masked_lora")
        except ImportError as error:
            _triton_error = error
    return _triton_module


def use_triton(x: Tensor) -> bool:
    """Triton for CUDA tensors when importable; LORAPAR_FORCE_TRITON=1 forces it (an error if absent)."""
    if os.environ.get(_FORCE_TRITON_ENV, "") == "1":
        if triton_kernels() is None:
            raise RuntimeError(f"{_FORCE_TRITON_ENV}=1 but Triton cannot be imported: {_triton_error}")
        if not x.is_cuda and not triton_kernels().INTERPRET:
            raise RuntimeError(
                f"{_FORCE_TRITON_ENV}=1 with {x.device} tensors needs TRITON_INTERPRET=1 set "
                f"before the first Triton kernel is imported"
            )
        return True
    return x.is_cuda and triton_kernels() is not None


class MaskedLoRALinear(torch.autograd.Function):
    """y = x W^T + scale * dropout(x) A^T B^T for 2-D x, all floating tensors of one dtype.

    W receives no gradient; dA and dB are accumulated in fp32, masked, and cast to the dtype of A, B.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        lora_A: Tensor,
        lora_B: Tensor,
        scale: float,
        mask_A: Optional[Tensor],
        mask_B: Optional[Tensor],
        p: float,
    ) -> Tensor:
        ctx.scale, ctx.p, ctx.triton = scale, p, use_triton(x)
        keep = None
        if ctx.triton:
            ctx.seed = int(torch.randint(2**31 - 1, (1,)).item()) if p > 0 else 0
            y, xa = triton_kernels().forward(x, weight, lora_A, lora_B, scale, p, ctx.seed)
        else:
            if p > 0:
                keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p)
            y, xa = reference.forward(x, weight, lora_A, lora_B, scale, keep, p)
        ctx.save_for_backward(x, xa, weight, lora_A, lora_B, mask_A, mask_B, keep)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, xa, weight, lora_A, lora_B, mask_A, mask_B, keep = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        dy = dy.contiguous()
        with torch.autocast(dy.device.type, enabled=False):  # backward may run inside the forward's autocast
            dx, da, db = MaskedLoRALinear._grads(ctx, dy, x, xa, weight, lora_A, lora_B, mask_A, mask_B, keep, needs)
        da = None if da is None else da.to(lora_A.dtype)
        db = None if db is None else db.to(lora_B.dtype)
        return dx, None, da, db, None, None, None, None

    @staticmethod
    def _grads(ctx, dy, x, xa, weight, lora_A, lora_B, mask_A, mask_B, keep, needs):
        if ctx.triton:
            return triton_kernels().backward(
                dy, x, xa, weight, lora_A, lora_B, ctx.scale, mask_A, mask_B, ctx.p, ctx.seed, needs
            )
        return reference.backward(dy, x, xa, weight, lora_A, lora_B, ctx.scale, mask_A, mask_B, keep, ctx.p, needs)
