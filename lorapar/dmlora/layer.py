"""Dual-Module Collaborative LoRA (Cao, Zhang, Zhang, Li; ACML 2025): a PiSSA shared module plus an
importance-screened expert module.

    y = x W_res^T + s * dropout(x) (B_s A_s + B_e diag(E) A_e)^T,      s = alpha / (r_s + r_e)

Shared module (rank r_s): W0 = U S V^T; A_s = sqrt(S_r / s) V_r^T, B_s = U_r sqrt(S_r / s), so
s * B_s A_s is W0's best rank-r_s approximation, and the frozen base keeps the residual
W_res = W0 - s * B_s A_s: the output is unchanged at init. Expert module (rank r_e): A_e (r_e, in) and
B_e (out, r_e) ~ N(0, init_std^2), gates E (r_e,) = 0, so B_e diag(E) A_e = 0 at init yet E receives a
gradient at the first step and A_e, B_e from the second. One scale s for both modules: the paper's
r = 128 and alpha = 128 give s = 1, the same as a rank-128 LoRA.

Component i of the expert module is (row i of A_e, E_i, column i of B_e); screening.py screens
components. Between screenings a losing component only has its gate zeroed (`gate_experts`, AdaLoRA's
rule); a pruned one (the final mask, or every screening with --dual-pruning freeze) is held by element
masks, the single truth the kernel (gradients) and MaskedAdamW (updates, weight decay, state) read:
E_i is set to 0 and masked, and so are A_e[i, :] and B_e[:, i], which stay bit-identical from then on.

--dual-shared-init released and --dual-expert-init released reproduce the supplement's code where it
differs from the paper (docs/fidelity.md): a shared module from a random matrix over an unmodified W0,
and an expert module that no gradient reaches.

LoRALinear.forward runs both modules as one rank-(r_s + r_e) LoRA (`factors`), A = [A_s; A_e] and
B = [B_s, B_e diag(E)]: one dropout mask, one base matmul, one fused kernel call on the GPU.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from lorapar.dmlora.args import EXPERT_INITS, SHARED_INITS
from lorapar.lora import LoRALinear
from lorapar.lora_init import principal_factors


class DualLoRALinear(LoRALinear):
    """A PiSSA LoRALinear (the shared module: `lora_A`, `lora_B`, residual base `weight`, `init_A`,
    `init_B`, shared masks) plus the expert module `expert_A` (r_e, in), `expert_B` (out, r_e),
    `expert_E` (r_e,) with masks `mask_expert_A/B/E` (bool buffers, None = every element trains).

    Everything LoRALinear offers (merge, unmerge, disable_adapter, export_merged, shared masks) keeps
    working: `merge` folds in the expert too, and the disabled forward is the original W0.
    """

    # parameter -> the buffer holding its element mask (read by masks.param_masks / MaskedAdamW.for_model)
    MASK_OF = {
        "lora_A": "mask_A",
        "lora_B": "mask_B",
        "expert_A": "mask_expert_A",
        "expert_B": "mask_expert_B",
        "expert_E": "mask_expert_E",
    }

    def __init__(self, weight: torch.Tensor, shared_rank: int, expert_rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(weight, shared_rank, alpha, dropout)
        self.scale = alpha / (shared_rank + expert_rank)
        out_features, in_features = weight.shape
        device = weight.device
        self.expert_A = nn.Parameter(torch.zeros(expert_rank, in_features, device=device))
        self.expert_B = nn.Parameter(torch.zeros(out_features, expert_rank, device=device))
        self.expert_E = nn.Parameter(torch.zeros(expert_rank, device=device))
        for part in ("expert_A", "expert_B", "expert_E"):
            self.register_buffer(self.MASK_OF[part], None, persistent=False)  # saved in the masks file

    @torch.no_grad()
    def reset_dual(
        self,
        generator: torch.Generator,
        init_std: float,
        svd_niter: int = 0,
        expert_init: str = "gaussian",
        shared_init: str = "pissa",
    ) -> None:
        """Shared module, `shared_init` "pissa": PiSSA from the current weight (W0), residual in the
        base; "released": the supplement's code, which runs its PiSSA init on the layer's own random
        kaiming-uniform weight before the pretrained W0 is assigned, so A_s, B_s are the principal
        factors of a random matrix, W0 stays unmodified and the output moves at init.
        Expert module, E = 0 and `expert_init` "gaussian": A_e, B_e ~ N(0, init_std^2) (AdaLoRA's init;
        E gets a gradient at once); "released": A_e kaiming-uniform (a = sqrt 5), B_e = 0, the
        supplement's code, where every expert gradient but the regulariser's on A_e is a product with
        B_e or E and so stays 0."""
        if shared_init == "pissa":
            self.reset_lora("pissa", generator, pissa_niter=svd_niter)
        elif shared_init == "released":
            random_weight = torch.empty(self.weight.shape)
            nn.init.kaiming_uniform_(random_weight, a=math.sqrt(5), generator=generator)
            A, B = principal_factors(random_weight, self.r, self.scale, "pissa", svd_niter, generator)
            self.lora_A.copy_(A)
            self.lora_B.copy_(B)
            self.init = "released"
        else:
            raise ValueError(f"reset_dual: unknown shared init {shared_init!r}; expected one of {SHARED_INITS}")
        if expert_init == "gaussian":
            self.expert_A.copy_(torch.empty(self.expert_A.shape).normal_(0.0, init_std, generator=generator))
            self.expert_B.copy_(torch.empty(self.expert_B.shape).normal_(0.0, init_std, generator=generator))
        elif expert_init == "released":
            A = torch.empty(self.expert_A.shape)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
            self.expert_A.copy_(A)
            self.expert_B.zero_()
        else:
            raise ValueError(f"reset_dual: unknown expert init {expert_init!r}; expected one of {EXPERT_INITS}")
        self.expert_E.zero_()

    def delta_weight(self) -> torch.Tensor:
        """s * (B_s A_s + B_e diag(E) A_e), (out, in), fp32."""
        shared = self.lora_B.float() @ self.lora_A.float()
        return self.scale * (shared + (self.expert_B.float() * self.expert_E.float()) @ self.expert_A.float())

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Both modules as one rank-(r_s + r_e) LoRA for LoRALinear.forward: A = [A_s; A_e], B = [B_s, B_e diag(E)]."""
        A = torch.cat((self.lora_A, self.expert_A))
        B = torch.cat((self.lora_B, self.expert_B * self.expert_E), dim=1)
        return (A, B, *self._joint_masks())

    def _joint_masks(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Masks of the concatenated A and B. A pruned gate E_i needs none of its own here: column i
        of B_e diag(E) is masked, which gives E_i and B_e[:, i] exactly-zero gradients."""
        if all(getattr(self, self.MASK_OF[n]) is None for n in ("lora_A", "lora_B", "expert_A", "expert_B")):
            return None, None
        mask_A = torch.cat((self._mask_or_ones("lora_A"), self._mask_or_ones("expert_A")))
        mask_B = torch.cat((self._mask_or_ones("lora_B"), self._mask_or_ones("expert_B")), dim=1)
        return mask_A, mask_B

    def _mask_or_ones(self, name: str) -> torch.Tensor:
        mask = getattr(self, self.MASK_OF[name])
        return mask if mask is not None else torch.ones_like(getattr(self, name), dtype=torch.bool)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W_res + s (B_s A_s + B_e diag(E) A_e) in fp32; unmerge restores W_res bit for bit."""
        if self.merged:
            raise RuntimeError("DualLoRALinear.merge: already merged")
        self.weight_before_merge = self.weight.detach().clone()
        self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))

    # ------------------------------------------------------------------ pruning

    @property
    def expert_alive(self) -> torch.Tensor:
        """(r_e,) bool: the components not pruned."""
        return self._mask_or_ones("expert_E").clone()

    @torch.no_grad()
    def prune_experts(self, alive: torch.Tensor) -> None:
        """Zero and freeze the gates, A_e rows and B_e columns of the components not `alive` (r_e,).
        Pruned components stay pruned: `alive` is intersected with the live set."""
        if alive.shape != self.expert_E.shape or alive.dtype != torch.bool:
            raise ValueError(
                f"prune_experts: expected a bool mask of shape {tuple(self.expert_E.shape)}, got "
                f"{alive.dtype} {tuple(alive.shape)}"
            )
        if self.merged:
            raise RuntimeError("prune_experts: unmerge the adapter first")
        alive = alive.to(self.expert_E.device) & self.expert_alive
        self.expert_E.masked_fill_(~alive, 0.0)
        self.mask_expert_E = alive.clone()
        self.mask_expert_A = self._mask_or_ones("expert_A") & alive[:, None]
        self.mask_expert_B = self._mask_or_ones("expert_B") & alive[None, :]

    @torch.no_grad()
    def gate_experts(self, kept: torch.Tensor) -> None:
        """Set the gates E_i of the components not `kept` (r_e,) to 0 and nothing else: they keep
        training, and regrow if they get gradient (AdaLoRA's masking between screenings)."""
        if kept.shape != self.expert_E.shape or kept.dtype != torch.bool:
            raise ValueError(
                f"gate_experts: expected a bool mask of shape {tuple(self.expert_E.shape)}, got "
                f"{kept.dtype} {tuple(kept.shape)}"
            )
        if self.merged:
            raise RuntimeError("gate_experts: unmerge the adapter first")
        self.expert_E.masked_fill_(~kept.to(self.expert_E.device), 0.0)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, expert_rank={self.expert_E.shape[0]}, live_experts={int(self.expert_alive.sum())}"
        )
