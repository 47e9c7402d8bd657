"""The LoRA adapter's settings as flags, declared once: --rank, --lora-alpha and --targets are the
fields `rank`, `lora_alpha` and `targets` of `LoraSettings` in every command that has them (train_sft.py,
train_rl.py, score.py through ImportanceArgs, the pipeline through PipelineConfig).

lorapar.lora.LoraArgs is the adapter's own description (what adapter_config.json and config.json hold,
in peft's vocabulary r / alpha); `to_lora_args` is the one place the flags become it. DM-LoRA's --dual-*
flags are settings of another adapter and stay in lorapar.dmlora.args.DualArgs.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from lorapar.config import add_dataclass_args, dataclass_from_args, field
from lorapar.errors import check_fields
from lorapar.lora import LoraArgs

# LoraArgs' fields that LoraSettings declares (as rank / lora_alpha / targets) or --seed sets.
SHARED_LORA_FIELDS = ("r", "alpha", "targets", "seed")


@dataclass
class LoraSettings:
    """The shape of a LoRA adapter: its rank, its scale's numerator and the projections it adapts."""

    rank: int = field(default=LoraArgs.r, metadata={"help": "LoRA rank r"})
    lora_alpha: float = field(
        default=LoraArgs.alpha, metadata={"help": "lora_alpha; the update is scaled by lora_alpha / rank"}
    )
    targets: tuple[str, ...] = field(
        default=LoraArgs.targets,
        metadata={"help": "projections to adapt: q,k,v,o,gate,up,down (or wq..w3, or q_proj..down_proj)"},
    )

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        check_fields(self, positive=("rank",), positive_float=("lora_alpha",))

    def to_lora_args(self, **rest) -> LoraArgs:
        """The adapter's LoraArgs with these settings; `rest` gives its other fields (init, dropout, seed, ...)."""
        return LoraArgs(r=self.rank, alpha=self.lora_alpha, targets=self.targets, **rest)


def add_lora_flags(parser: argparse.ArgumentParser) -> None:
    """The training scripts' LoRA flags: LoraSettings' and LoraArgs' others (the LoRA seed is --seed)."""
    add_dataclass_args(parser, LoraSettings)
    add_dataclass_args(parser, LoraArgs, skip=SHARED_LORA_FIELDS)


def lora_args_from_flags(ns: argparse.Namespace, seed: int) -> LoraArgs:
    """The LoraArgs the LoRA flags of `ns` give (defaults for those not given), drawn with `seed`."""
    settings = dataclass_from_args(LoraSettings, ns)
    rest = dataclass_from_args(LoraArgs, ns, LoraArgs(seed=seed))
    return settings.to_lora_args(**{k: v for k, v in vars(rest).items() if k not in ("r", "alpha", "targets")})


def lora_flags_given(ns: argparse.Namespace) -> dict[str, tuple[str, Any]]:
    """{LoraArgs field: (its flag, the value given)} of every LoRA flag on the command line (the seed is --seed's)."""
    dests = {"r": "rank", "alpha": "lora_alpha"}  # LoraArgs field -> LoraSettings field (its flag's dest)
    given = {}
    for name in LoraArgs.__dataclass_fields__:
        dest = dests.get(name, name)
        if name != "seed" and getattr(ns, dest, None) is not None:
            given[name] = ("--" + dest.replace("_", "-"), getattr(ns, dest))
    return given
