"""Which dtype each part of a training run computes in: the frozen base's storage and the autocast region."""

from __future__ import annotations

import contextlib

import torch

BASE_DTYPES = ("auto", "float32", "bfloat16")


def resolve_base_dtype(base_dtype: str, device: torch.device) -> torch.dtype:
    """--base-dtype as a torch dtype: "auto" is bf16 on CUDA, fp32 on the CPU."""
    auto = torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"auto": auto, "float32": torch.float32, "bfloat16": torch.bfloat16}[base_dtype]


def autocast(device: torch.device):
    """bf16 autocast on CUDA; the CPU runs in fp32 (bf16 matmuls there are slower and less exact)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
