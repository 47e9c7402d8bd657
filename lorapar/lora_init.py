"""How a LoRA adapter's A and B are drawn: the settings (LoraInit, declared once; LoraArgs and score.py's
ImportanceArgs inherit them) and the initial factors of each init, which LoRALinear.reset_lora applies.

Inits (LoraInit.init):
  lora      A ~ Kaiming-uniform(a=sqrt(5)) as peft does, B = 0: the model is unchanged at start.
  gaussian  A, B ~ N(0, init_std^2): LoRA-PAR scores importance on this (with B = 0 every A-score is 0).
  pissa     top-r SVD W0 ~ U S V^T: A = sqrt(S) V^T / sqrt(s), B = U sqrt(S) / sqrt(s), so s B A is the
            principal part; the base keeps the residual W0 - s B A and the output is unchanged.
  olora     Q, R = qr(W0): A = R[:r], B = Q[:, :r], the base keeps W0 - s B A. Not scaled by 1/sqrt(s):
            this is OLoRA's reference implementation (peft's, by OLoRA's author), so peft rebuilds the
            same residual from init_lora_weights="olora" and adapters move between the two.
For pissa/olora the initial A0, B0 are kept (non-persistent buffers) so that an adapter can be loaded
onto the original base: the residual is rebuilt as W0 - s B0 A0 by the same code, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from lorapar.errors import check_fields

INITS = ("lora", "gaussian", "pissa", "olora")


@dataclass
class LoraInit:
    """How A and B are drawn: the flags --init, --init-std and --pissa-niter of every command that draws an adapter.

    A command that needs another default (score.py's gaussian) declares the field with
    lorapar.config.field_of(LoraInit, name, default=...), which keeps this help and these choices."""

    init: str = field(
        default="lora",
        metadata={
            "help": "how A and B are drawn: lora, B = 0 (peft's default); gaussian, A and B ~ N(0, init_std^2) "
            "(importance scoring needs it: with B = 0 every A-score is 0); pissa / olora, principal factors "
            "of W0, the base keeps the residual (lorapar/lora_init.py)",
            "choices": INITS,
        },
    )
    init_std: float = field(default=0.01, metadata={"help": "std of A and B for init=gaussian (LoRA-PAR: 0.01)"})
    pissa_niter: int = field(
        default=0, metadata={"help": "pissa: 0 = exact SVD, N > 0 = randomized SVD with N iterations"}
    )

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"{type(self).__name__}.init must be one of {INITS}, got {self.init!r}")
        check_fields(self, non_negative=("init_std", "pissa_niter"))


def initial_factors(
    weight: torch.Tensor,
    r: int,
    scale: float,
    init: str,
    generator: torch.Generator,
    init_std: float = 0.01,
    pissa_niter: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) on the CPU for `init`, drawn from `generator` in a fixed order (A, then B)."""
    out_features, in_features = weight.shape
    A = torch.empty(r, in_features)
    if init == "lora":
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        B = torch.zeros(out_features, r)
    elif init == "gaussian":
        A.normal_(0.0, init_std, generator=generator)
        B = torch.empty(out_features, r).normal_(0.0, init_std, generator=generator)
    elif init in ("pissa", "olora"):
        A, B = principal_factors(weight, r, scale, init, pissa_niter, generator)
    else:
        raise ValueError(f"unknown LoRA init {init!r}; expected one of {INITS}")
    return A, B


def principal_factors(
    weight: torch.Tensor, r: int, scale: float, init: str, niter: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in fp32: pissa, s B A = the rank-r SVD part of W; olora, B A = Q_r R_r of W = QR."""
    W = weight.detach().float()
    if init == "pissa":
        if niter > 0:
            # svd_lowrank draws its test matrix from the global RNG; seed it locally for determinism.
            devices = [W.device] if W.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
                U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
            Vh = V.T
        else:
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        root_S = S[:r].sqrt()
        A = root_S[:, None] * Vh[:r]
        B = U[:, :r] * root_S[None, :]
        root_scale = math.sqrt(scale)
        return (A / root_scale).contiguous().cpu(), (B / root_scale).contiguous().cpu()
    if init == "olora":
        Q, R = torch.linalg.qr(W)
        return R[:r].contiguous().cpu(), Q[:, :r].contiguous().cpu()
    raise ValueError(f"principal_factors: init must be pissa or olora, got {init!r}")
