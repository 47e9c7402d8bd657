"""Hand-written LoRA for the Meta-named LLaMA in lorapar.model.

    y = x W0^T + s * dropout(x) A^T B^T,   A (r, in), B (out, r),   s = alpha / r   (alpha / sqrt(r) with rsLoRA)

W0 stays frozen at `<module>.weight`, so the model's state-dict keys for base weights never change.
Element masks (`mask_A`, `mask_B`, bool buffers, None = every element trains) say which elements of
A and B may train; LoRALinear.forward gives masked-out elements exactly-zero gradients and
`lorapar.optim.MaskedAdamW` updates and keeps state for active elements only, so a frozen element never
moves. Change masks with set_masks (then `optimizer.sync_masks(model)`), never in place: the optimizer's
packed state is laid out by them.

The forward is the equation in PyTorch (autograd forms its backward); on CUDA the same equation runs as
fused Triton kernels (kernels/, whose reference.py writes that backward out once).

Inits (LoraInit.init): lorapar/lora_init.py.

Names: modules are keyed by Meta names ("layers.0.attention.wq"); parameters and masks by peft keys
("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"), both in lorapar/lora_names.py. In
memory and in mask and importance files tensors are in the model's (Meta) layout; adapter files are
lorapar.adapter's.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import masked_lora_linear, use_triton
from lorapar.errors import check_fields
from lorapar.lora_init import INITS, LoraInit, initial_factors
from lorapar.lora_names import MODULE_NAME_RE, peft_key, resolve_targets


@dataclass
class LoraArgs(LoraInit):
    """A LoRA adapter's description: config.json's "LoraArgs" and the adapter's lorapar_args metadata hold
    these fields (init, init_std and pissa_niter are LoraInit's, declared in lorapar/lora_init.py). r, alpha
    and targets keep these names, the files' keys; their flags are LoraSettings' --rank, --lora-alpha and
    --targets (lorapar/lora_settings.py), which take their defaults from here."""

    r: int = 8
    alpha: float = 64.0  # the update is scaled by alpha / r
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA path's input"})
    targets: tuple[str, ...] = ("q", "k", "v", "gate", "up", "down")
    use_rslora: bool = field(default=False, metadata={"help": "scale by alpha/sqrt(r) instead of alpha/r"})
    seed: int = field(default=0, metadata={"help": "seed of the random inits (lora, gaussian, randomized pissa)"})

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = tuple(t for t in self.targets.split(",") if t)
        self.targets = tuple(self.targets)
        if self.r < 1:
            raise ValueError(f"LoraArgs.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraArgs.dropout must be in [0, 1), got {self.dropout}")
        super().__post_init__()  # init, init_std, pissa_niter
        check_fields(self, positive_float=("alpha",), non_negative=("seed",))
        resolve_targets(self.targets)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRALinear(nn.Module):
    """y = x W0^T + s * dropout(x) A^T B^T with a frozen W0 and element masks on A and B.

    The adapter (A, B) is kept in at least fp32 whatever the base dtype, as peft does: its updates
    are small next to its values, and bf16 would round them away.
    """

    MASK_OF = {"lora_A": "mask_A", "lora_B": "mask_B"}  # parameter -> its mask buffer (read by MaskedAdamW)

    def __init__(self, weight: torch.Tensor, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        out_features, in_features = weight.shape
        if r > min(out_features, in_features):
            raise ValueError(
                f"LoRA rank r={r} exceeds min(out, in) = {min(out_features, in_features)} of a {tuple(weight.shape)} "
                "weight"
            )
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        dtype = torch.promote_types(weight.dtype, torch.float32)
        self.lora_A = nn.Parameter(torch.zeros(r, in_features, device=weight.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=weight.device, dtype=dtype))
        self.r, self.alpha, self.use_rslora, self.dropout = r, alpha, use_rslora, dropout
        self.scale = alpha / (math.sqrt(r) if use_rslora else r)
        self.init = "lora"
        # Masks, and for pissa/olora the initial factors, are saved by their own files, not the model's.
        self.register_buffer("mask_A", None, persistent=False)
        self.register_buffer("mask_B", None, persistent=False)
        self.register_buffer("init_A", None, persistent=False)
        self.register_buffer("init_B", None, persistent=False)
        self.register_buffer("weight_before_merge", None, persistent=False)
        self.adapter_enabled = True

    @property
    def merged(self) -> bool:
        return self.weight_before_merge is not None

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return (
            f"in={in_features}, out={out_features}, r={self.r}, scale={self.scale:g}, init={self.init}, "
            f"merged={self.merged}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return (
                F.linear(x, self.weight) if self.adapter_enabled else self._original_base(x, self.weight_before_merge)
            )
        if not self.adapter_enabled:
            return self.base_forward(x)
        A, B, mask_A, mask_B = self.factors()
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        A, B = A.to(dtype), B.to(dtype)  # e.g. a bf16 base; the grads flow back to the fp32 adapter through the cast
        if use_triton(x):
            # The same equation in fused Triton kernels (kernels/; kernels/reference.py writes out their backward).
            return masked_lora_linear(
                x, self.weight, A, B, self.scale, mask_A, mask_B, dropout_p=self.dropout, training=self.training
            )
        #   y = x W0^T + s * dropout(x) A^T B^T,   dA = 0 where not mask_A,   dB = 0 where not mask_B
        A, B = frozen_where_masked(A, mask_A), frozen_where_masked(B, mask_B)
        x_2d = x.reshape(-1, x.shape[-1])
        xa = F.linear(lora_dropout(x_2d, self.dropout, self.training), A)  # dropout(x) A^T, (N, r)
        # += s xa B^T in place: the CPU then allocates no second (N, out) tensor in forward or backward
        y = F.linear(x_2d, self.weight).addmm_(xa, B.t(), alpha=self.scale)
        return y.view(*x.shape[:-1], y.shape[-1])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(A, B, mask_A, mask_B) of the equation; DM-LoRA's two modules are one such LoRA (lorapar/dmlora)."""
        return self.lora_A, self.lora_B, self.mask_A, self.mask_B

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The original model's projection, x W0^T, with the adapter switched off."""
        return self._original_base(x, self.weight)

    def _original_base(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # pissa/olora moved s B0 A0 out of W0: add it back so "no adapter" means the original base.
        y = F.linear(x, weight)
        if self.init_A is not None:
            y = y + self.scale * F.linear(F.linear(x, self.init_A.to(x.dtype)), self.init_B.to(x.dtype))
        return y

    # ------------------------------------------------------------------ initialisation

    @torch.no_grad()
    def reset_lora(self, init: str, generator: torch.Generator, init_std: float = 0.01, pissa_niter: int = 0) -> None:
        """Initialise A and B; pissa/olora also move the principal part out of the frozen base."""
        if self.init in ("pissa", "olora"):
            raise RuntimeError(
                f"this module was initialised with {self.init}; its base is a residual and cannot be re-initialised"
            )
        A, B = initial_factors(self.weight, self.r, self.scale, init, generator, init_std, pissa_niter)
        self.lora_A.copy_(A)
        self.lora_B.copy_(B)
        if init in ("pissa", "olora"):
            self.set_residual_base(A.to(self.lora_A.device), B.to(self.lora_B.device))
        self.init = init

    @torch.no_grad()
    def set_residual_base(self, init_A: torch.Tensor, init_B: torch.Tensor) -> None:
        """W0 <- W0 - s B0 A0 in fp32 (the one formula used at init and when loading an adapter)."""
        device = self.weight.device
        init_A, init_B = init_A.to(device=device, dtype=torch.float32), init_B.to(device=device, dtype=torch.float32)
        residual = self.weight.float() - self.scale * (init_B @ init_A)
        self.weight.copy_(residual.to(self.weight.dtype))
        self.init_A, self.init_B = init_A.clone(), init_B.clone()

    # ------------------------------------------------------------------ merging

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W0 + s B A in fp32; W0 is kept so that unmerge restores it bit for bit.

        For inference (generation, export): while merged the adapter receives no gradient. The copy
        of W0 costs one base weight per module; export_merged unmerges again when it is done.
        """
        if self.merged:
            raise RuntimeError("LoRALinear.merge: already merged")
        delta = self.scale * (self.lora_B.float() @ self.lora_A.float())
        self.weight_before_merge = self.weight.detach().clone()
        self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: not merged")
        self.weight.copy_(self.weight_before_merge)
        self.weight_before_merge = None

    def set_masks(self, mask_A: Optional[torch.Tensor], mask_B: Optional[torch.Tensor]) -> None:
        # Own copies: a caller editing its dict afterwards must not change the masks under the optimizer.
        self.mask_A = None if mask_A is None else mask_A.to(self.lora_A.device, copy=True)
        self.mask_B = None if mask_B is None else mask_B.to(self.lora_B.device, copy=True)


def frozen_where_masked(factor: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """`factor`, with its gradient set to exactly 0 where `mask` is False (where's backward writes zeros, so
    a masked-out element stays 0.0 even when its neighbours' gradients overflow to inf or nan)."""
    return factor if mask is None else torch.where(mask, factor, factor.detach())


def lora_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """dropout(x) on the LoRA path only, as in peft. One Bernoulli draw per element of x, the kernels'
    reference draw (kernels/function.py), so both paths consume the random stream alike."""
    if not training or p == 0.0:
        return x
    keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


# ---------------------------------------------------------------------- model-level functions


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DDP (`.module`) or torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{Meta module name: LoRALinear}, e.g. "layers.0.attention.wq", in model order."""
    return {name: m for name, m in unwrap_model(model).named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, args: Optional[LoraArgs] = None, **kwargs) -> dict[str, LoRALinear]:
    """Replace the targeted projections with LoRALinear, freeze every base parameter, initialise A and B.

    Call as apply_lora(model, LoraArgs(...)) or apply_lora(model, targets=..., r=..., alpha=..., init=...).
    Deterministic given args.seed (one generator walks the modules in model order).
    """
    if args is None:
        args = LoraArgs(**kwargs)
    elif kwargs:
        raise TypeError("apply_lora: pass either a LoraArgs or keyword arguments, not both")
    modules = replace_linears(model, args)
    generator = torch.Generator().manual_seed(args.seed)
    for module in modules.values():
        module.reset_lora(args.init, generator, args.init_std, args.pissa_niter)
    return modules


def replace_linears(model: nn.Module, args: LoraArgs) -> dict[str, LoRALinear]:
    """Swap in LoRALinear modules with A = B = 0 (no init) and freeze the base."""
    root = unwrap_model(model)
    if lora_modules(root):
        raise RuntimeError("apply_lora: the model already has LoRA modules")
    wanted = set(resolve_targets(args.targets))
    found: dict[str, LoRALinear] = {}
    for name, module in list(root.named_modules()):
        match = MODULE_NAME_RE.search(name)
        if match is None or match.group(3) not in wanted:
            continue
        if not isinstance(module, nn.Linear) or module.bias is not None:
            raise TypeError(f"apply_lora: {name} is {module!r}; expected nn.Linear without bias")
        parent_name, leaf = name.rsplit(".", 1)
        lora = LoRALinear(module.weight, args.r, args.alpha, args.dropout, args.use_rslora)
        setattr(root.get_submodule(parent_name), leaf, lora)
        found[name] = lora
    if not found:
        raise ValueError(
            f"apply_lora: no module matches targets {args.targets} (expected layers.N.attention.wq ... names)"
        )
    for p in root.parameters():
        p.requires_grad_(False)
    for m in found.values():
        m.lora_A.requires_grad_(True)
        m.lora_B.requires_grad_(True)
    return found


def named_lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """[(peft key, Parameter)] with A before B for each module, in model order."""
    out = []
    for name, m in lora_modules(model).items():
        out += [(peft_key(name, "A"), m.lora_A), (peft_key(name, "B"), m.lora_B)]
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: p.detach() for key, p in named_lora_parameters(model)}


def require_lora(model: nn.Module, what: str) -> dict[str, LoRALinear]:
    """lora_modules(model), or an error naming the caller `what` when the model has none."""
    modules = lora_modules(model)
    if not modules:
        raise RuntimeError(f"{what}: the model has no LoRA modules (call apply_lora first)")
    return modules


def set_masks(model: nn.Module, masks: Optional[dict[str, torch.Tensor]]) -> None:
    """Install one bool mask per LoRA parameter (keys as peft_key); None clears every mask.

    The key set must equal the model's LoRA parameters exactly: a missing or extra key is an error,
    so a mask file built for another target set or rank can never be applied silently.
    """
    modules = require_lora(model, "set_masks")
    if masks is None:
        for m in modules.values():
            m.set_masks(None, None)
        return
    params = dict(named_lora_parameters(model))
    missing, extra = sorted(set(params) - set(masks)), sorted(set(masks) - set(params))
    if missing or extra:
        raise KeyError(
            f"set_masks: mask keys do not match the LoRA parameters; {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(extra)} unexpected (e.g. {extra[:3]})"
        )
    for key, mask in masks.items():
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"set_masks: mask {key} must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
        if mask.shape != params[key].shape:
            raise ValueError(
                f"set_masks: mask {key} has shape {tuple(mask.shape)}, the parameter has {tuple(params[key].shape)}"
            )
    for name, m in modules.items():
        m.set_masks(masks[peft_key(name, "A")], masks[peft_key(name, "B")])


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{peft key: bool mask}; a parameter without a mask reports all-true."""
    out = {}
    for name, m in require_lora(model, "get_masks").items():
        for which, p, mask in (("A", m.lora_A, m.mask_A), ("B", m.lora_B, m.mask_B)):
            out[peft_key(name, which)] = torch.ones_like(p, dtype=torch.bool) if mask is None else mask
    return out


def merge(model: nn.Module) -> None:
    for m in require_lora(model, "merge").values():
        m.merge()


def unmerge(model: nn.Module) -> None:
    for m in require_lora(model, "unmerge").values():
        m.unmerge()


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Run the original base model (GRPO's reference policy); restores the adapters on exit.

    For pissa/olora the stored base is the residual W0 - s B0 A0; the disabled forward adds s B0 A0
    back, so "disabled" is the original model for every init (peft returns the residual instead).
    """
    modules = list(require_lora(model, "disable_adapter").values())
    previous = [m.adapter_enabled for m in modules]
    for m in modules:
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for m, state in zip(modules, previous):
            m.adapter_enabled = state


def export_merged(model: nn.Module, path: str, format: str = "hf") -> None:
    """Write the merged model (W0 + s B A, in the base dtype) as a plain checkpoint; the model is unchanged after."""
    from lorapar.checkpoint import save_model

    merge(model)
    try:
        save_model(unwrap_model(model), path, format=format)
    finally:
        unmerge(model)


__all__ = [
    "LoraArgs",
    "LoRALinear",
    "apply_lora",
    "lora_modules",
    "adapter_state_dict",
    "named_lora_parameters",
    "set_masks",
    "get_masks",
    "merge",
    "unmerge",
    "disable_adapter",
    "export_merged",
    "INITS",
    "unwrap_model",
    "replace_linears",
    "require_lora",
]
