"""DM-LoRA adapters on disk: adapter_model.safetensors, adapter_config.json and masks.safetensors, in
the file names and the Hugging Face row layout of LoRA adapters (lorapar.adapter)."""

from __future__ import annotations

import dataclasses
import json
import os

import torch
import torch.nn as nn

from lorapar.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_type,
    check_tensors,
    hf_output_rows,
    read_safetensors,
)
from lorapar.dmlora.args import DualArgs
from lorapar.dmlora.modules import (
    PARAMS,
    adapter_key,
    apply_dual,
    dual_modules,
    get_dual_masks,
    require_dual,
    set_dual_masks,
)
from lorapar.io import atomic_save_safetensors, atomic_write_json, named_errors
from lorapar.lora import unwrap_model
from lorapar.lora_names import peft_key

MASKS_FILE = "masks.safetensors"  # next to lorapar.adapter's ADAPTER_WEIGHTS and ADAPTER_CONFIG
B_TENSORS = ("lora_B", "expert_B", "init_B")  # (out, r): their rows follow the base weight's output rows


def dual_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter file's tensors: every trainable tensor plus each module's initial shared factors
    (init_A, init_B), which rebuild the residual base W0 - s B0 A0 from the original W0 on loading
    (none with --dual-shared-init released, whose base is W0 itself).
    Output rows of q/k B-type tensors in HF order (lorapar.adapter.hf_output_rows), as in LoRA adapter files."""
    model_args = unwrap_model(model).args
    out = {}
    for name, m in require_dual(model, "dual_state_dict").items():
        for p in (*PARAMS, "init_A", "init_B") if m.init_A is not None else PARAMS:
            tensor = getattr(m, p).detach().float().cpu()
            out[adapter_key(name, p)] = (
                hf_output_rows(name, tensor, model_args, to_hf=True) if p in B_TENSORS else tensor
            )
    return out


def save_dual_adapter(model: nn.Module, out_dir: str, args: DualArgs) -> None:
    """adapter_model.safetensors (dual_state_dict), adapter_config.json, masks.safetensors (every
    trainable tensor's mask; pruned components are the false rows / columns)."""
    modules = require_dual(model, "save_dual_adapter")
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
    """Whether `adapter_dir` holds a dual-LoRA adapter (load_dual_adapter), not a LoRA one (adapter.load_adapter)."""
    return adapter_type(adapter_dir) == "dual_lora"


def read_dual_config(adapter_dir: str) -> DualArgs:
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    with named_errors(path, "an adapter_config.json (a JSON object)"), open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    if (
        not isinstance(config, dict)
        or config.get("adapter") != "dual_lora"
        or not isinstance(config.get("dual_args"), dict)
    ):
        raise ValueError(f'{path}: not a dual-LoRA adapter (expected "adapter": "dual_lora" and a "dual_args" object)')
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
        for n, m in modules.items()
        for p in ((*PARAMS, "init_A", "init_B") if residual else PARAMS)
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
        elif not (
            torch.equal(m.init_A.cpu(), tensors[adapter_key(name, "init_A")])
            and torch.equal(m.init_B.cpu(), tensors[adapter_key(name, "init_B")])
        ):
            raise ValueError(
                f"{path}: {name} was initialised from other principal factors; load onto the original base model"
            )
        for p in PARAMS:
            getattr(m, p).copy_(tensors[adapter_key(name, p)])
    masks_path = os.path.join(adapter_dir, MASKS_FILE)
    if not os.path.exists(masks_path):
        raise FileNotFoundError(f"{masks_path}: a dual-LoRA adapter needs its masks file (the pruned components)")
    set_dual_masks(model, read_safetensors(masks_path)[0])
    return args
