"""Dataset readers, prompt templates, label masking and batching for supervised fine-tuning.

Formats (`load_examples(path, format)`), every one a JSON-lines file (`.jsonl` or `.jsonl.gz`):
  gsm8k        `question`, `answer` ending in "#### N"; `final` is N, normalised.
  mmlu         `question` (stem, lettered options, ends with "Answer:"), `answer` a letter; or cais/mmlu's
               `question` + `choices` (list) + `answer` (index or letter), rendered the same way.
  humaneval    `prompt` (code to complete), `canonical_solution`; `task_id`, `test`, `entry_point` stay in `source`.
  instruction  Alpaca (`instruction`, optional `input`, `output`) or Dolly (`instruction`, optional `context`,
               `response`).
  labelled     what classify.py writes: the input row plus `format` (one of the above) and `system` (1 or 2).
Any format may carry an optional `system` field (1 or 2): a known label, e.g. the synthetic task's ground truth.

Templates (`format_prompt` / `format_response`):
  plain        "Question: ...\\nAnswer:" (MMLU and HumanEval prompts are used as they are); the reference verbatim.
  chat         LLaMA-2's "[INST] ... [/INST]"; the reference verbatim.
  reasoning    the chat prompt with REASONING_SYSTEM_PROMPT; the response in LoRA-PAR's GRPO format
               "<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>\\n". For GSM8K the worked steps go in
               the reasoning (calculator annotations <<a*b=c>> removed) and the number in the answer.
  lorapar      the authors' example.py, which formats each stage differently (`phase`):
               sft  prompt = the question followed by the EOS token (the authors write a literal "</s>", which
                    LLaMA-2's HF tokenizer turns into id 2), response = the answer as written. SFT and
                    evaluation add BOS and append EOS to the response; importance scoring adds neither
                    (example.py's collate_fn). `encode_prompt` puts the EOS token in: it is not text.
               rl   the chat prompt with LORAPAR_SYSTEM_PROMPT (example.py's SYSTEM_PROMPT, leading and
                    trailing newlines included); GRPO and evaluation after GRPO.
  alpaca       the DM-LoRA supplement's: ALPACA_PROMPT around the question; response = the answer + "\n"
               (then EOS, as every SFT target), as its train.py builds the target.
How answers are read back (rewards, evaluation): lorapar/answers.py.

Tokenisation: prompt and response are encoded separately (BOS + prompt, response + EOS) and concatenated,
so the boundary is exact and matches generation, which continues from the prompt's tokens. SentencePiece
puts a word-start marker on the response's first piece, which stands for the space after "Answer:".
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import random
import re
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from lorapar.answers import extract_gsm8k_number, final_answer  # noqa: F401 (re-exported)
from lorapar.errors import InputError
from lorapar.io import named_errors
from lorapar.loss import IGNORE_INDEX
from lorapar.tokenizer import chat_prompt

log = logging.getLogger(__name__)

FORMATS = ("gsm8k", "mmlu", "humaneval", "instruction", "labelled")
TEMPLATES = ("plain", "chat", "reasoning", "lorapar", "alpaca")
PHASES = ("sft", "rl")  # which stage a prompt is for; only the lorapar template tells them apart
REASONING_SYSTEM_PROMPT = (
    "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"
)
# example.py's SYSTEM_PROMPT verbatim (a triple-quoted string: it starts and ends with a newline).
LORAPAR_SYSTEM_PROMPT = "\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"
# The DM-LoRA supplement's prompt (PiSSA's train.py, which it was derived from): Alpaca's no-input form.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{question}\n\n### Response:"
)
LETTERS = "ABCDEFGHIJ"


class DataError(InputError):
    """A record that does not have the expected shape; the message names the file and line."""


@dataclass
class Example:
    question: str
    answer: str  # the full reference response
    final: Optional[str]  # the final answer (GSM8K number, MMLU letter), None when there is none
    system: Optional[int]  # 1 or 2 when known (labelled data, synthetic ground truth)
    source: dict  # the original row
    format: str = "gsm8k"
    line: int = 0  # 1-based line number in the file it came from


class Examples(list):
    """A list of Example that also says how many lines were skipped (only ever non-zero with skip_bad)."""

    def __init__(self, items: Sequence[Example] = (), skipped: int = 0, path: str = ""):
        super().__init__(items)
        self.skipped = skipped
        self.path = path


# ----------------------------------------------------------------------------- reading


def _open_bytes(path: str):
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def _numbered_rows(path: str, skip_bad: bool) -> tuple[list[tuple[int, dict]], int]:
    """[(line number, row)] of a JSON-lines file and the count of skipped lines; blank lines are not records."""
    rows, skipped = [], 0
    with named_errors(path, "JSON lines (gzip-compressed for .gz)"), _open_bytes(path) as handle:
        # decoded line by line, so bad UTF-8 is reported with its line
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            except ValueError as err:  # DataError, JSONDecodeError and UnicodeDecodeError all are
                reason = err if isinstance(err, DataError) else (
                    f"{path}:{number}: invalid JSON ({err}); expected one UTF-8 JSON object per line")
                if not skip_bad:
                    raise DataError(f"{reason} (pass skip_bad / --skip-bad to skip such lines)") from None
                log.warning("skipping %s", reason)
                skipped += 1
                continue
            rows.append((number, row))
    return rows, skipped


def read_jsonl(path: str, skip_bad: bool = False) -> tuple[list[dict], int]:
    """All JSON objects of a `.jsonl` / `.jsonl.gz` file and the number of malformed lines skipped."""
    rows, skipped = _numbered_rows(str(path), skip_bad)
    return [row for _, row in rows], skipped


def _field(row: dict, key: str, path: str, line: int, fmt: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        found = "missing" if key not in row else f"a {type(value).__name__}"
        raise DataError(f"{path}:{line}: {fmt} record needs a string field {key!r}, it is {found}; keys: {sorted(row)}")
    return value


def _system(row: dict, path: str, line: int, required: bool) -> Optional[int]:
    value = row.get("system")
    if value is None and not required:
        return None
    if value not in (1, 2) or isinstance(value, bool):
        raise DataError(f"{path}:{line}: field 'system' must be 1 or 2, got {value!r}")
    return value


def _parse_gsm8k(row: dict, path: str, line: int) -> tuple[str, str, Optional[str]]:
    question, answer = _field(row, "question", path, line, "gsm8k"), _field(row, "answer", path, line, "gsm8k")
    final = extract_gsm8k_number(answer) if "####" in answer else None
    if final is None:
        raise DataError(f"{path}:{line}: gsm8k answer must end with '#### <number>', got ...{answer[-40:]!r}")
    return question, answer, final


def _parse_mmlu(row: dict, path: str, line: int) -> tuple[str, str, Optional[str]]:
    question, answer = _field(row, "question", path, line, "mmlu"), row.get("answer")
    choices = row.get("choices")
    if choices is not None:  # cais/mmlu layout: render the options the way the openai/evals sample does
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
            raise DataError(f"{path}:{line}: mmlu 'choices' must be a list of 2-{len(LETTERS)} options")
        options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
        question = f"{question}\n{options}\nAnswer:"
        if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
            answer = LETTERS[answer]
    n_options = len(choices) if choices is not None else len(re.findall(r"(?m)^[A-J]\. ", question)) or 4
    if not (isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip() in LETTERS[:n_options]):
        raise DataError(f"{path}:{line}: mmlu answer must be one of the letters {LETTERS[:n_options]}, got {answer!r}")
    if not question.rstrip().endswith("Answer:"):
        raise DataError(f"{path}:{line}: mmlu question must end with 'Answer:' (stem, options, then 'Answer:')")
    return question.rstrip(), answer.strip(), answer.strip()


def _parse_humaneval(row: dict, path: str, line: int) -> tuple[str, str, Optional[str]]:
    return _field(row, "prompt", path, line, "humaneval"), _field(row, "canonical_solution", path, line, "humaneval"), None


def _parse_instruction(row: dict, path: str, line: int) -> tuple[str, str, Optional[str]]:
    instruction = _field(row, "instruction", path, line, "instruction")
    if "output" in row:  # Alpaca
        extra, answer = row.get("input") or "", _field(row, "output", path, line, "instruction (Alpaca)")
    elif "response" in row:  # Dolly
        extra, answer = row.get("context") or "", _field(row, "response", path, line, "instruction (Dolly)")
    else:
        raise DataError(f"{path}:{line}: instruction record needs 'output' (Alpaca) or 'response' (Dolly); keys: {sorted(row)}")
    if not isinstance(extra, str):
        raise DataError(f"{path}:{line}: instruction 'input'/'context' must be a string, got {type(extra).__name__}")
    question = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return question, answer, None


PARSERS = {"gsm8k": _parse_gsm8k, "mmlu": _parse_mmlu, "humaneval": _parse_humaneval, "instruction": _parse_instruction}


def parse_row(row: dict, format: str, path: str = "<row>", line: int = 0) -> Example:
    """One record -> Example; raises DataError naming `path:line` when a field is missing or malformed."""
    if format == "labelled":
        inner = row.get("format")
        if inner not in PARSERS:
            raise DataError(f"{path}:{line}: labelled record needs 'format' in {sorted(PARSERS)}, got {inner!r}")
        example = parse_row(row, inner, path, line)
        example.system = _system(row, path, line, required=True)
        return example
    if format not in PARSERS:
        raise ValueError(f"unknown data format {format!r}; expected one of {FORMATS}")
    question, answer, final = PARSERS[format](row, path, line)
    return Example(question, answer, final, _system(row, path, line, required=False), row, format, line)


def load_examples(path: str, format: str, skip_bad: bool = False) -> Examples:
    """Every record of `path` as an Example. A malformed line raises DataError naming the file and line;
    with skip_bad it is logged, skipped and counted in the result's `.skipped`."""
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; expected one of {FORMATS}")
    path = str(path)
    rows, skipped = _numbered_rows(path, skip_bad)
    examples = []
    for line, row in rows:
        try:
            examples.append(parse_row(row, format, path, line))
        except DataError as err:
            if not skip_bad:
                raise
            log.warning("skipping %s", err)
            skipped += 1
    return Examples(examples, skipped, path)


