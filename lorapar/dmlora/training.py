"""What a training loop does for DM-LoRA (train_sft.py --adapter dual), in one object:

    dual = DualTraining(model, dual_args)                 # apply the adapter (PiSSA shared + expert)
    optimizer = MaskedAdamW.for_model(model, ...)          # reads every mask the modules hold
    dual.start(optimizer, total_steps)
    per optimizer step:
        loss.backward() for each micro-batch;  (dual.regulariser() / world_size).backward()   (once)
        all-reduce, clip, optimizer.step();    dual.after_step(step)           (before zero_grad)
    checkpoint: dual.save(directory);  resume: dual.resume(directory) before the optimizer state loads

The regulariser is lambda * orthogonality_loss; a trainer that sums gradients over ranks divides it
by the world size. Screening reads the all-reduced gradients, so every rank prunes the same
components; after a masking (every screening with --dual-pruning freeze, the final one with regrow)
the optimizer drops the packed state of the newly frozen elements.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file

from lorapar.dmlora.args import DualArgs
from lorapar.dmlora.files import load_dual_adapter, save_dual_adapter
from lorapar.dmlora.modules import apply_dual, require_dual
from lorapar.dmlora.screening import ExpertScreener
from lorapar.io import atomic_save_safetensors

ORTH_EPS = 1e-6  # the supplement's ||A A^T + eps I - I||_F
SCREENER_FILE = "dual_screener.safetensors"


def orthogonality_loss(model: nn.Module) -> torch.Tensor:
    """The supplement's regulariser (the caller multiplies by lambda): the mean over the 2 * modules
    matrices of ||A_e A_e^T + eps I - I||_F and ||B_e^T B_e + eps I - I||_F, eps = ORTH_EPS, non-squared
    Frobenius norms in fp32, as peft's AdaLoRA (whose mean is also per matrix) restricted to the expert.

    Gradients, with M = A A^T - (1 - eps) I and N = B^T B - (1 - eps) I (both symmetric), n = 2 * modules:
        dL/dA = 2 M A / (n ||M||_F),    dL/dB = 2 B N / (n ||N||_F)     (0 where the norm is 0).
    Pruned rows / columns stay in the sum, as in AdaLoRA; their own gradients are ignored by the masks.
    """
    modules = list(require_dual(model, "orthogonality_loss").values())
    total = 0.0
    with torch.autocast(device_type=modules[0].expert_A.device.type, enabled=False):
        for m in modules:
            dtype = torch.promote_types(m.expert_A.dtype, torch.float32)  # at least fp32
            A, B = m.expert_A.to(dtype), m.expert_B.to(dtype)
            eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device) * (1.0 - ORTH_EPS)
            total = total + torch.linalg.matrix_norm(A @ A.T - eye) + torch.linalg.matrix_norm(B.T @ B - eye)
    return total / (2 * len(modules))


class DualTraining:
    def __init__(self, model: nn.Module, args: DualArgs):
        self.model, self.args = model, args
        self.modules = apply_dual(model, args)
        self.screener: Optional[ExpertScreener] = None
        self.last_orthogonality = float("nan")

    def start(self, optimizer, total_steps: int) -> None:
        """Create the screener for a run of `total_steps` optimizer steps; `optimizer` is a MaskedAdamW."""
        a = self.args
        t_init, t_final = a.schedule(total_steps)
        self.screener = ExpertScreener(
            self.modules,
            total_steps,
            a.dual_target_rank,
            t_init,
            t_final,
            a.dual_delta_t,
            a.dual_beta1,
            a.dual_beta2,
            a.dual_budget_power,
            on_prune=lambda _names: optimizer.sync_masks(self.model),
            mode=a.dual_pruning,
        )

    def regulariser(self) -> torch.Tensor:
        """lambda * orthogonality loss (backward it once per optimizer step)."""
        loss = orthogonality_loss(self.model)
        self.last_orthogonality = loss.item()
        return self.args.dual_orth_lambda * loss

    def after_step(self, step: int) -> dict:
        """Screen after optimizer step `step` (1-based); returns metrics for the log."""
        if self.screener is None:
            raise RuntimeError("DualTraining.after_step: call start(optimizer, total_steps) first")
        budget = self.screener.step(step)
        record = {"orthogonality_loss": self.last_orthogonality, "live_experts": self.screener.live_components()}
        if budget is not None:
            record["expert_budget"] = budget
        return record

    def save(self, directory: str) -> None:
        """The adapter (with its masks) and, while screening goes on, the screener's EMAs for an exact
        resume (they are twice the expert's size, so a finished adapter goes without them)."""
        save_dual_adapter(self.model, directory, self.args)
        if self.screener is not None and not self.screener.finished:
            atomic_save_safetensors(os.path.join(directory, SCREENER_FILE), self.screener.state_dict())

    def resume(self, directory: str, optimizer) -> None:
        """Restore adapter tensors, masks and EMAs from a checkpoint written by `save`, and lay the
        optimizer out by those masks (call before loading its state)."""
        if self.screener is None:
            raise RuntimeError("DualTraining.resume: call start(optimizer, total_steps) first")
        if load_dual_adapter(self.model, directory) != self.args:
            raise ValueError(f"{directory}: the dual-LoRA configuration differs from this run's")
        optimizer.sync_masks(self.model)
        path = os.path.join(directory, SCREENER_FILE)
        if os.path.exists(path):  # absent once the pruning phase is over; step() fails loudly if still needed
            self.screener.load_state_dict(load_file(path))
        else:
            self.screener.refresh_kept()
