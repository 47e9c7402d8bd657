"""Element masks: on disk (one safetensors file per run, optionally per stage) and onto a model's adapter.

A mask is a bool tensor per LoRA parameter, keyed by its peft key (lorapar.lora.peft_key); True means
the element trains. On the model the masks are buffers of the LoRA modules (the single truth): the
forward zeroes masked-out gradients, and lorapar.optim.MaskedAdamW reads the same tensors (it keeps
state for, and updates, only the active elements).
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import torch
import torch.nn as nn
from safetensors.torch import load_file

from lorapar.io import atomic_save_safetensors, named_errors
from lorapar.lora import set_masks

# ---------------------------------------------------------------------- masks on disk


def save_masks(
    path: str,
    masks: Mapping[str, Union[torch.Tensor, Mapping[str, torch.Tensor]]],
    metadata: Optional[Mapping[str, str]] = None,
) -> None:
    """One safetensors file: {peft_key: mask}, or {"stage1": masks, "stage2": masks} stored as "stage1.<peft_key>";
    `metadata` (strings) goes into the file's header beside "format"."""
    staged = {name: value for name, value in masks.items() if isinstance(value, Mapping)}
    if staged and len(staged) != len(masks):
        raise ValueError("save_masks: give either {peft_key: mask} or {stage: {peft_key: mask}}, not a mixture")
    flat = (
        {f"{stage}.{key}": mask for stage, group in staged.items() for key, mask in group.items()}
        if staged
        else dict(masks)
    )
    for stage in staged:
        if "." in stage or stage.startswith("base_model"):
            raise ValueError(f"save_masks: stage name {stage!r} must not contain '.' or start with 'base_model'")
    for key, mask in flat.items():
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"save_masks: {key} must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
    atomic_save_safetensors(path, {k: v.cpu() for k, v in flat.items()}, metadata={**(metadata or {}), "format": "pt"})


def load_masks(path: str, stage: Optional[str] = None) -> dict:
    """{peft_key: mask} of one stage (or of an unstaged file); with stage=None a staged file gives {stage: masks}."""
    try:
        with named_errors(str(path), "a safetensors file of bool element masks (score.py's masks.safetensors)"):
            tensors = load_file(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"mask file not found: {path}") from None
    for key, mask in tensors.items():
        if mask.dtype != torch.bool:
            raise TypeError(f"{path}: mask {key} has dtype {mask.dtype}, expected bool")
    stages: dict[str, dict[str, torch.Tensor]] = {}
    for key, mask in tensors.items():
        if not key.startswith("base_model."):
            prefix, _, rest = key.partition(".")
            stages.setdefault(prefix, {})[rest] = mask
    if stages and len(tensors) != sum(map(len, stages.values())):
        raise ValueError(f"{path}: mixes stage-prefixed and unprefixed mask keys")
    if stage is None:
        return stages or tensors
    if stage not in stages:
        found = sorted(stages) or "none (an unstaged file)"
        raise KeyError(f"{path}: no masks for stage {stage!r}; stages in the file: {found}")
    return stages[stage]


def param_masks(model: nn.Module) -> list[tuple[str, nn.Parameter, Optional[torch.Tensor]]]:
    """(name, parameter, mask) for every trainable parameter of `model`, masks read from the modules.

    A module declares its masked parameters with a class attribute MASK_OF = {parameter: mask buffer}
    (LoRALinear: {"lora_A": "mask_A", "lora_B": "mask_B"}); other trainable parameters get None.
    """
    masks = {}
    for module in model.modules():
        for param_name, buffer_name in getattr(type(module), "MASK_OF", {}).items():
            masks[id(getattr(module, param_name))] = getattr(module, buffer_name)
    return [(name, p, masks.get(id(p))) for name, p in model.named_parameters() if p.requires_grad]


def install_masks(model: nn.Module, path: str, stage: Optional[int]) -> None:
    """Load the element masks of `stage` from `path` onto the model's adapter, naming the file on mismatch."""
    masks = load_masks(path, stage=None if stage is None else f"stage{stage}")
    staged = sorted(k for k, v in masks.items() if isinstance(v, dict))
    if staged:
        raise ValueError(f"{path} holds masks for several stages ({', '.join(staged)}); pick one with --stage N")
    try:
        set_masks(model, masks)
    except (KeyError, ValueError, TypeError) as error:
        raise ValueError(f"{path}: the masks do not match the adapter ({error})") from None


__all__ = ["save_masks", "load_masks", "param_masks", "install_masks"]
