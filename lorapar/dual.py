"""Dual-Module Collaborative LoRA (Cao, Zhang, Zhang, Li; ACML 2025): a PiSSA shared module plus an
importance-screened expert module.

    y = x W_res^T + s * dropout(x) (B_s A_s + B_e diag(E) A_e)^T,      s = alpha / (r_s + r_e)

Shared module (rank r_s): W0 = U S V^T; A_s = sqrt(S_r / s) V_r^T, B_s = U_r sqrt(S_r / s), so
s * B_s A_s is W0's best rank-r_s approximation, and the frozen base keeps the residual
W_res = W0 - s * B_s A_s: the output is unchanged at init. Expert module (rank r_e): A_e (r_e, in) and
B_e (out, r_e) ~ N(0, init_std^2), gates E (r_e,) = 0, so B_e diag(E) A_e = 0 at init yet E receives a
gradient at the first step and A_e, B_e from the second. One scale s for both modules: the paper's
r = 128 and alpha = 128 give s = 1, the same as a rank-128 LoRA.

Component i of the expert module is (row i of A_e, E_i, column i of B_e); budget.py screens
components. Between screenings a losing component only has its gate zeroed (`gate_experts`, AdaLoRA's
rule); a pruned one (the final mask, or every screening with --dual-pruning freeze) is held by element
masks, the single truth the kernel (gradients) and MaskedAdamW (updates, weight decay, state) read:
E_i is set to 0 and masked, and so are A_e[i, :] and B_e[:, i], which stay bit-identical from then on.

--dual-shared-init released and --dual-expert-init released reproduce the supplement's code where it
differs from the paper (docs/fidelity.md): a shared module from a random matrix over an unmodified W0,
and an expert module that no gradient reaches.

The forward concatenates both modules into one rank-(r_s + r_e) LoRA, A = [A_s; A_e] and
B = [B_s, B_e diag(E)], and calls the fused masked kernel once: one dropout mask, one base matmul.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from kernels import masked_lora_linear
from lorapar.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_tensors, hf_output_rows, read_safetensors
from lorapar.budget import PRUNING_MODES, schedule_steps
from lorapar.config import field
from lorapar.errors import FlagError, check_fields
from lorapar.io import atomic_save_safetensors, atomic_write_json, named_errors
from lorapar.lora import LoRALinear, lora_modules, peft_key, principal_factors, resolve_targets, unwrap_model

EXPERT_INITS = ("gaussian", "released")
SHARED_INITS = ("pissa", "released")
ORTH_EPS = 1e-6  # the supplement's ||A A^T + eps I - I||_F


@dataclass
class DualArgs:
    """DM-LoRA's adapter shape and its importance screening (defaults: the authors' supplement, train.sh)."""

    dual_rank: int = field(default=128, metadata={"help": "total rank r = r_shared + r_expert"})
    dual_shared_rank: int = field(default=32, metadata={"help": "rank of the PiSSA shared module (the rest is expert)"})
    dual_alpha: float = field(default=128.0, metadata={"help": "scale s = alpha / dual_rank for both modules"})
    dual_targets: tuple[str, ...] = field(
        default=("q", "k", "v", "o", "gate", "up", "down"),
        metadata={"help": "target linears (Meta, HF or short names)"},
    )
    dual_dropout: float = 0.0
    dual_shared_init: str = field(default="pissa", metadata={
        "choices": list(SHARED_INITS),
        "help": "pissa: the principal factors of the loaded W0, the residual in the base (the paper); released: the "
                "supplement's code, the principal factors of a random kaiming matrix and W0 left as it is"})
    dual_expert_init: str = field(default="gaussian", metadata={
        "choices": list(EXPERT_INITS),
        "help": "gaussian: A_e, B_e ~ N(0, init_std^2), E = 0 (AdaLoRA); released: the supplement's kaiming A_e, "
                "B_e = E = 0, which no gradient ever reaches"})
    dual_init_std: float = field(default=0.02, metadata={"help": "std of the expert factors A_e, B_e (gaussian init)"})
    dual_svd_niter: int = field(
        default=0, metadata={"help": "0 = exact SVD of W0; N > 0 = randomised SVD with N subspace iterations "
                             "(the supplement: 4)"}
    )
    dual_target_rank: float = field(default=80.0, metadata={"help": "final average number of live expert components"})
    dual_t_init: float = field(default=235 / 1562, metadata={
        "help": "optimizer steps before pruning starts: a fraction of the run if < 1, else a number of steps "
                "(default: the supplement's 235 of 1562)"})
    dual_t_final: float = field(default=780 / 1562, metadata={
        "help": "last optimizer steps with the final mask fixed: a fraction of the run if < 1, else steps "
                "(default: the supplement's 780 of 1562)"})
    dual_delta_t: int = field(default=10, metadata={"help": "re-screen every this many steps"})
    dual_pruning: str = field(default="regrow", metadata={
        "choices": list(PRUNING_MODES),
        "help": "regrow: a screening zeroes the losers' gates, which may grow back until the final mask at "
                "T - t_final (AdaLoRA, the supplement); freeze: a pruned component is masked for good at once"})
    dual_beta1: float = field(default=0.85, metadata={"help": "EMA of the sensitivity |w * grad|"})
    dual_beta2: float = field(default=0.85, metadata={"help": "EMA of the uncertainty |I - I_bar|"})
    dual_budget_power: float = field(default=2.0, metadata={"help": "budget schedule exponent (2 paper, 3 AdaLoRA)"})
    dual_orth_lambda: float = field(default=0.1, metadata={"help": "weight of the orthogonality regulariser"})
    dual_seed: int = field(default=0, metadata={"help": "seed of the expert init (and of a randomised SVD)"})

    @property
    def expert_rank(self) -> int:
        return self.dual_rank - self.dual_shared_rank

    @property
    def scale(self) -> float:
        return self.dual_alpha / self.dual_rank

    def __post_init__(self) -> None:
        check_fields(self, positive=("dual_delta_t",), positive_float=("dual_alpha", "dual_budget_power"),
                     non_negative=("dual_init_std", "dual_svd_niter", "dual_t_init", "dual_t_final", "dual_orth_lambda",
                                   "dual_seed", "dual_target_rank"), unit_interval=("dual_beta1", "dual_beta2"))
        if not 0 <= self.dual_dropout < 1:
            raise FlagError(f"--dual-dropout {self.dual_dropout}: expected a value in [0, 1)")
        if not 0 < self.dual_shared_rank < self.dual_rank:
            raise ValueError(
                f"DualArgs: need 0 < dual_shared_rank ({self.dual_shared_rank}) < dual_rank ({self.dual_rank})"
            )
        if not 0 <= self.dual_target_rank <= self.expert_rank:
            raise ValueError(
                f"DualArgs: dual_target_rank ({self.dual_target_rank}) must lie in [0, expert rank {self.expert_rank}]"
            )
        for flag, value in (("--dual-t-init", self.dual_t_init), ("--dual-t-final", self.dual_t_final)):
            schedule_steps(value, 1, flag)  # the form of the value; the run length is checked by the screener
        for flag, value, choices in (("--dual-pruning", self.dual_pruning, PRUNING_MODES),
                                     ("--dual-expert-init", self.dual_expert_init, EXPERT_INITS),
                                     ("--dual-shared-init", self.dual_shared_init, SHARED_INITS)):
            if value not in choices:
                raise ValueError(f"DualArgs: {flag} {value!r}; expected one of {choices}")

    def schedule(self, total_steps: int) -> tuple[int, int]:
        """(t_init, t_final) in optimizer steps for a run of `total_steps`."""
        return (schedule_steps(self.dual_t_init, total_steps, "--dual-t-init"),
                schedule_steps(self.dual_t_final, total_steps, "--dual-t-final"))


class DualLoRALinear(LoRALinear):
    """A PiSSA LoRALinear (the shared module: `lora_A`, `lora_B`, residual base `weight`, `init_A`,
    `init_B`, shared masks) plus the expert module `expert_A` (r_e, in), `expert_B` (out, r_e),
    `expert_E` (r_e,) with masks `mask_expert_A/B/E` (bool buffers, None = every element trains).

    Everything LoRALinear offers (merge, unmerge, disable_adapter, export_merged, shared masks) keeps
    working: `merge` folds in the expert too, and the disabled forward is the original W0.
    """

    # parameter -> the buffer holding its element mask (read by masks.param_masks / MaskedAdamW.for_model)
    MASK_OF = {"lora_A": "mask_A", "lora_B": "mask_B", "expert_A": "mask_expert_A", "expert_B": "mask_expert_B",
               "expert_E": "mask_expert_E"}

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
    def reset_dual(self, generator: torch.Generator, init_std: float, svd_niter: int = 0,
                   expert_init: str = "gaussian", shared_init: str = "pissa") -> None:
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.adapter_enabled:
            return super().forward(x)
        A = torch.cat((self.lora_A, self.expert_A))
        B = torch.cat((self.lora_B, self.expert_B * self.expert_E), dim=1)
        mask_A, mask_B = self._kernel_masks()
        return masked_lora_linear(
            x, self.weight, A, B, self.scale, mask_A, mask_B, dropout_p=self.dropout, training=self.training
        )

    def _kernel_masks(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
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
            raise ValueError(f"prune_experts: expected a bool mask of shape {tuple(self.expert_E.shape)}, got "
                             f"{alive.dtype} {tuple(alive.shape)}")
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
            raise ValueError(f"gate_experts: expected a bool mask of shape {tuple(self.expert_E.shape)}, got "
                             f"{kept.dtype} {tuple(kept.shape)}")
        if self.merged:
            raise RuntimeError("gate_experts: unmerge the adapter first")
        self.expert_E.masked_fill_(~kept.to(self.expert_E.device), 0.0)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, expert_rank={self.expert_E.shape[0]}, "
                f"live_experts={int(self.expert_alive.sum())}")


# ---------------------------------------------------------------------- model-level functions

PARAMS = ("lora_A", "lora_B", "expert_A", "expert_B", "expert_E")
MASKS_FILE = "masks.safetensors"  # next to lorapar.adapter's ADAPTER_WEIGHTS and ADAPTER_CONFIG


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


def _require_dual(model: nn.Module, what: str) -> dict[str, DualLoRALinear]:
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
            raise ValueError(f"apply_dual: dual_rank {args.dual_rank} exceeds min(out, in) of {name} {tuple(module.weight.shape)}")
        dual = DualLoRALinear(module.weight, args.dual_shared_rank, args.expert_rank, args.dual_alpha, args.dual_dropout)
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
            m.reset_dual(generator, args.dual_init_std, args.dual_svd_niter, args.dual_expert_init,
                         args.dual_shared_init)
    return found


def named_dual_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """[(adapter key, Parameter)] for every trainable tensor, in model order."""
    return [(adapter_key(name, p), getattr(m, p)) for name, m in dual_modules(model).items() for p in PARAMS]


def get_dual_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{adapter key: bool mask} for every trainable tensor (all-true where no mask is set)."""
    return {
        adapter_key(name, p): m._mask_or_ones(p) for name, m in _require_dual(model, "get_dual_masks").items() for p in PARAMS
    }


