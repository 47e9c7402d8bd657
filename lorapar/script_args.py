"""The command-line scripts' settings (train_sft.py, train_rl.py, score.py, classify.py) as dataclasses,
with the training scripts' paper presets.

They live in the library so that the pipeline can build a script's exact settings and run the script
with them (`config.to_argv`), as a user would, without importing the script. Each field is one flag
(lorapar/config.py); a script's other sections are the library's own (LoraSettings, GRPOArgs, DualArgs,
ImportanceArgs, PartitionArgs, TeacherArgs).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Optional

from lorapar.config import field
from lorapar.data import FORMATS
from lorapar.errors import FlagError, check_fields
from lorapar.optim import SCHEDULES
from lorapar.partition import RANDOM_SCOPES
from lorapar.precision import BASE_DTYPES
from lorapar.rewards import DEFAULT_SPEC
from lorapar.templates import TEMPLATES


def over_preset(cls: type, preset: dict, **values):
    """`cls` with a preset's values (its section named `cls.__name__`) and `values` over them."""
    return cls(**{**preset.get(cls.__name__, {}), **values})


# ----------------------------------------------------------------------------- both training scripts


@dataclass
class InputArgs:
    """Where both training scripts read the base model, tokenizer, data and element masks from."""

    ckpt: str = field(default="", metadata={"help": "base model (Meta dir, HF dir or llama2.c .bin)"})
    tokenizer: str = field(default="", metadata={"help": "SentencePiece tokenizer.model"})
    data: str = field(default="", metadata={"help": "training data (.jsonl / .jsonl.gz)"})
    format: str = field(default="gsm8k", metadata={"choices": list(FORMATS)})
    template: str = field(
        default="reasoning", metadata={"choices": list(TEMPLATES), "help": "prompt/response template"}
    )
    system: Optional[int] = field(default=None, metadata={"help": "keep only examples of this system (1 or 2)"})
    masks: str = field(default="", metadata={"help": "element masks (safetensors); none = every element trains"})
    stage: Optional[int] = field(default=None, metadata={"help": "which stage's mask in a two-stage mask file"})
    max_examples: int = field(default=0, metadata={"help": "use the first N examples (0 = all)"})
    skip_bad: bool = field(default=False, metadata={"help": "skip malformed data lines (counted) instead of failing"})
    base_dtype: str = field(
        default="auto", metadata={"choices": ["auto", "float32", "bfloat16"], "help": "auto: bf16 on CUDA, fp32 on CPU"}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute each block in backward"})

    def __post_init__(self) -> None:
        check_fields(self, non_negative=("max_examples",))
        if self.system not in (None, 1, 2):
            raise FlagError(f"--system {self.system}: expected 1 or 2")
        if self.stage is not None and self.stage < 1:
            raise FlagError(f"--stage {self.stage}: expected a stage number >= 1")


def require_inputs(parser: argparse.ArgumentParser, args: InputArgs) -> None:
    for name in ("ckpt", "tokenizer", "data"):
        if not getattr(args, name):
            parser.error(f"--{name} is required")


@dataclass
class TrainArgs:
    """Optimisation and bookkeeping flags shared by both training scripts."""

    out: str = field(default="", metadata={"help": "run directory (adapter, checkpoints, metrics.jsonl, config.json)"})
    seed: int = 0
    lr: float = 2e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = field(default="cosine", metadata={"choices": list(SCHEDULES)})
    warmup_ratio: float = field(default=0.03, metadata={"help": "share of the steps spent warming up linearly"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "final lr as a share of --lr (cosine / linear)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global grad norm (0 = off)"})
    epochs: int = 1
    max_steps: int = field(default=0, metadata={"help": "optimizer steps (0 = as many as --epochs give)"})
    batch_size: int = field(default=4, metadata={"help": "micro-batch per rank"})
    grad_accum: int = field(
        default=1, metadata={"help": "micro-batches per optimizer step (ignored with --global-batch)"}
    )
    global_batch: int = field(
        default=0, metadata={"help": "examples per optimizer step over all ranks; sets grad_accum (0 = off)"}
    )
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    keep_checkpoints: int = field(default=1, metadata={"help": "how many recent checkpoints to keep"})
    eval_every: int = field(default=0, metadata={"help": "held-out evaluation every N steps (0 = only at the end)"})
    log_every: int = 1
    halt_at: int = field(
        default=0, metadata={"help": "stop after this step with a checkpoint, as if preempted (0 = run to the end)"}
    )
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its latest checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "replace the run in --out"})
    device: Optional[str] = field(default=None, metadata={"help": "cpu or cuda (default: cuda when available)"})
    fsdp: bool = field(default=False, metadata={"help": "shard the base over the ranks with FSDP2 (lorapar/fsdp.py)"})

    def __post_init__(self) -> None:
        check_fields(
            self,
            positive=("epochs", "batch_size", "grad_accum", "keep_checkpoints", "log_every"),
            positive_float=("lr", "eps"),
            unit_interval=("warmup_ratio", "min_lr_ratio"),
            non_negative=(
                "seed",
                "max_steps",
                "global_batch",
                "save_every",
                "eval_every",
                "halt_at",
                "weight_decay",
                "max_grad_norm",
            ),
        )
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise FlagError(f"--betas {','.join(map(str, betas))}: expected two numbers in [0, 1), e.g. 0.9,0.999")


