"""LoRA target names in every accepted spelling and the peft keys of adapter tensors, in one place.

Targets: short ("q", "gate"), Meta ("wq", "w1") or Hugging Face ("q_proj", "gate_proj"). Modules are
keyed by Meta names ("layers.0.attention.wq"); parameters and masks by peft keys
("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").
"""

from __future__ import annotations

import re
from typing import Sequence, Union

# One canonical spelling (Meta's leaf name) per target, reachable from every accepted spelling.
SHORT_TO_META = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w1", "up": "w3", "down": "w2"}
META_TO_HF = {
    "wq": "q_proj",
    "wk": "k_proj",
    "wv": "v_proj",
    "wo": "o_proj",
    "w1": "gate_proj",
    "w3": "up_proj",
    "w2": "down_proj",
}
HF_TO_META = {h: m for m, h in META_TO_HF.items()}
_HF_BLOCK = {"attention": "self_attn", "feed_forward": "mlp"}
_META_BLOCK = {h: m for m, h in _HF_BLOCK.items()}

MODULE_NAME_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(attention|feed_forward)\.(w[qkvo123])$")
_PEFT_RE = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$")


def resolve_targets(targets: Union[str, Sequence[str]]) -> list[str]:
    """Meta leaf names ("wq", "w1", ...) for targets in any accepted spelling ("q,gate" too), in canonical order."""
    if isinstance(targets, str):
        targets = [t for t in targets.split(",") if t]
    if not targets:
        raise ValueError("LoRA targets are empty; expected some of q,k,v,o,gate,up,down")
    resolved = set()
    for t in targets:
        meta = SHORT_TO_META.get(t) or HF_TO_META.get(t) or (t if t in META_TO_HF else None)
        if meta is None:
            valid = ", ".join(f"{s}/{m}/{META_TO_HF[m]}" for s, m in SHORT_TO_META.items())
            raise ValueError(f"unknown LoRA target {t!r}; valid targets (short/Meta/HF spelling): {valid}")
        resolved.add(meta)
    return [m for m in META_TO_HF if m in resolved]


def peft_key(module_name: str, which: str) -> str:
    """ "layers.0.attention.wq", "A" -> "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"."""
    match = MODULE_NAME_RE.search(module_name)
    if match is None or which not in ("A", "B"):
        raise ValueError(
            f"peft_key: expected a 'layers.N.attention|feed_forward.wX' module and 'A'|'B', got {module_name!r}, "
            f"{which!r}"
        )
    layer, block, leaf = match.groups()
    return f"base_model.model.model.layers.{layer}.{_HF_BLOCK[block]}.{META_TO_HF[leaf]}.lora_{which}.weight"


def target_of(module_name: str) -> str:
    """ "layers.0.attention.wq" -> "wq": the Meta leaf name of a module LoRA can target."""
    match = MODULE_NAME_RE.search(module_name)
    if match is None:
        raise ValueError(f"target_of: expected a 'layers.N.attention|feed_forward.wX' module, got {module_name!r}")
    return match.group(3)


def module_name_of(key: str) -> tuple[str, str]:
    """Inverse of peft_key: a peft key -> (Meta module name, "A"|"B")."""
    match = _PEFT_RE.match(key)
    if match is None or match.group(2) not in _META_BLOCK or match.group(3) not in HF_TO_META:
        raise ValueError(
            f"{key!r} is not a peft LoRA key like 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'"
        )
    layer, block, proj, which = match.groups()
    return f"layers.{layer}.{_META_BLOCK[block]}.{HF_TO_META[proj]}", which