def set_dual_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Install masks keyed by adapter_key; the key set must match the model's exactly."""
    modules = _require_dual(model, "set_dual_masks")
    params = dict(named_dual_parameters(model))
    missing, extra = sorted(set(params) - set(masks)), sorted(set(masks) - set(params))
    if missing or extra:
        raise KeyError(f"set_dual_masks: mask keys do not match the dual-LoRA parameters; missing {missing[:3]} "
                       f"({len(missing)}), unexpected {extra[:3]} ({len(extra)})")
    for key, mask in masks.items():
        if mask.dtype != torch.bool or mask.shape != params[key].shape:
            raise ValueError(f"set_dual_masks: mask {key} must be bool {tuple(params[key].shape)}, got {mask.dtype} {tuple(mask.shape)}")
    for name, m in modules.items():
        for p in PARAMS:
            mask = masks[adapter_key(name, p)]
            setattr(m, m.MASK_OF[p], None if bool(mask.all()) else mask.to(getattr(m, p).device).clone())


def orthogonality_loss(model: nn.Module) -> torch.Tensor:
    """The supplement's regulariser (the caller multiplies by lambda): the mean over the 2 * modules
    matrices of ||A_e A_e^T + eps I - I||_F and ||B_e^T B_e + eps I - I||_F, eps = ORTH_EPS, non-squared
    Frobenius norms in fp32, as peft's AdaLoRA (whose mean is also per matrix) restricted to the expert.

    Gradients, with M = A A^T - (1 - eps) I and N = B^T B - (1 - eps) I (both symmetric), n = 2 * modules:
        dL/dA = 2 M A / (n ||M||_F),    dL/dB = 2 B N / (n ||N||_F)     (0 where the norm is 0).
    Pruned rows / columns stay in the sum, as in AdaLoRA; their own gradients are ignored by the masks.
    """
    modules = list(_require_dual(model, "orthogonality_loss").values())
    total = 0.0
    with torch.autocast(device_type=modules[0].expert_A.device.type, enabled=False):
        for m in modules:
            dtype = torch.promote_types(m.expert_A.dtype, torch.float32)  # at least fp32
            A, B = m.expert_A.to(dtype), m.expert_B.to(dtype)
            eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device) * (1.0 - ORTH_EPS)
            total = total + torch.linalg.matrix_norm(A @ A.T - eye) + torch.linalg.matrix_norm(B.T @ B - eye)
    return total / (2 * len(modules))


