r"""Evaluate a checkpoint (optionally with a LoRA adapter) on GSM8K, MMLU or HumanEval.

    python -m lorapar.evaluate --ckpt BASE --tokenizer TOK.model [--adapter DIR] \\
        --task gsm8k|mmlu|humaneval --data FILE --out results.json

The prompt template and the stage it is for come from the adapter's run config (the config.json that
train_sft.py / train_rl.py write beside it) unless --template / --phase say otherwise: an adapter is
evaluated with the prompts it was trained on (no adapter, or no run config: plain, sft).

GSM8K (and the synthetic task, which uses the same rows): greedy decoding, then one answer rule
(--extraction; lorapar/answers.py), an output it cannot read being "malformed" and wrong:
  last_hash    example.py after SFT: the integer of the last "####\s*(-?\d+)", compared with the same
               integer of the reference
  last_answer  example.py after RL: int() of the last <answer>...</answer>, compared as a string with
               the reference's text after "####" (no "," or "$")
  lenient      the normalised number after the first `####` or inside the first `<answer>` tag (no
               fallback to the last number, which would credit rambling); "1,000.0" == "1000"
  auto         (default) the authors' rule of the stage for the lorapar template, lenient for the others.
With a `system` field the accuracy is also split by system.
MMLU: the option letter with the highest log-probability right after the prompt; no generation.
HumanEval: n samples per problem (greedy when n = 1), cut at a new top-level statement, each run
against the problem's tests in a limited subprocess (see humaneval_exec.py); pass@k by the unbiased
estimator.

The output JSON holds the metrics, the resolved config and one record per item; it is written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional

from lorapar.config import add_dataclass_args, dataclass_from_args, field
from lorapar.data import DataError, load_examples
from lorapar.errors import FlagError, check_fields, check_output_file, run_main
from lorapar.eval_tasks import EXTRACTIONS, evaluate_gsm8k, evaluate_humaneval, evaluate_mmlu, resolve_extraction
from lorapar.io import atomic_write_json
from lorapar.sandbox import MODES as SANDBOX_MODES
from lorapar.templates import PHASES, TEMPLATES

TASKS = ("gsm8k", "mmlu", "humaneval")


@dataclass
class EvalArgs:
    ckpt: str = field(default="", metadata={"help": "base checkpoint: Meta dir, HF dir or llama2.c .bin"})
    tokenizer: str = field(default="", metadata={"help": "SentencePiece .model file"})
    adapter: str = field(default="", metadata={"help": "LoRA adapter directory (save_adapter / peft); empty: none"})
    task: str = field(default="gsm8k", metadata={"choices": TASKS, "help": "benchmark"})
    data: str = field(default="", metadata={"help": "jsonl(.gz) file in the task's format"})
    out: str = field(default="", metadata={"help": "results JSON to write"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out"})
    skip_bad: bool = field(default=False, metadata={"help": "skip malformed data lines (counted) instead of failing"})
    limit: int = field(default=0, metadata={"help": "evaluate the first N items only; 0 = all"})
    batch_size: int = field(default=16, metadata={"help": "prompts per generation or scoring batch"})
    max_new_tokens: int = field(default=256, metadata={"help": "generated tokens per answer (GSM8K, HumanEval)"})
    template: str = field(
        default="",
        metadata={
            "choices": ("",) + TEMPLATES,
            "help": "prompt template (templates.py); empty: the adapter's run config, else plain",
        },
    )
    phase: str = field(
        default="",
        metadata={
            "choices": ("",) + PHASES,
            "help": "stage of the lorapar prompt; empty: rl for a train_rl.py adapter, else sft",
        },
    )
    extraction: str = field(
        default="auto",
        metadata={
            "choices": EXTRACTIONS,
            "help": "GSM8K answer rule; auto: the authors' for lorapar (last_hash / last_answer)",
        },
    )
    n_samples: int = field(default=1, metadata={"help": "HumanEval samples per problem"})
    k: tuple[int, ...] = field(default=(1,), metadata={"help": "HumanEval pass@k values"})
    temperature: float = field(default=0.0, metadata={"help": "HumanEval sampling temperature; 0 = greedy"})
    top_p: float = field(default=0.95, metadata={"help": "HumanEval nucleus sampling when temperature > 0"})
    timeout: float = field(default=5.0, metadata={"help": "seconds per HumanEval program"})
    memory_mb: int = field(default=1024, metadata={"help": "address-space limit per HumanEval program"})
    workers: int = field(default=2, metadata={"help": "HumanEval programs run at once"})
    seed: int = field(default=0, metadata={"help": "HumanEval sampling seed"})
    sandbox: str = field(
        default="auto",
        metadata={
            "choices": SANDBOX_MODES,
            "help": "HumanEval containment: namespaces (required), process (rlimits only), "
            "auto (namespaces where the kernel allows, else process with a warning); see sandbox.py",
        },
    )

    def __post_init__(self) -> None:
        check_fields(
            self,
            positive=("batch_size", "max_new_tokens", "n_samples", "workers", "memory_mb"),
            non_negative=("limit", "temperature", "seed"),
            positive_float=("timeout",),
            open_unit_interval=(),
        )
        if not 0 < self.top_p <= 1:
            raise FlagError(f"--top-p {self.top_p}: expected a value in (0, 1]")
        bad_k = [k for k in self.k if k < 1]
        if bad_k or not self.k:
            raise FlagError(f"--k {','.join(map(str, self.k))}: expected integers >= 1")


# ----------------------------------------------------------------------------- command line


def run_config(adapter: str) -> dict:
    """The training run's resolved config (config.json beside the adapter), {} when there is none."""
    path = os.path.join(adapter, "config.json") if adapter else ""
    if not path or not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable run config ({err}); pass --template and --phase instead") from None
    return config if isinstance(config, dict) else {}