# ----------------------------------------------------------------------------- templates


def gsm8k_reasoning(answer: str) -> str:
    """The worked steps of a GSM8K reference: no "#### N" line, no calculator annotations <<...>>."""
    steps = answer.rsplit("####", 1)[0]
    return re.sub(r"<<[^>]*>>", "", steps).strip()


def reasoning_response(reasoning: str, answer: str) -> str:
    return f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>\n"


def format_prompt(example: Example, template: str = "plain", phase: str = "sft", chat: str = "llama2") -> str:
    """The prompt text of `example`; `phase` ("sft" or "rl") matters only to the lorapar template, whose
    SFT prompt also ends with an EOS token that `encode_prompt` adds (it is a token, not text). `chat` is the
    model family's chat format (tokenizer.py: llama2, chatml, llama3; `Tokenizer.template`) that the chat,
    reasoning and lorapar-rl templates wrap the question in."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
    if template == "lorapar":
        if phase == "sft":
            return example.question
        return chat_prompt(chat, example.question, system=LORAPAR_SYSTEM_PROMPT)
    if template == "plain":
        if example.format in ("mmlu", "humaneval"):
            return example.question  # already a prompt that ends where the answer starts
        return f"Question: {example.question}\nAnswer:"
    if template == "chat":
        return chat_prompt(chat, example.question)
    if template == "reasoning":
        return chat_prompt(chat, example.question, system=REASONING_SYSTEM_PROMPT)
    if template == "alpaca":
        return ALPACA_PROMPT.format(question=example.question)
    raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")


def format_response(example: Example, template: str = "plain") -> str:
    if template in ("plain", "chat", "lorapar"):
        return example.answer
    if template == "alpaca":
        return example.answer + "\n"
    if template == "reasoning":
        if example.format == "gsm8k":
            return reasoning_response(gsm8k_reasoning(example.answer), example.final)
        if example.final is not None:  # MMLU: nothing to reason with in the reference, only the letter
            return reasoning_response("", example.final)
        return reasoning_response("", example.answer)
    raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")


# ----------------------------------------------------------------------------- tokenisation and batching


def prompt_ends_with_eos(template: str, phase: str = "sft") -> bool:
    """Whether the template's prompt ends with the EOS token (example.py's "{question}</s>")."""
    return template == "lorapar" and phase == "sft"


def chat_format(tokenizer) -> str:
    """The chat format of the tokenizer's model family (LLaMA-2's for SentencePiece and for stand-ins)."""
    return getattr(tokenizer, "template", "llama2")


def encode_prompt(tokenizer, example: Example, template: str, phase: str = "sft", bos: bool = True) -> list[int]:
    """Token ids of the prompt of `example`: [BOS] + format_prompt(...) [+ EOS for lorapar's SFT prompt]."""
    ids = tokenizer.encode(format_prompt(example, template, phase, chat_format(tokenizer)), bos=bos)
    return ids + [tokenizer.eos_id] if prompt_ends_with_eos(template, phase) else ids


def encode_example(tokenizer, prompt: str, response: str, max_len: int, *, bos: bool = True,
                   prompt_eos: bool = False, response_eos: bool = True) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) for [BOS] + prompt [+ EOS] + response [+ EOS], loss on the response
    (and its EOS) only. SFT: BOS and a final EOS; lorapar's prompt also ends with EOS (prompt_eos);
    importance scoring under lorapar has neither BOS nor a final EOS, as example.py's collate_fn.

    Longer than max_len: cut from the right (the prompt stays whole, the response loses its tail and EOS)
    and report truncated=True; SFTDataset decides whether to keep or drop such an example.
    """
    prompt_ids = tokenizer.encode(prompt, bos=bos) + ([tokenizer.eos_id] if prompt_eos else [])
    response_ids = tokenizer.encode(response, eos=response_eos)
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    truncated = len(input_ids) > max_len
    return input_ids[:max_len], labels[:max_len], truncated


class SFTDataset(Dataset):
    """Examples encoded once up front; items are {"input_ids": list, "labels": list}.

    overflow="drop" (default) leaves out examples longer than max_len: a cut response teaches an answer
    that stops mid-way and never ends. overflow="truncate" keeps them cut from the right, as long as at
    least one response token survives (a prompt that fills max_len has nothing to learn and is dropped).
    Both are counted in `.dropped` / `.truncated` and logged.
    """

    def __init__(self, examples: Sequence[Example], tokenizer, template: str = "plain", max_len: int = 512,
                 overflow: str = "drop"):
        if overflow not in ("drop", "truncate"):
            raise ValueError(f"overflow must be 'drop' or 'truncate', got {overflow!r}")
        self.items: list[dict[str, list[int]]] = []
        self.examples: list[Example] = []
        self.dropped = self.truncated = 0
        for example in examples:
            ids, labels, cut = encode_example(
                tokenizer, format_prompt(example, template, chat=chat_format(tokenizer)), format_response(example, template),
                max_len,
                prompt_eos=prompt_ends_with_eos(template),
            )
            if cut and (overflow == "drop" or all(y == IGNORE_INDEX for y in labels[1:])):
                self.dropped += 1
                continue
            self.truncated += cut
            self.items.append({"input_ids": ids, "labels": labels})
            self.examples.append(example)
        if self.dropped or self.truncated:
            log.warning("SFTDataset: %d of %d examples longer than max_len=%d: %d dropped, %d truncated",
                        self.dropped + self.truncated, len(examples), max_len, self.dropped, self.truncated)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.items[index]

    @property
    def lengths(self) -> list[int]:
        return [len(item["input_ids"]) for item in self.items]


def collate(batch: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: input_ids with pad_id, labels with -100 (B, T) int64."""
    width = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.as_tensor(item["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(item["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels}


class LengthGroupedSampler(Sampler[int]):
    """Distributed, length-grouped sampling: batches of similar lengths waste less padding.

    Each epoch (seeded by seed + epoch, so every rank draws the same order) shuffles all indices, cuts
    them into mega-batches of `mega_batches` global batches, sorts each mega-batch by length (longest
    first) and deals every global batch of batch_size * num_replicas indices round-robin to the ranks.
    Each rank yields batch_size indices per step: use it with DataLoader(batch_size=batch_size) in place
    of DistributedSampler. Like DistributedSampler, the index list is padded by repeating indices to a
    multiple of num_replicas (or cut with drop_last) so every rank takes the same number of steps.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False, mega_batches: int = 50):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        if len(lengths) < num_replicas:
            raise ValueError(f"{len(lengths)} examples cannot feed {num_replicas} replicas")
        self.lengths, self.batch_size = list(lengths), batch_size
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.shuffle, self.drop_last, self.mega_batches = shuffle, drop_last, mega_batches
        self.epoch = 0
        n = len(self.lengths)
        self.total = (n // num_replicas if drop_last else math.ceil(n / num_replicas)) * num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.total // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        order = list(range(len(self.lengths)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        order = (order * math.ceil(self.total / len(order)))[: self.total]
        step = self.batch_size * self.num_replicas
        mega = step * self.mega_batches
        mine: list[int] = []
        for start in range(0, self.total, mega):
            group = sorted(order[start : start + mega], key=lambda i: -self.lengths[i])
            for batch_start in range(0, len(group), step):
                mine.extend(group[batch_start : batch_start + step][self.rank :: self.num_replicas])
        return iter(mine)