# ---------------------------------------------------------------------- adapters on disk


B_TENSORS = ("lora_B", "expert_B", "init_B")  # (out, r): their rows follow the base weight's output rows


def dual_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter file's tensors: every trainable tensor plus each module's initial shared factors
    (init_A, init_B), which rebuild the residual base W0 - s B0 A0 from the original W0 on loading
    (none with --dual-shared-init released, whose base is W0 itself).
    Output rows of q/k B-type tensors in HF order (lorapar.adapter.hf_output_rows), as in LoRA adapter files."""
    model_args = unwrap_model(model).args
    out = {}
    for name, m in _require_dual(model, "dual_state_dict").items():
        for p in (*PARAMS, "init_A", "init_B") if m.init_A is not None else PARAMS:
            tensor = getattr(m, p).detach().float().cpu()
            out[adapter_key(name, p)] = hf_output_rows(name, tensor, model_args, to_hf=True) if p in B_TENSORS else tensor
    return out


def save_dual_adapter(model: nn.Module, out_dir: str, args: DualArgs) -> None:
    """adapter_model.safetensors (dual_state_dict), adapter_config.json, masks.safetensors (every
    trainable tensor's mask; pruned components are the false rows / columns)."""
    modules = _require_dual(model, "save_dual_adapter")
    if any(m.merged for m in modules.values()):
        raise RuntimeError("save_dual_adapter: unmerge the adapter first")
    config = {
        "adapter": "dual_lora",
        "peft_type": "DUAL_LORA",  # not "LORA": peft and adapter.load_adapter must refuse it, not load half of it
        "target_modules": sorted({peft_key(n, "A").split(".")[-3] for n in modules}),
        "r": args.dual_rank,
        "lora_alpha": args.dual_alpha,
        "live_expert_components": {n: int(m.expert_alive.sum()) for n, m in modules.items()},
        "dual_args": dataclasses.asdict(args),
    }
    atomic_save_safetensors(os.path.join(out_dir, ADAPTER_WEIGHTS), dual_state_dict(model), metadata={"format": "pt"})
    atomic_save_safetensors(os.path.join(out_dir, MASKS_FILE), get_dual_masks(model))
    atomic_write_json(os.path.join(out_dir, ADAPTER_CONFIG), config)


def is_dual_adapter(adapter_dir: str) -> bool:
    """Whether `adapter_dir` holds a dual-LoRA adapter (load_dual_adapter) rather than a LoRA one (adapter.load_adapter)."""
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    with named_errors(path, "an adapter_config.json (a JSON object)"), open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    return isinstance(config, dict) and config.get("adapter") == "dual_lora"


def read_dual_config(adapter_dir: str) -> DualArgs:
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    with named_errors(path, "an adapter_config.json (a JSON object)"), open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    if not isinstance(config, dict) or config.get("adapter") != "dual_lora" \
            or not isinstance(config.get("dual_args"), dict):
        raise ValueError(f"{path}: not a dual-LoRA adapter (expected \"adapter\": \"dual_lora\" and a \"dual_args\" object)")
    known = {f.name for f in dataclasses.fields(DualArgs)}
    unknown = sorted(set(config["dual_args"]) - known)
    if unknown:
        raise ValueError(f"{path}: unknown dual_args key(s) {unknown}; expected keys among {sorted(known)}")
    return DualArgs(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["dual_args"].items()})


