"""DM-LoRA on a whole model: apply it, name its tensors (peft-style keys), read and install its masks."""

from __future__ import annotations

import torch
import torch.nn as nn

from lorapar.dmlora.args import DualArgs
from lorapar.dmlora.layer import DualLoRALinear
from lorapar.lora import lora_modules, unwrap_model
from lorapar.lora_names import peft_key, resolve_targets

PARAMS = ("lora_A", "lora_B", "expert_A", "expert_B", "expert_E")


def adapter_key(module_name: str, param: str) -> str:
    """On-disk key: the shared module uses peft's LoRA keys, the expert module the same prefix:
    ("layers.0.attention.wq", "expert_E") -> "base_model.model.model.layers.0.self_attn.q_proj.lora_expert_E.weight"."""
    if param in ("lora_A", "lora_B"):
        return peft_key(module_name, param[-1])
    if param in ("expert_A", "expert_B", "expert_E", "init_A", "init_B"):
        return peft_key(module_name, "A").removesuffix("lora_A.weight") + f"lora_{param}.weight"
    raise ValueError(f"adapter_key: unknown dual-LoRA parameter {param!r}; expected one of {PARAMS} or init_A/init_B")


def dual_modules(model: nn.Module) -> dict[str, DualLoRALinear]:
    """{Meta module name: DualLoRALinear} in model order."""
    return {name: m for name, m in lora_modules(model).items() if isinstance(m, DualLoRALinear)}


def require_dual(model: nn.Module, what: str) -> dict[str, DualLoRALinear]:
    modules = dual_modules(model)
    if not modules:
        raise RuntimeError(f"{what}: the model has no dual-LoRA modules (call apply_dual first)")
    return modules


def apply_dual(model: nn.Module, args: DualArgs, initialise: bool = True) -> dict[str, DualLoRALinear]:
    """Replace the targeted projections with DualLoRALinear, freeze everything else and (unless
    `initialise` is False, as when loading) run the PiSSA / expert init, one generator in model order."""
    root = unwrap_model(model)
    if lora_modules(root):
        raise RuntimeError("apply_dual: the model already has LoRA modules")
    wanted = set(resolve_targets(args.dual_targets))
    found: dict[str, DualLoRALinear] = {}
    for name, module in list(root.named_modules()):
        parent_name, _, leaf = name.rpartition(".")
        if leaf not in wanted or not parent_name:
            continue
        if not isinstance(module, nn.Linear) or module.bias is not None:
            raise TypeError(f"apply_dual: {name} is {type(module).__name__}; expected nn.Linear without bias")
        if args.dual_rank > min(module.weight.shape):
            raise ValueError(
                f"apply_dual: dual_rank {args.dual_rank} exceeds min(out, in) of {name} {tuple(module.weight.shape)}"
            )
        dual = DualLoRALinear(
            module.weight, args.dual_shared_rank, args.expert_rank, args.dual_alpha, args.dual_dropout
        )
        setattr(root.get_submodule(parent_name), leaf, dual)
        found[name] = dual
    if not found:
        raise ValueError(f"apply_dual: no module matches targets {args.dual_targets}")
    for p in root.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(args.dual_seed)
    for m in found.values():
        for param in PARAMS:
            getattr(m, param).requires_grad_(True)
        if initialise:
            m.reset_dual(
                generator, args.dual_init_std, args.dual_svd_niter, args.dual_expert_init, args.dual_shared_init
            )
    return found


def named_dual_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """[(adapter key, Parameter)] for every trainable tensor, in model order."""
    return [(adapter_key(name, p), getattr(m, p)) for name, m in dual_modules(model).items() for p in PARAMS]


def get_dual_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{adapter key: bool mask} for every trainable tensor (all-true where no mask is set)."""
    return {
        adapter_key(name, p): m._mask_or_ones(p)
        for name, m in require_dual(model, "get_dual_masks").items()
        for p in PARAMS
    }


def set_dual_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Install masks keyed by adapter_key; the key set must match the model's exactly."""
    modules = require_dual(model, "set_dual_masks")
    params = dict(named_dual_parameters(model))
    missing, extra = sorted(set(params) - set(masks)), sorted(set(masks) - set(params))
    if missing or extra:
        raise KeyError(
            f"set_dual_masks: mask keys do not match the dual-LoRA parameters; missing {missing[:3]} "
            f"({len(missing)}), unexpected {extra[:3]} ({len(extra)})"
        )
    for key, mask in masks.items():
        if mask.dtype != torch.bool or mask.shape != params[key].shape:
            raise ValueError(
                f"set_dual_masks: mask {key} must be bool {tuple(params[key].shape)}, got {mask.dtype} "
                f"{tuple(mask.shape)}"
            )
    for name, m in modules.items():
        for p in PARAMS:
            mask = masks[adapter_key(name, p)]
            setattr(m, m.MASK_OF[p], None if bool(mask.all()) else mask.to(getattr(m, p).device).clone())