def resolve_grad_accum(args: TrainArgs, world_size: int) -> int:
    """Micro-batches per optimizer step so that batch_size * grad_accum * world_size == global_batch."""
    if not args.global_batch:
        return args.grad_accum
    per_pass = args.batch_size * world_size
    if args.global_batch % per_pass:
        raise ValueError(
            f"--global-batch {args.global_batch} is not a multiple of --batch-size {args.batch_size} x "
            f"{world_size} rank(s) = {per_pass}"
        )
    return args.global_batch // per_pass


# ----------------------------------------------------------------------------- train_sft.py


@dataclass
class SFTArgs(InputArgs):
    adapter: str = field(
        default="lora", metadata={"choices": ["lora", "dual"], "help": "adapter type (dual: DM-LoRA, flags --dual-*)"}
    )
    init_adapter: str = field(
        default="",
        metadata={
            "help": "start from this LoRA adapter bit for bit (score.py's OUT/adapter_init); "
            "rank, alpha, targets and init come from it"
        },
    )
    max_len: int = 512
    overflow: str = field(default="drop", metadata={"choices": ["drop", "truncate"], "help": "examples over --max-len"})
    eval_data: str = field(default="", metadata={"help": "held-out file for the eval loss (same format)"})
    eval_fraction: float = field(default=0.0, metadata={"help": "or hold out this share of --data (0 = none)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, positive=("max_len",))
        if not 0 <= self.eval_fraction < 1:
            raise FlagError(f"--eval-fraction {self.eval_fraction}: expected a share in [0, 1)")


SFT_PRESETS = {
    # LoRA-PAR's SFT: lr 2e-4, cosine, warm-up 0.03, effective batch 32, max length 512, one epoch;
    # example.py's text format: question + EOS, then the answer as written + EOS.
    "lorapar-sft": {
        "TrainArgs": dict(lr=2e-4, schedule="cosine", warmup_ratio=0.03, global_batch=32, batch_size=4, epochs=1),
        "SFTArgs": dict(max_len=512, template="lorapar"),
    },
    # DM-LoRA's supplement (train.sh, code task): lr 1e-5, cosine, warm-up 0.03, no weight decay, batch 4 x 16 = 64,
    # max length 380 (the tokenizer truncates), one epoch, the Alpaca prompt; r 128 = 32 shared + 96 expert,
    # alpha 128, target rank 80, pruning from step 235 to 1562 - 780 of 1562 (as fractions), delta T 10,
    # lambda 0.1, beta 0.85 / 0.85.
    "dmlora": {
        "TrainArgs": dict(
            lr=1e-5, schedule="cosine", warmup_ratio=0.03, weight_decay=0.0, global_batch=64, batch_size=4, epochs=1
        ),
        "SFTArgs": dict(adapter="dual", max_len=380, overflow="truncate", template="alpaca"),
        "DualArgs": dict(
            dual_rank=128,
            dual_shared_rank=32,
            dual_alpha=128.0,
            dual_dropout=0.0,
            dual_target_rank=80.0,
            dual_t_init=235 / 1562,
            dual_t_final=780 / 1562,
            dual_delta_t=10,
            dual_orth_lambda=0.1,
            dual_beta1=0.85,
            dual_beta2=0.85,
            dual_budget_power=2.0,
            dual_pruning="regrow",
        ),
    },
}


# ----------------------------------------------------------------------------- train_rl.py


@dataclass
class RLArgs(InputArgs):
    adapter: str = field(default="", metadata={"help": "SFT adapter directory to start from (none = a fresh LoRA)"})
    rewards: str = field(
        default=DEFAULT_SPEC,
        metadata={"help": "reward functions and weights: name=w,...; module:function for your own"},
    )


# The TRL release whose GRPOTrainer defaults the paper preset reproduces: v0.19.1 (8 July 2025) was the
# current release when the paper went to arXiv (2507.20999, 28 July 2025); v0.20.0 was tagged the next
# day. docs/trl_grpo_defaults.md has the defaults of v0.14 .. v0.19.1 and the flags for each.
PINNED_TRL = "v0.19.1"

RL_PRESETS = {
    # LoRA-PAR's GRPO (example.py): lr 5e-6, betas (0.9, 0.99), weight decay 0.1, warm-up 0.1, cosine, clip 0.1,
    # G 8, 128 / 256 tokens, example.py's chat prompt and rewards. What example.py leaves at TRL's defaults is
    # TRL v0.19.1's: per_device_train_batch_size 8 completions x 4 accumulation steps = 4 prompts per step on
    # the authors' one GPU, beta 0 (no KL, no reference model), temperature 1.0, top-p 1.0, loss "bnpo" over
    # micro-batches of 8 shuffled completions, one pass per batch of rollouts (num_iterations 1), eps 0.2.
    "lorapar-grpo": {
        "TrainArgs": dict(
            lr=5e-6,
            betas=(0.9, 0.99),
            weight_decay=0.1,
            warmup_ratio=0.1,
            max_grad_norm=0.1,
            schedule="cosine",
            epochs=1,
        ),
        "RLArgs": dict(template="lorapar"),
        "GRPOArgs": dict(
            num_generations=8,
            max_prompt_len=128,
            max_completion_len=256,
            prompts_per_step=4,
            beta=0.0,
            temperature=1.0,
            top_p=1.0,
            loss_type="bnpo",
            micro_batch=8,
            shuffle_micro_batches=True,
            mu=1,
            epsilon=0.2,
            scale_rewards=True,
        ),
    },
}


# ----------------------------------------------------------------------------- score.py and classify.py


@dataclass
class ScoreArgs:
    ckpt: str = field(default="", metadata={"help": "base model (Meta dir, HF dir or llama2.c .bin)"})
    tokenizer: str = field(default="", metadata={"help": "SentencePiece tokenizer.model"})
    data: str = field(default="", metadata={"help": "examples labelled with 'system' 1 or 2 (classify.py output)"})
    format: str = field(default="labelled", metadata={"help": "data format", "choices": FORMATS})
    out: str = field(default="", metadata={"help": "output directory"})
    random_baseline: bool = field(
        default=False, metadata={"help": "also write random_masks.safetensors (the stages' sizes and overlap)"}
    )
    random_scope: str = field(
        default="global",
        metadata={
            "help": "random baseline over the whole adapter (the paper) or with each tensor's count",
            "choices": RANDOM_SCOPES,
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "replace the results already in --out"})
    skip_bad: bool = field(default=False, metadata={"help": "skip malformed data lines (counted) instead of failing"})
    device: Optional[str] = field(default=None, metadata={"help": "cpu or cuda (None: cuda when available)"})
    base_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the frozen base (auto: bf16 on CUDA, fp32 on the CPU); train in the same one, "
            "since a pissa/olora residual base is formed in it",
            "choices": list(BASE_DTYPES),
        },
    )
    fsdp: bool = field(default=False, metadata={"help": "shard the base over the ranks with FSDP2 (lorapar/fsdp.py)"})


@dataclass
class ClassifyArgs:
    data: str = field(default="", metadata={"help": "input jsonl / jsonl.gz (required)"})
    format: str = field(
        default="gsm8k",
        metadata={"help": "input format", "choices": ["gsm8k", "mmlu", "humaneval", "instruction"]},
    )
    out: str = field(default="", metadata={"help": "output jsonl, appended to and resumed (required)"})
    default_system: int = field(
        default=2,
        metadata={
            "help": "label when every teacher abstains or the votes tie (2: when in doubt, assume "
            "the item needs deliberate reasoning)",
            "choices": [1, 2],
        },
    )
    limit: int = field(default=0, metadata={"help": "label only the first N input rows (0: all)"})
    skip_bad: bool = field(default=False, metadata={"help": "skip and count malformed input lines instead of failing"})
    allow_even: bool = field(default=False, metadata={"help": "allow an even number of teachers (ties possible)"})

    def __post_init__(self) -> None:
        if self.limit < 0:
            raise ValueError(f"--limit must be >= 0, got {self.limit}")


def classify_summary_path(out: str) -> str:
    """Where classify.py writes the summary of its --out (labels per system, agreement, per teacher)."""
    return os.path.splitext(out)[0] + ".summary.json"