@torch.no_grad()
def load_dual_adapter(model: nn.Module, adapter_dir: str) -> DualArgs:
    """Load an adapter saved by save_dual_adapter onto the original base model (applying the
    dual modules first if the model has none); the output equals the saving model's."""
    args = read_dual_config(adapter_dir)
    modules = dual_modules(model) or apply_dual(model, args, initialise=False)
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    tensors, _ = read_safetensors(path)
    residual = args.dual_shared_init == "pissa"  # "released" leaves W0 in the base: no init factors
    shapes = {  # init_A / init_B have the shared factors' shapes
        adapter_key(n, p): getattr(m, {"init_A": "lora_A", "init_B": "lora_B"}.get(p, p)).shape
        for n, m in modules.items() for p in ((*PARAMS, "init_A", "init_B") if residual else PARAMS)
    }
    check_tensors(tensors, shapes, path)
    model_args = unwrap_model(model).args
    for name, m in modules.items():
        for p in B_TENSORS if residual else ("lora_B", "expert_B"):
            tensors[adapter_key(name, p)] = hf_output_rows(name, tensors[adapter_key(name, p)], model_args, to_hf=False)
        if not residual:
            if m.init_A is not None:
                raise ValueError(f"{path}: {name} has a residual base here; a released-init adapter loads onto W0")
            m.init = "released"
        elif m.init_A is None:
            m.set_residual_base(tensors[adapter_key(name, "init_A")], tensors[adapter_key(name, "init_B")])
            m.init = "pissa"
        elif not (torch.equal(m.init_A.cpu(), tensors[adapter_key(name, "init_A")])
                  and torch.equal(m.init_B.cpu(), tensors[adapter_key(name, "init_B")])):
            raise ValueError(f"{path}: {name} was initialised from other principal factors; load onto the original base model")
        for p in PARAMS:
            getattr(m, p).copy_(tensors[adapter_key(name, p)])
    masks_path = os.path.join(adapter_dir, MASKS_FILE)
    if not os.path.exists(masks_path):
        raise FileNotFoundError(f"{masks_path}: a dual-LoRA adapter needs its masks file (the pruned components)")
    set_dual_masks(model, read_safetensors(masks_path)[0])
    return args
