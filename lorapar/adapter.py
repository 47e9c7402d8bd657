"""LoRA adapter files in peft's layout: adapter_model.safetensors + adapter_config.json.

Keys are peft's ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") and tensors are in
Hugging Face's layout: the rows of q_proj / k_proj lora_B are permuted as lorapar.checkpoint permutes
q/k weights (lorapar/checkpoint/names.py), so that peft on a transformers LLaMA computes exactly the same
function (tested). In memory everything stays in the model's (Meta) layout; only these files are in HF's. The dual-LoRA
adapter (lorapar/dmlora/files.py) shares the file names, the q/k row rule and the key/shape check.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import os
from typing import Optional, Union

import torch
import torch.nn as nn
from safetensors import safe_open

from lorapar.checkpoint import load_model
from lorapar.checkpoint.names import hf_to_meta_state_dict, meta_to_hf_name, meta_to_hf_state_dict
from lorapar.config import ModelArgs
from lorapar.errors import InputError
from lorapar.io import atomic_save_safetensors, atomic_write_json, named_errors
from lorapar.lora import (
    LoraArgs,
    LoRALinear,
    adapter_state_dict,
    lora_modules,
    merge,
    named_lora_parameters,
    replace_linears,
    require_lora,
    unwrap_model,
)
from lorapar.lora_names import META_TO_HF, module_name_of, peft_key, resolve_targets, target_of

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# pissa/olora: the initial A0, B0 (peft keys), from which load_adapter rebuilds the residual base.
ADAPTER_INIT = "adapter_init.safetensors"


def _peft_init_value(args: LoraArgs) -> Union[bool, str]:
    if args.init == "pissa":
        return f"pissa_niter_{args.pissa_niter}" if args.pissa_niter > 0 else "pissa"
    return {"lora": True, "gaussian": "gaussian", "olora": "olora"}[args.init]


def peft_config(args: LoraArgs) -> dict:
    """adapter_config.json contents that peft.LoraConfig accepts (target names in HF spelling)."""
    alpha = int(args.alpha) if float(args.alpha).is_integer() else args.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "revision": None,
        "r": args.r,
        "lora_alpha": alpha,
        "lora_dropout": args.dropout,
        "use_rslora": args.use_rslora,
        "target_modules": [META_TO_HF[m] for m in resolve_targets(args.targets)],
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": _peft_init_value(args),
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "inference_mode": True,
    }


def _args_from_peft_config(config: dict, source: str) -> LoraArgs:
    for key, want in (("peft_type", "LORA"), ("bias", "none")):
        if config.get(key, want) != want:
            raise ValueError(f"{source}: {key} = {config.get(key)!r}; lorapar supports only {want!r}")
    for key in (
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "use_dora",
        "fan_in_fan_out",
        "modules_to_save",
    ):
        if config.get(key):
            raise ValueError(f"{source}: {key} = {config[key]!r} is not supported by lorapar")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise KeyError(f"{source}: missing required key {key!r}")
    init_value = config.get("init_lora_weights", True)
    if init_value is True:
        init, niter = "lora", 0
    elif isinstance(init_value, str) and init_value.startswith("pissa"):
        init, niter = "pissa", int(init_value[len("pissa_niter_") :]) if init_value.startswith("pissa_niter_") else 0
    elif init_value in ("gaussian", "olora"):
        init, niter = init_value, 0
    else:
        raise ValueError(
            f"{source}: init_lora_weights = {init_value!r}; expected true, gaussian, pissa[_niter_N] or olora"
        )
    targets = config["target_modules"]
    return LoraArgs(
        r=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout", 0.0)),
        targets=tuple([targets] if isinstance(targets, str) else targets),
        init=init,
        use_rslora=bool(config.get("use_rslora", False)),
        pissa_niter=niter,
    )


def _check_matches(modules: dict[str, LoRALinear], args: LoraArgs, what: str) -> None:
    """The model's LoRA modules have the rank, scale and target set that `args` describes."""
    have = {target_of(name) for name in modules}
    want = set(resolve_targets(args.targets))
    if have != want:
        raise ValueError(f"{what}: the model adapts {sorted(have)} but the adapter targets {sorted(want)}")
    module = next(iter(modules.values()))
    if module.r != args.r or not math.isclose(module.scale, args.scale):
        raise ValueError(
            f"{what}: the model has r={module.r}, scale={module.scale:g}; the adapter r={args.r}, scale={args.scale:g}"
        )


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Size], source: str) -> None:
    """`tensors` has exactly the keys of `expected`, each of the expected shape; errors name `source`."""
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing:
        raise KeyError(f"{source}: missing {len(missing)} LoRA tensor(s), e.g. {missing[:3]}")
    if extra:
        raise KeyError(f"{source}: {len(extra)} unexpected tensor(s) for this model, e.g. {extra[:3]}")
    wrong = [key for key, shape in expected.items() if tensors[key].shape != shape]
    if wrong:
        key = wrong[0]
        raise ValueError(
            f"{source}: {len(wrong)} tensor(s) of the wrong shape, e.g. {key} has shape {tuple(tensors[key].shape)}, "
            f"the model expects {tuple(expected[key])}"
        )


