"""The optimizer, its learning-rate schedule and the one optimizer step every training loop takes.

MaskedAdamW is AdamW that keeps state for, and updates, the active elements only. Zeroing gradients
(the authors' hooks) is not enough: AdamW's decoupled weight decay `p -= lr * wd * p` moves an element
whatever its gradient, momentum carries earlier updates on, and the state is dense. MaskedAdamW instead
gathers the active elements, runs AdamW on that packed vector and scatters the result back, so

  * a frozen element is never written: bit-identical after any number of steps, whatever the
    weight decay, clipping or data-parallel setup;
  * exp_avg / exp_avg_sq are packed 1-D tensors of the active count: state memory is proportional
    to the active fraction.

With all-true masks (or mask None) the update is torch.optim.AdamW's, operation for operation.

Under FSDP2 (lorapar/fsdp.py) a parameter is a DTensor sharded along dim 0 and its mask stays whole
on every rank: each rank updates its local rows with the matching rows of the mask, keeps packed state
for the active elements of those rows only, and clipping all-reduces the squared norm over the ranks.

`learning_rate` is the schedule of train_sft.py, train_rl.py and the embedded base's pretraining
(lorapar/pretrain.py); `optimizer_step` is the step both training scripts take (and grpo_update's passes).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn

from lorapar import dist
from lorapar.fsdp import local_rows
from lorapar.masks import param_masks

SCHEDULES = ("cosine", "linear", "constant")


# ----------------------------------------------------------------------------- learning-rate schedule


def learning_rate(
    step: int, total_steps: int, peak: float, warmup_steps: int, schedule: str = "cosine", floor: float = 0.0
) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total_steps`.

    Linear warm-up over `warmup_steps` steps from peak/warmup_steps to peak, then cosine (or linear)
    decay from peak towards `floor`, reached at step total_steps (one past the last), or constant:

        warm-up:  peak * (step + 1) / warmup_steps
        decay:    floor + (peak - floor) * shape(p),  p = min(1, (step - warmup_steps) / (total_steps - warmup_steps))
                  shape(p) = (1 + cos(pi p)) / 2  (cosine)  or  1 - p  (linear)
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return floor + (peak - floor) * shape


def lr_at(step: int, total_steps: int, args) -> float:
    """`learning_rate` with the training scripts' flags (lorapar.script_args.TrainArgs): --lr, --schedule,
    a warm-up of ceil(--warmup-ratio x total) steps and a floor of --min-lr-ratio x --lr."""
    return learning_rate(
        step,
        total_steps,
        args.lr,
        math.ceil(args.warmup_ratio * total_steps),
        args.schedule,
        args.min_lr_ratio * args.lr,
    )


# ----------------------------------------------------------------------------- the optimizer step


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    params: list,
    info: dist.DistInfo,
    *,
    lr: float,
    max_grad_norm: float,
    zero_grad: bool = True,
) -> Optional[torch.Tensor]:
    """One update from the gradients the micro-batches accumulated: sum them over the ranks (a no-op
    for FSDP's parameters, which FSDP reduces itself), clip their global norm to `max_grad_norm`
    (0 = no clipping), step at `lr` and release the gradients (`zero_grad=False` keeps them for a
    caller that reads them after the update, DM-LoRA's screening). Returns the norm before clipping
    (None without clipping)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    dist.all_reduce_grads(params, info)
    grad_norm = optimizer.clip_grad_norm_(max_grad_norm) if max_grad_norm > 0 else None
    optimizer.step()
    if zero_grad:
        optimizer.zero_grad(set_to_none=True)
    return grad_norm


# ----------------------------------------------------------------------------- the masked optimizer


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW over the active elements of each parameter; frozen elements are never written.

    params: Parameters, (Parameter, mask) or (name, Parameter, mask) tuples, or param-group dicts whose
    "params" hold those. mask is a bool tensor of the parameter's shape (True = trains) or None (all
    train). Each group keeps parallel lists group["masks"] and group["names"] (names for messages).

    Update for the packed active values x with gradient g (torch.optim.AdamW's, step t):
        x <- x * (1 - lr * wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        x <- x - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(
                f"MaskedAdamW: invalid hyper-parameters lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}"
            )
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        super().__init__(
            [self._normalise_group(g, i) for i, g in enumerate(groups)],
            dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay),
        )

    @staticmethod
    def _normalise_group(group: dict, index: int) -> dict:
        tensors, masks, names = [], [], []
        for j, entry in enumerate(group["params"]):
            if isinstance(entry, torch.Tensor):
                entry = (entry, None)
            name, p, mask = entry if len(entry) == 3 else (f"group{index}.param{j}", *entry)
            _check_mask(mask, p, name)
            tensors.append(p), masks.append(mask), names.append(name)
        return {**group, "params": tensors, "masks": masks, "names": names}

    @classmethod
    def for_model(cls, model: nn.Module, **hyper) -> "MaskedAdamW":
        """Every trainable parameter of `model`, with the masks its modules hold (see param_masks)."""
        entries = param_masks(model)
        if not entries:
            raise ValueError("MaskedAdamW.for_model: the model has no trainable parameters (apply_lora first?)")
        return cls(entries, **hyper)

    def _entries(self):
        for group in self.param_groups:
            yield from (
                (group, p, mask, name) for p, mask, name in zip(group["params"], group["masks"], group["names"])
            )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, p, mask, name in self._entries():
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"MaskedAdamW: sparse gradient for {name} is not supported")
            state = self.state[p]
            p, grad, mask = _local(p), _local(p.grad), _local_mask(p, mask)  # this rank's rows under FSDP
            if not state:
                active = p.numel() if mask is None else int(mask.sum())
                state["step"] = 0
                state["exp_avg"] = torch.zeros(active, dtype=p.dtype, device=p.device)
                state["exp_avg_sq"] = torch.zeros(active, dtype=p.dtype, device=p.device)
            state["step"] += 1
            if mask is None:
                _adamw(p, grad, state["exp_avg"].view_as(p), state["exp_avg_sq"].view_as(p), state["step"], group)
            else:
                index = _active_index(mask)
                if index.numel() != state["exp_avg"].numel():
                    raise RuntimeError(
                        f"MaskedAdamW: the mask of {name} now has {index.numel()} active elements, its state "
                        f"{state['exp_avg'].numel()}; masks must change through update_masks, not in place"
                    )
                values = p.view(-1).index_select(0, index)  # the packed copy; frozen elements are never written
                _adamw(
                    values,
                    grad.reshape(-1).index_select(0, index),
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    state["step"],
                    group,
                )
                p.view(-1).index_copy_(0, index, values)
        return loss

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale gradients so the L2 norm over active elements is at most max_norm; returns that norm.

        As torch.nn.utils.clip_grad_norm_ (coefficient max_norm / (norm + 1e-6), capped at 1), but a
        frozen element's gradient never counts. Under DDP the gradients are already all-reduced, so
        every rank computes the same global norm and scales identically. Under FSDP each rank holds some
        rows of each gradient: the squared norms of the local rows are summed over the ranks.
        """
        grads = [(_local(p.grad), _local_mask(p, mask)) for _, p, mask, _ in self._entries() if p.grad is not None]
        sharded = [p.grad for _, p, _, _ in self._entries() if p.grad is not None and _is_dtensor(p.grad)]
        if not grads:
            return torch.tensor(0.0)
        norms = [
            torch.linalg.vector_norm(
                g if mask is None else g.reshape(-1).index_select(0, _active_index(mask)), dtype=torch.float32
            )
            for g, mask in grads
        ]
        total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
        if sharded:
            squared = total.square()
            torch_dist.all_reduce(squared, group=sharded[0].device_mesh.get_group())
            total = squared.sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g, _ in grads:
            g.mul_(coef.to(device=g.device, dtype=g.dtype))
        return total

    @torch.no_grad()
    def update_masks(self, masks: Mapping[torch.Tensor, Optional[torch.Tensor]]) -> None:
        """Switch parameters to new masks ({parameter: mask or None}); others keep theirs.

        Elements active before and after keep their moments; newly active ones start from zero
        moments under the parameter's existing step count (their first bias correction is then
        smaller than a fresh start's, as for any AdamW element whose gradient was zero so far).
        """
        known = {id(p) for _, p, _, _ in self._entries()}
        unknown = [tuple(p.shape) for p in masks if id(p) not in known]
        if unknown:
            raise KeyError(f"update_masks: {len(unknown)} parameter(s) not in this optimizer (shapes {unknown[:3]})")
        new_by_id = {id(p): m for p, m in masks.items()}
        for group in self.param_groups:
            for i, (p, name) in enumerate(zip(group["params"], group["names"])):
                if id(p) not in new_by_id:
                    continue
                new = new_by_id[id(p)]
                _check_mask(new, p, name)
                state = self.state.get(p)
                if state:
                    old_local, new_local = _local_mask(p, group["masks"][i]), _local_mask(p, new)
                    for key in ("exp_avg", "exp_avg_sq"):
                        dense = _unpack(state[key], old_local, _local(p))
                        state[key] = dense.reshape(-1).clone() if new_local is None else dense[new_local]
                group["masks"][i] = new

    def sync_masks(self, model: nn.Module) -> None:
        """update_masks from the masks the model's modules hold now (after set_masks or pruning)."""
        self.update_masks({p: mask for _, p, mask in param_masks(model)})

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume; the saved masks must equal the current ones (the packed state is laid out by them)."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"MaskedAdamW.load_state_dict: {len(saved_groups)} saved param groups, {len(self.param_groups)} here"
            )
        for group, saved in zip(self.param_groups, saved_groups):
            if "masks" not in saved:
                raise ValueError("MaskedAdamW.load_state_dict: the state dict has no masks (not a MaskedAdamW state?)")
            if len(saved["masks"]) != len(group["params"]):
                raise ValueError(
                    f"MaskedAdamW.load_state_dict: a group has {len(saved['masks'])} saved parameters, "
                    f"{len(group['params'])} here"
                )
            for p, current, old, name in zip(group["params"], group["masks"], saved["masks"], group["names"]):
                if not _same_mask(current, old, p):
                    raise ValueError(
                        f"MaskedAdamW.load_state_dict: the mask of {name} differs from the saved one; "
                        "load the masks the run was saved with (or update_masks after loading)"
                    )
        current_masks = [group["masks"] for group in self.param_groups]
        current_names = [group["names"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, masks, names in zip(self.param_groups, current_masks, current_names):
            group["masks"], group["names"] = masks, names  # keep the model's mask tensors, not copies
        for group, p, mask, name in self._entries():
            state = self.state.get(p)
            mask = _local_mask(p, mask)
            active = _local(p).numel() if mask is None else int(mask.sum())
            if state and state["exp_avg"].numel() != active:
                raise ValueError(
                    f"MaskedAdamW.load_state_dict: {name} has {state['exp_avg'].numel()} saved state entries, "
                    f"{active} active elements"
                )


def _adamw(
    x: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int, group: dict
) -> None:
    """One AdamW update of x in place, written as torch.optim.AdamW's single-tensor path."""
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    x.mul_(1 - lr * wd)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    x.addcdiv_(exp_avg, denom, value=-step_size)


def _active_index(mask: torch.Tensor) -> torch.Tensor:
    """Flat positions of the active elements, in the packed state's order.

    Recomputed at every step rather than cached: an int64 (or even int32) index per active element
    would cost as much memory as the state it saves. One index plus index_select / index_copy_ is
    faster than boolean indexing and masked_scatter_; on the CPU numpy's flatnonzero is much faster
    than torch.nonzero, which would otherwise dominate the step (bench/bench_masked_adamw.py).
    """
    flat = mask.reshape(-1)
    if flat.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(flat.numpy()))
    return flat.nonzero().squeeze(1)


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor  # lazy: a second's import that only --fsdp runs need

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of an FSDP2-sharded tensor (a view: writes reach the parameter); t itself otherwise."""
    return t.to_local() if _is_dtensor(t) else t


def _local_mask(p: torch.Tensor, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The rows of a whole mask that match this rank's shard of p (the mask itself when p is not sharded)."""
    if mask is None or not _is_dtensor(p):
        return mask
    start, stop = local_rows(p)
    return mask[start:stop]


def _check_mask(mask: Optional[torch.Tensor], p: torch.Tensor, name: str) -> None:
    if mask is None:
        return
    if not p.is_contiguous():
        raise ValueError(
            f"MaskedAdamW: {name} must be contiguous to be masked (its elements are updated through a flat view)"
        )
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != p.shape:
        raise ValueError(
            f"MaskedAdamW: the mask of {name} must be a bool tensor of shape {tuple(p.shape)}, "
            f"got {getattr(mask, 'dtype', type(mask))} {tuple(getattr(mask, 'shape', ()))}"
        )
    if mask.device != p.device:
        raise ValueError(f"MaskedAdamW: the mask of {name} is on {mask.device}, the parameter on {p.device}")


def _unpack(packed: torch.Tensor, mask: Optional[torch.Tensor], p: torch.Tensor) -> torch.Tensor:
    """The parameter-shaped tensor holding `packed` at the active positions and zero elsewhere."""
    if mask is None:
        return packed.view_as(p)
    return torch.zeros_like(p).masked_scatter_(mask, packed)


def _same_mask(a: Optional[torch.Tensor], b: Optional[torch.Tensor], p: torch.Tensor) -> bool:
    if a is None and b is None:
        return True
    ones = torch.ones(p.shape, dtype=torch.bool)  # p.shape: the whole shape also for an FSDP shard
    a, b = (ones if a is None else a), (ones if b is None else b)
    return a.shape == b.shape and torch.equal(a.cpu(), b.cpu())


__all__ = ["MaskedAdamW", "SCHEDULES", "learning_rate", "lr_at", "optimizer_step"]
