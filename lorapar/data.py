"""Dataset readers: JSON-lines files of the supported formats -> Example records.

Formats (`load_examples(path, format)`), every one a JSON-lines file (`.jsonl` or `.jsonl.gz`):
  gsm8k        `question`, `answer` ending in "#### N"; `final` is N, normalised.
  mmlu         `question` (stem, lettered options, ends with "Answer:"), `answer` a letter; or cais/mmlu's
               `question` + `choices` (list) + `answer` (index or letter), rendered the same way.
  humaneval    `prompt` (code to complete), `canonical_solution`; `task_id`, `test`, `entry_point` stay in `source`.
  instruction  Alpaca (`instruction`, optional `input`, `output`) or Dolly (`instruction`, optional `context`,
               `response`).
  labelled     what classify.py writes: the input row plus `format` (one of the above) and `system` (1 or 2).
Any format may carry an optional `system` field (1 or 2): a known label, e.g. the synthetic task's ground truth.
How the records become prompts and responses: lorapar/templates.py; token batches for training:
lorapar/batching.py; how answers are read back (rewards, evaluation): lorapar/answers.py.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from dataclasses import dataclass
from typing import Optional, Sequence

from lorapar.answers import extract_gsm8k_number
from lorapar.errors import InputError
from lorapar.io import named_errors

log = logging.getLogger(__name__)

FORMATS = ("gsm8k", "mmlu", "humaneval", "instruction", "labelled")
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
                reason = (
                    err
                    if isinstance(err, DataError)
                    else (f"{path}:{number}: invalid JSON ({err}); expected one UTF-8 JSON object per line")
                )
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
    return (
        _field(row, "prompt", path, line, "humaneval"),
        _field(row, "canonical_solution", path, line, "humaneval"),
        None,
    )


def _parse_instruction(row: dict, path: str, line: int) -> tuple[str, str, Optional[str]]:
    instruction = _field(row, "instruction", path, line, "instruction")
    if "output" in row:  # Alpaca
        extra, answer = row.get("input") or "", _field(row, "output", path, line, "instruction (Alpaca)")
    elif "response" in row:  # Dolly
        extra, answer = row.get("context") or "", _field(row, "response", path, line, "instruction (Dolly)")
    else:
        raise DataError(
            f"{path}:{line}: instruction record needs 'output' (Alpaca) or 'response' (Dolly); keys: {sorted(row)}"
        )
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