def hf_output_rows(module_name: str, tensor: torch.Tensor, model_args: ModelArgs, to_hf: bool) -> torch.Tensor:
    """The output rows of a B-type tensor (out, r) of `module_name` moved to Hugging Face's order
    (to_hf) or back. HF permutes the rows of q_proj / k_proj for its rotary layout (lorapar.checkpoint);
    the rows of their B follow, so that peft on the HF model computes the same function."""
    if not module_name.endswith(("wq", "wk")):
        return tensor
    name = module_name + ".weight"
    if to_hf:
        moved = meta_to_hf_state_dict({name: tensor}, model_args)
    else:
        moved = hf_to_meta_state_dict({meta_to_hf_name(name): tensor}, model_args)
    return next(iter(moved.values())).contiguous()


def _peft_layout(
    tensors: dict[str, torch.Tensor], model: nn.Module, to_hf: bool, source: str = ""
) -> dict[str, torch.Tensor]:
    """{peft key: tensor} with every lora_B's rows moved by hf_output_rows."""
    model_args = unwrap_model(model).args
    out = {}
    for key, t in tensors.items():
        try:
            module, which = module_name_of(key)
        except ValueError as error:
            raise KeyError(f"{source}: {error}") from None
        out[key] = (hf_output_rows(module, t, model_args, to_hf) if which == "B" else t).contiguous()
    return out


def save_adapter(model: nn.Module, out_dir: str, args: LoraArgs, metadata: Optional[dict[str, str]] = None) -> None:
    """Write adapter_model.safetensors (peft keys), adapter_config.json and, for pissa/olora, adapter_init.safetensors.

    The exact LoraArgs also go into the weights file's metadata, so load_adapter restores fields peft
    has no name for (init_std, seed); `metadata` adds strings of the caller's. Every file is written
    atomically; the config last.
    """
    modules = require_lora(model, "save_adapter")
    _check_matches(modules, args, "save_adapter")
    metadata = {
        **(metadata or {}),
        "format": "pt",
        # sorted: the file's bytes (and the sha256 score.py stamps its masks with) do not follow field order
        "lorapar_args": json.dumps(dataclasses.asdict(args), sort_keys=True),
    }
    weights = _peft_layout({k: v.float().cpu() for k, v in adapter_state_dict(model).items()}, model, to_hf=True)
    atomic_save_safetensors(os.path.join(out_dir, ADAPTER_WEIGHTS), weights, metadata=metadata)
    if args.init in ("pissa", "olora"):
        init = {}
        for name, m in modules.items():
            if m.init != args.init:
                raise ValueError(f"save_adapter: {name} was initialised with {m.init}, the args say {args.init}")
            init[peft_key(name, "A")], init[peft_key(name, "B")] = m.init_A.cpu(), m.init_B.cpu()
        init = _peft_layout(init, model, to_hf=True)
        atomic_save_safetensors(os.path.join(out_dir, ADAPTER_INIT), init, metadata={"format": "pt"})
    atomic_write_json(os.path.join(out_dir, ADAPTER_CONFIG), peft_config(args))


def read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a missing file is an error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter file not found: {path}")
    with named_errors(path, "a safetensors adapter file"), safe_open(path, framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata() or {}


def adapter_fingerprint(adapter_dir: str) -> str:
    """sha256 of the adapter's weights file: score.py stamps it into the masks it ranked on this adapter."""
    digest = hashlib.sha256()
    with open(os.path.join(adapter_dir, ADAPTER_WEIGHTS), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_adapter_args(adapter_dir: str) -> LoraArgs:
    """The LoraArgs of an adapter directory (lorapar's exact ones when stored, else from peft's config),
    without reading its tensors: what train_sft.py --init-adapter checks its flags against. The
    config and the LoraArgs in the weights' metadata must agree."""
    config_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"adapter config not found: {config_path}")
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except json.JSONDecodeError as error:
        raise InputError(f"{config_path}: invalid JSON ({error}); expected a peft adapter_config.json") from None
    if not isinstance(config, dict):
        raise InputError(
            f"{config_path}: expected a JSON object (a peft adapter_config.json), got {type(config).__name__}"
        )
    weights_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"adapter file not found: {weights_path}")
    metadata = safetensors_metadata(weights_path, "a safetensors adapter file")
    args = _args_from_peft_config(config, config_path)
    if "lorapar_args" in metadata:
        args = LoraArgs(**json.loads(metadata["lorapar_args"]))
        stored = peft_config(args)
        stored["target_modules"], config["target_modules"] = (
            set(stored["target_modules"]),
            set(config["target_modules"]),
        )
        differing = [
            k for k in ("r", "lora_alpha", "target_modules", "use_rslora") if k in config and config[k] != stored[k]
        ]
        if differing:
            raise ValueError(f"{config_path}: {differing} disagree with the LoraArgs stored in {weights_path}")
    return args


