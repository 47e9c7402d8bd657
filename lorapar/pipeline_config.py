"""The pipeline's settings: PipelineConfig (one flag per field), the embedded default and the smoke run
that scale the paper's recipe to the tiny synthetic task, and the command line (python -m lorapar.pipeline)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Optional

from lorapar.config import add_dataclass_args, dataclass_from_args, field
from lorapar.errors import FlagError, check_fields
from lorapar.lora_settings import LoraSettings
from lorapar.rewards import DEFAULT_SPEC
from lorapar.tokenizer import checkpoint_tokenizer

METHODS = ("lora", "lorapar", "random", "pissa", "dmlora")


@dataclass
class PipelineConfig(LoraSettings):
    """Defaults are the paper's recipe (real inputs); EMBEDDED and SMOKE below scale it to the tiny task.
    LoraSettings (--rank, --lora-alpha, --targets) is the adapter of every LoRA row."""

    out: str = field(default="runs/default", metadata={"help": "run directory (one subdirectory per stage)"})
    smoke: bool = field(default=False, metadata={"help": "toy sizes for a ~1-minute run of every stage (CI)"})
    overwrite: bool = field(default=False, metadata={"help": "redo every stage instead of skipping completed ones"})
    seed: int = field(default=0, metadata={"help": "first training seed (and the seed of the embedded task and base)"})
    seeds: int = field(
        default=1,
        metadata={
            "help": (
                "repeat every method with seeds seed..seed+N-1 (adapter init, data order, sampling); the "
                "embedded default uses 3"
            )
        },
    )
    threads: int = field(
        default=0, metadata={"help": "torch CPU threads (0: torch's default; the embedded default uses 1)"}
    )
    workers: int = field(
        default=1, metadata={"help": "processes running seeds / the theta sweep at once (the embedded default uses 2)"}
    )
    assets: str = field(
        default="", metadata={"help": "embedded default: where the built assets live (default OUT/assets)"}
    )
    ckpt: str = field(
        default="", metadata={"help": "real inputs: base model (Meta dir, HF dir, .gguf or llama2.c .bin)"}
    )
    tokenizer: str = field(
        default="",
        metadata={"help": "real inputs: tokenizer.model, tokenizer.json or .gguf (default: the one --ckpt carries)"},
    )
    train_data: str = field(default="", metadata={"help": "real inputs: GSM8K-format training jsonl"})
    test_data: str = field(
        default="", metadata={"help": "real inputs: GSM8K-format test jsonl ('system' field: per-system accuracy)"}
    )
    teachers: tuple[str, ...] = ()  # --teacher SPEC, repeatable (specs contain commas, so not a list flag)
    teacher_batch_size: int = 16
    methods: tuple[str, ...] = field(default=METHODS, metadata={"help": f"rows of the table, among {METHODS}"})
    template: str = field(
        default="lorapar",
        metadata={
            "choices": ["plain", "chat", "reasoning", "lorapar"],
            "help": "prompt/response template of every stage",
        },
    )
    rewards: str = field(default=DEFAULT_SPEC, metadata={"help": "GRPO rewards (lorapar/rewards.py spec)"})
    # score (importance + partition)
    theta: float = field(default=0.9, metadata={"help": "cumulative-importance threshold per system"})
    theta_sweep: tuple[float, ...] = field(
        default=(),
        metadata={"help": "thetas of the SFT-only curve, importance vs random masks, first seed (empty: none)"},
    )
    score_samples: int = field(default=100, metadata={"help": "examples scored per system"})
    # SFT (train_sft.py --preset lorapar-sft, these fields on top)
    sft_steps: int = field(default=0, metadata={"help": "optimizer steps of every SFT run (0: one epoch of its data)"})
    sft_lr: float = 2e-4
    sft_batch_size: int = 4
    sft_global_batch: int = 32
    sft_max_len: int = 512
    # GRPO (train_rl.py --preset lorapar-grpo, these fields on top)
    rl_steps: int = field(
        default=0, metadata={"help": "GRPO steps of every RL run (0: one epoch of the System-2 prompts)"}
    )
    rl_lr: float = 5e-6
    rl_prompts_per_step: int = 4
    rl_generations: int = 8
    rl_max_prompt_len: int = 128
    rl_max_completion_len: int = 256
    rl_beta: float = field(
        default=0.0, metadata={"help": "GRPO KL coefficient (0 as TRL v0.19.1, the preset's release)"}
    )
    rl_temperature: float = field(default=1.0, metadata={"help": "GRPO sampling temperature"})
    rl_top_p: float = field(default=1.0, metadata={"help": "GRPO nucleus sampling"})
    rl_micro_batch: int = 8
    # DM-LoRA (train_sft.py --adapter dual)
    dual_rank: int = 128
    dual_shared_rank: int = 32
    dual_alpha: float = 128.0
    dual_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")  # the supplement's
    dual_target_rank: float = 80.0
    dual_t_init: float = field(default=235 / 1562, metadata={"help": "fraction of the SFT steps (< 1) or steps"})
    dual_t_final: float = field(default=780 / 1562, metadata={"help": "fraction of the SFT steps (< 1) or steps"})
    dual_delta_t: int = 10
    # evaluation
    eval_batch_size: int = 16
    eval_max_new_tokens: int = 256
    eval_limit: int = field(default=0, metadata={"help": "evaluate the first N test items (0: all)"})
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap replicates of every paired interval"})
    save_every: int = field(
        default=0, metadata={"help": "training checkpoint interval (0: only at the end); resume granularity"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.methods, self.teachers = tuple(self.methods), tuple(self.teachers)
        self.theta_sweep = tuple(float(t) for t in self.theta_sweep)
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"--methods: unknown {unknown}; expected among {METHODS}")
        check_fields(  # the stages' own dataclasses check these again; here they fail before any stage runs
            self,
            positive=(
                "seeds",
                "workers",
                "bootstrap",
                "teacher_batch_size",
                "score_samples",
                "sft_batch_size",
                "sft_max_len",
                "rl_prompts_per_step",
                "rl_max_prompt_len",
                "rl_max_completion_len",
                "rl_micro_batch",
                "dual_rank",
                "dual_delta_t",
                "eval_batch_size",
                "eval_max_new_tokens",
            ),
            positive_float=("sft_lr", "rl_lr", "dual_alpha"),
            open_unit_interval=(),
            non_negative=(
                "seed",
                "threads",
                "sft_steps",
                "sft_global_batch",
                "rl_steps",
                "rl_beta",
                "rl_temperature",
                "dual_target_rank",
                "dual_t_init",
                "dual_t_final",
                "eval_limit",
                "save_every",
            ),
        )
        if not 0 < self.theta <= 1 or not 0 < self.rl_top_p <= 1:
            raise FlagError(f"--theta {self.theta} / --rl-top-p {self.rl_top_p}: expected values in (0, 1]")
        if self.rl_generations < 2:
            raise FlagError(f"--rl-generations {self.rl_generations}: expected >= 2 (GRPO needs a group to compare)")
        bad = [t for t in self.theta_sweep if not 0.0 < t <= 1.0]
        if bad:
            raise FlagError(f"--theta-sweep: every theta must be in (0, 1]; got {bad}")

    def seed_values(self) -> list[int]:
        return [self.seed + k for k in range(self.seeds)]


# The embedded default, chosen once for the task and used for every method alike (no per-method
# tuning), sized for 20 minutes on 2 CPU cores with the time spent on seeds and test items first (the
# README gives the measurements behind each size). The tiny base needs larger learning rates than a 7B
# model and the answers are short, so lengths shrink. SFT steps set whether multi-step answers are
# learnt at all in so small a model; GRPO samples at temperature 0.7 so that a group of 8 holds both
# right and wrong completions (pass@8 is reported); its KL coefficient is the preset's (0). One thread
# per process, two processes. The theta sweep (--theta-sweep 0.3,0.6,0.8,0.9,1.0) is off: its 8 extra
# SFT runs would take the run past its 20 minutes.
EMBEDDED = dict(
    seeds=3,
    threads=1,
    workers=2,
    template="plain",
    rewards="correct_lenient=2.0",
    score_samples=100,
    theta_sweep=(),
    sft_steps=800,
    sft_lr=3e-3,
    sft_batch_size=8,
    sft_global_batch=8,
    sft_max_len=192,
    rl_steps=10,
    rl_lr=1e-4,
    rl_prompts_per_step=8,
    rl_generations=8,
    rl_max_prompt_len=64,
    rl_max_completion_len=96,
    rl_micro_batch=32,
    rl_temperature=0.7,
    rl_beta=0.0,
    rl_top_p=1.0,
    dual_rank=8,
    dual_shared_rank=2,
    dual_alpha=64.0,
    dual_target_rank=4.0,
    dual_t_init=100,
    dual_t_final=200,
    dual_delta_t=50,
    eval_batch_size=100,
    eval_max_new_tokens=96,
    save_every=250,
)
SMOKE = dict(
    EMBEDDED,
    seeds=2,
    score_samples=8,
    theta_sweep=(0.5, 0.9),
    sft_steps=4,
    sft_lr=2e-3,
    sft_batch_size=8,
    sft_global_batch=8,
    rl_steps=2,
    rl_prompts_per_step=2,
    rl_generations=4,
    rl_max_completion_len=24,
    dual_t_init=1,
    dual_t_final=1,
    dual_delta_t=1,
    eval_limit=16,
    eval_max_new_tokens=24,
    save_every=2,
    bootstrap=200,
)


def parse_config(argv: Optional[list[str]] = None, description: str = "") -> PipelineConfig:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--teacher",
        dest="teachers",
        action="append",
        default=None,
        metavar="SPEC",
        help="classify teacher (repeat; an odd number): rule:..., local:CKPT[,tokenizer=PATH], http:URL#MODEL "
        "(default: real inputs rule:gsm8k-steps; embedded: three rules, see Pipeline.teachers)",
    )
    add_dataclass_args(parser, PipelineConfig, skip=("teachers",))
    ns = parser.parse_args(argv)
    if ns.ckpt and not ns.tokenizer:  # a GGUF file or a model directory may carry its own tokenizer
        ns.tokenizer = checkpoint_tokenizer(ns.ckpt)
    real = [name for name in ("ckpt", "tokenizer", "train_data", "test_data") if getattr(ns, name)]
    if real and len(real) < 4:
        parser.error(
            "real inputs need --ckpt, --tokenizer, --train-data and --test-data; got only "
            f"{['--' + n.replace('_', '-') for n in real]}"
        )
    base = PipelineConfig()
    if not real:
        base = dataclasses.replace(base, **(SMOKE if ns.smoke else EMBEDDED))
    elif ns.smoke:
        base = dataclasses.replace(base, **{k: v for k, v in SMOKE.items() if k not in ("template", "rewards")})
    try:
        cfg = dataclass_from_args(PipelineConfig, ns, base)
    except ValueError as error:
        parser.error(str(error))
    return dataclasses.replace(cfg, teachers=tuple(ns.teachers or ()))