def resolve_text_format(args: EvalArgs) -> EvalArgs:
    """args with template, phase and extraction filled in from the adapter's run config (module docstring)."""
    config = run_config(args.adapter)
    section = config.get("RLArgs") or config.get("SFTArgs") or {}
    template = args.template or section.get("template") or "plain"
    if template not in TEMPLATES:
        raise ValueError(f"{args.adapter}/config.json: template {template!r} is not one of {TEMPLATES}")
    phase = args.phase or ("rl" if "RLArgs" in config else "sft")
    extraction = resolve_extraction(args.extraction, template, phase)
    return dataclasses.replace(args, template=template, phase=phase, extraction=extraction)


def run(args: EvalArgs, progress: bool = True) -> dict:
    from lorapar.adapter import load_merged
    from lorapar.tokenizer import Tokenizer

    for name in ("ckpt", "tokenizer", "data", "out"):
        if not getattr(args, name):
            raise FlagError(f"--{name} is required")
    check_output_file(args.out, "--out", overwrite=args.overwrite)  # before any work: not after generating
    args = resolve_text_format(args)
    examples = load_examples(args.data, args.task, skip_bad=args.skip_bad)
    skipped = examples.skipped
    if args.limit > 0:
        examples = examples[: args.limit]
    if not examples:
        raise DataError(f"{args.data}: no examples to evaluate (--limit {args.limit}); expected at least one")
    if args.task == "humaneval":  # checked before generating: a KeyError after it would name neither file nor line
        for e in examples:
            missing = [k for k in ("test", "entry_point") if not isinstance(e.source.get(k), str)]
            if missing:
                raise DataError(
                    f"{args.data}:{e.line}: humaneval evaluation needs string field(s) {missing}; keys: "
                    f"{sorted(e.source)}"
                )
    model, tokenizer = load_merged(args.ckpt, args.adapter), Tokenizer(args.tokenizer)
    common = dict(template=args.template, batch_size=args.batch_size, progress=progress)
    if args.task == "gsm8k":
        result = evaluate_gsm8k(
            model,
            tokenizer,
            examples,
            max_new_tokens=args.max_new_tokens,
            phase=args.phase,
            extraction=args.extraction,
            **common,
        )
    elif args.task == "mmlu":
        result = evaluate_mmlu(model, tokenizer, examples, **common)
    else:
        result = evaluate_humaneval(
            model,
            tokenizer,
            examples,
            n_samples=args.n_samples,
            ks=args.k,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            timeout=args.timeout,
            memory_mb=args.memory_mb,
            workers=args.workers,
            seed=args.seed,
            results_path=args.out + ".exec.jsonl",
            sandbox=args.sandbox,
            **common,
        )
    output = {
        "task": args.task,
        "metrics": result["metrics"],
        "skipped_input_lines": skipped,
        "config": dataclasses.asdict(args),
        "records": result["records"],
    }
    atomic_write_json(args.out, output)
    if os.path.exists(args.out + ".exec.jsonl"):  # the per-program results now live in the output
        os.unlink(args.out + ".exec.jsonl")
    return output


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate a lorapar checkpoint on GSM8K, MMLU or HumanEval.")
    add_dataclass_args(parser, EvalArgs)
    args = dataclass_from_args(EvalArgs, parser.parse_args(argv))
    output = run(args)
    print({"task": output["task"], **output["metrics"]})


if __name__ == "__main__":
    run_main(main)
