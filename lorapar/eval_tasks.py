"""The task scorers lorapar/evaluate.py runs: generation, GSM8K answer rules, MMLU option letters, HumanEval.

Each evaluate_<task> takes a model, a tokenizer and examples and returns {"metrics": ..., "records": [one per
item]}; the rules themselves are documented in lorapar/evaluate.py's docstring.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from lorapar.answers import final_answer, hash_answer, last_answer_integer, last_hash_integer
from lorapar.data import LETTERS, Example
from lorapar.generate import generate
from lorapar.humaneval_exec import mean_pass_at_k, pass_at_k, program_text, run_many, truncate_completion
from lorapar.model import eval_mode
from lorapar.templates import chat_format, encode_prompt, format_prompt

# --extraction's choices: the answer rules read_answer applies (auto: resolve_extraction picks one).
EXTRACTIONS = ("auto", "last_hash", "last_answer", "lenient")

# ----------------------------------------------------------------------------- generation


def decode_continuation(tokenizer, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """Text of the new tokens as they read after the prompt (decoding them alone would drop the space
    SentencePiece folds into a leading word-start piece, and with it HumanEval's indentation)."""
    eos = tokenizer.eos_id
    new_ids = [t for t in new_ids if t != eos]
    prompt_text = tokenizer.decode(list(prompt_ids))
    full = tokenizer.decode(list(prompt_ids) + new_ids)
    return full[len(prompt_text) :] if full.startswith(prompt_text) else tokenizer.decode(new_ids)


def complete(
    model,
    tokenizer,
    prompts: Sequence,
    max_new_tokens: int,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    progress: bool = True,
    desc: str = "generate",
) -> list[tuple[str, bool]]:
    """(continuation text, finished) per prompt (a text, encoded with BOS, or token ids); batches are built
    from similar lengths, order is kept."""
    encoded = [list(p) if not isinstance(p, str) else tokenizer.encode(p, bos=True) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[tuple[str, bool]] = [("", False)] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for number, batch in enumerate(tqdm(batches, desc=desc, disable=not progress)):
        out = generate(
            model,
            [encoded[i] for i in batch],
            max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=None if seed is None else seed + number,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            stop_ids=getattr(tokenizer, "stop_ids", None),  # e.g. <|im_end|> and <|endoftext|> both end a turn
        )
        for i, tokens, done in zip(batch, out.tokens, out.finished):
            results[i] = (decode_continuation(tokenizer, encoded[i], tokens), done)
    return results


# ----------------------------------------------------------------------------- GSM8K


def resolve_extraction(extraction: str, template: str, phase: str) -> str:
    """--extraction auto: the authors' rule of the stage for the lorapar template, lenient otherwise."""
    if extraction != "auto":
        return extraction
    if template == "lorapar":
        return "last_answer" if phase == "rl" else "last_hash"
    return "lenient"


def read_answer(text: str, example: Example, extraction: str) -> tuple[Optional[str], Optional[str]]:
    """(prediction, reference) under one answer rule, both as strings; the prediction is None when
    the rule cannot read one. Correct means both are set and equal."""
    if extraction == "last_hash":
        predicted, reference = last_hash_integer(text), last_hash_integer(example.answer)
        return (None if predicted is None else str(predicted)), (None if reference is None else str(reference))
    if extraction == "last_answer":
        predicted, reference = last_answer_integer(text), hash_answer(example.answer)
        return (None if predicted is None else str(predicted)), (example.final if reference is None else reference)
    if extraction == "lenient":
        return final_answer(text), example.final
    raise ValueError(f"unknown extraction {extraction!r}; expected one of {EXTRACTIONS[1:]}")


def score_gsm8k(examples: Sequence[Example], completions: Sequence[str], extraction: str = "lenient") -> dict:
    """Accuracy over examples given the model's completions; also split by `system` when present."""
    records = []
    for index, (example, text) in enumerate(zip(examples, completions)):
        predicted, reference = read_answer(text, example, extraction)
        records.append(
            dict(
                index=index,
                question=example.question,
                reference=reference,
                prediction=predicted,
                correct=predicted is not None and predicted == reference,
                malformed=predicted is None,
                system=example.system,
                completion=text,
            )
        )
    metrics = _accuracy(records)
    metrics["malformed"] = sum(r["malformed"] for r in records)
    metrics["extraction"] = extraction
    systems = sorted({r["system"] for r in records if r["system"] is not None})
    if systems:
        metrics["by_system"] = {str(s): _accuracy([r for r in records if r["system"] == s]) for s in systems}
    return {"metrics": metrics, "records": records}


def _accuracy(records: list[dict]) -> dict:
    correct = sum(r["correct"] for r in records)
    return {"accuracy": correct / len(records) if records else 0.0, "correct": correct, "n": len(records)}


def evaluate_gsm8k(
    model,
    tokenizer,
    examples: Sequence[Example],
    template: str = "plain",
    batch_size: int = 16,
    max_new_tokens: int = 256,
    progress: bool = True,
    phase: str = "sft",
    extraction: str = "auto",
) -> dict:
    """Greedy answers to GSM8K-style examples -> {"metrics": {accuracy, ..., by_system}, "records": [...]}."""
    prompts = [encode_prompt(tokenizer, e, template, phase) for e in examples]
    outputs = complete(model, tokenizer, prompts, max_new_tokens, batch_size, progress=progress, desc="gsm8k")
    result = score_gsm8k(examples, [text for text, _ in outputs], resolve_extraction(extraction, template, phase))
    for record, example, ids, (_, finished) in zip(result["records"], examples, prompts, outputs):
        # For audits: the prompt's text and the exact token ids given to the model (lorapar's SFT prompt ends
        # with an EOS token, which is no text).
        record["prompt"] = format_prompt(example, template, phase, chat_format(tokenizer))
        record["prompt_ids"], record["finished"] = ids, finished
    return result


# ----------------------------------------------------------------------------- MMLU


def option_letters(example: Example) -> str:
    """The letters offered by an MMLU question: its lines "A. ...", "B. ..." (four when none are found)."""
    found = re.findall(r"(?m)^([A-J])\. ", example.question)
    return "".join(found) if found else LETTERS[:4]


@torch.inference_mode()
def evaluate_mmlu(
    model, tokenizer, examples: Sequence[Example], template: str = "plain", batch_size: int = 16, progress: bool = True
) -> dict:
    """Pick the letter whose token has the highest log-probability right after the prompt.

    Letters are encoded on their own, the way batching.encode_example encodes a response, and each must be a
    single token; then one forward pass per question scores every option at once.
    """
    options = [option_letters(e) for e in examples]
    letter_ids = {}
    for letter in sorted(set("".join(options))):
        ids = tokenizer.encode(letter)
        if len(ids) != 1:
            raise ValueError(f"MMLU scoring needs each letter to be one token; {letter!r} encodes to {ids}")
        letter_ids[letter] = ids[0]
    prompts = [encode_prompt(tokenizer, e, template) for e in examples]
    records = []
    with eval_mode(model):
        for start in tqdm(range(0, len(examples), batch_size), desc="mmlu", disable=not progress):
            batch = prompts[start : start + batch_size]
            lengths = torch.tensor([len(p) for p in batch])
            tokens = torch.full((len(batch), int(lengths.max())), tokenizer.pad_id, dtype=torch.long)
            for row, ids in enumerate(batch):
                tokens[row, : len(ids)] = torch.tensor(ids)  # right padding: causal attention never sees it
            device = next(model.parameters()).device
            hidden = model(tokens.to(device), return_hidden=True)
            last = hidden[torch.arange(len(batch), device=device), (lengths - 1).to(device)]
            logprobs = torch.log_softmax(model.output(last).float(), dim=-1).cpu()
            for row, example in enumerate(examples[start : start + batch_size]):
                scores = {letter: logprobs[row, letter_ids[letter]].item() for letter in options[start + row]}
                predicted = max(scores, key=scores.get)
                records.append(
                    dict(
                        index=start + row,
                        reference=example.final,
                        prediction=predicted,
                        correct=predicted == example.final,
                        scores=scores,
                        system=example.system,
                    )
                )
    return {"metrics": _accuracy(records), "records": records}


# ----------------------------------------------------------------------------- HumanEval


def evaluate_humaneval(
    model,
    tokenizer,
    examples: Sequence[Example],
    template: str = "plain",
    n_samples: int = 1,
    ks: Sequence[int] = (1,),
    temperature: float = 0.0,
    top_p: float = 0.95,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    timeout: float = 5.0,
    memory_mb: int = 1024,
    workers: int = 2,
    seed: int = 0,
    progress: bool = True,
    results_path: Optional[str] = None,
    sandbox: str = "auto",
) -> dict:
    """pass@k over problems from n_samples completions each, every completion run against its tests."""
    if n_samples > 1 and temperature <= 0.0:
        raise ValueError(f"n_samples={n_samples} greedy samples would all be identical; set temperature > 0")
    bad_k = [k for k in ks if not 1 <= k <= n_samples]
    if bad_k:
        raise ValueError(f"pass@k needs 1 <= k <= n_samples={n_samples}; got k={bad_k}")
    prompts = [encode_prompt(tokenizer, e, template) for e in examples for _ in range(n_samples)]
    outputs = complete(
        model,
        tokenizer,
        prompts,
        max_new_tokens,
        batch_size,
        temperature,
        top_p,
        seed,
        progress=progress,
        desc="humaneval",
    )
    completions = [truncate_completion(text) for text, _ in outputs]
    programs = []
    for i, example in enumerate(examples):
        src = example.source
        for j in range(n_samples):
            programs.append(
                program_text(src["prompt"], completions[i * n_samples + j], src["test"], src["entry_point"])
            )
    results = run_many(
        programs,
        workers=workers,
        timeout=timeout,
        memory_mb=memory_mb,
        progress=progress,
        results_path=results_path,
        sandbox=sandbox,
    )
    records = []
    for i, example in enumerate(examples):
        mine = results[i * n_samples : (i + 1) * n_samples]
        passed = sum(r.passed for r in mine)
        records.append(
            dict(
                index=i,
                task_id=example.source.get("task_id"),
                n=n_samples,
                passed=passed,
                pass_at_k={str(k): pass_at_k(n_samples, passed, k) for k in ks},
                samples=[
                    dict(completion=c, status=r.status, stderr=r.stderr[-500:])
                    for c, r in zip(completions[i * n_samples : (i + 1) * n_samples], mine)
                ],
            )
        )
    counts = [r["passed"] for r in records]
    metrics = {f"pass@{k}": mean_pass_at_k(counts, n_samples, k) for k in ks}
    metrics.update(n=len(records), n_samples=n_samples)
    return {"metrics": metrics, "records": records}