def safetensors_metadata(path: str, expected: str = "a safetensors file") -> dict[str, str]:
    """The header metadata of a safetensors file, without reading its tensors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")
    with named_errors(path, expected), safe_open(path, framework="pt") as handle:
        return handle.metadata() or {}


def load_adapter(model: nn.Module, adapter_dir: str, dropout: Optional[float] = None) -> LoraArgs:
    """Load an adapter written by save_adapter (or peft) onto `model`; returns its LoraArgs.

    Without LoRA modules the model must be the original base: LoRA is applied and, for pissa/olora,
    the residual base W0 - s B0 A0 is rebuilt from adapter_init.safetensors exactly as at init. With
    LoRA modules already present (e.g. resuming), their rank, scale and targets must match, and for
    pissa/olora their initial factors must equal the saved ones (else the base would be wrong).
    `dropout` replaces the stored LoRA dropout (a training setting, no part of the adapter's values).
    """
    args = read_adapter_args(adapter_dir)
    if dropout is not None:
        args = dataclasses.replace(args, dropout=dropout)
    weights_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    tensors = _peft_layout(read_safetensors(weights_path)[0], model, to_hf=False, source=weights_path)
    modules = lora_modules(model)
    fresh = not modules
    if fresh:
        modules = replace_linears(model, args)
    _check_matches(modules, args, f"load_adapter({adapter_dir})")
    params = dict(named_lora_parameters(model))
    check_tensors(tensors, {k: p.shape for k, p in params.items()}, weights_path)
    if args.init in ("pissa", "olora"):
        init_path = os.path.join(adapter_dir, ADAPTER_INIT)
        init = _peft_layout(read_safetensors(init_path)[0], model, to_hf=False, source=init_path)
        check_tensors(init, {k: p.shape for k, p in params.items()}, init_path)
    for name, m in modules.items():
        if args.init in ("pissa", "olora"):
            A0, B0 = init[peft_key(name, "A")], init[peft_key(name, "B")]
            if fresh:
                m.set_residual_base(A0, B0)
                m.init = args.init
            elif m.init != args.init or not (torch.equal(m.init_A.cpu(), A0) and torch.equal(m.init_B.cpu(), B0)):
                raise ValueError(
                    f"load_adapter: {name} has a different {args.init} base than {init_path}; "
                    "load onto the original base model instead"
                )
        elif m.init in ("pissa", "olora"):
            raise ValueError(
                f"load_adapter: {name} holds a {m.init} residual base but the adapter was trained with init={args.init}"
            )
        m.dropout = args.dropout
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(tensors[key])
    return args


__all__ = [
    "ADAPTER_WEIGHTS",
    "ADAPTER_CONFIG",
    "ADAPTER_INIT",
    "peft_config",
    "check_tensors",
    "hf_output_rows",
    "save_adapter",
    "read_safetensors",
    "read_adapter_args",
    "adapter_fingerprint",
    "safetensors_metadata",
    "load_adapter",
    "adapter_type",
    "load_any_adapter",
    "load_merged",
]


# Loaders of the adapter types that are not LoRA, by the "adapter" key of their adapter_config.json,
# as "module:function". DM-LoRA builds on this module, so it is named here and imported only when such
# an adapter is loaded: no import cycle, and LoRA-PAR code never loads DM-LoRA.
ADAPTER_LOADERS = {"dual_lora": "lorapar.dmlora.files:load_dual_adapter"}


def adapter_type(adapter_dir: str) -> str:
    """The "adapter" key of the directory's adapter_config.json: "lora" when absent (peft's own files)."""
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    with named_errors(path, "an adapter_config.json (a JSON object)"), open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    kind = config.get("adapter", "lora") if isinstance(config, dict) else "lora"
    return kind if isinstance(kind, str) else "lora"


def load_any_adapter(model: nn.Module, adapter_dir: str):
    """Load a LoRA adapter (load_adapter) or one of ADAPTER_LOADERS' types, told apart by its config."""
    kind = adapter_type(adapter_dir)
    if kind not in ADAPTER_LOADERS:
        return load_adapter(model, adapter_dir)
    module, _, function = ADAPTER_LOADERS[kind].partition(":")
    return getattr(importlib.import_module(module), function)(model, adapter_dir)


def load_merged(ckpt: str, adapter_dir: str = "", device: str = "cpu") -> nn.Module:
    """The base model with an adapter (LoRA or DM-LoRA, told apart by its config) loaded and merged,
    in eval mode: inference then costs what the base costs. Used by evaluation and the server."""
    model = load_model(ckpt, device=device)
    if adapter_dir:
        load_any_adapter(model, adapter_dir)
        merge(model)
    return model.eval()
