r"""GRPO reward functions: plain callables `fn(completion: str, example: Example) -> float`.

The built-in set is LoRA-PAR's (example.py), adapted by the authors from the widely used GRPO GSM8K
recipe, whose completions follow the format

    <reasoning>
    ...
    </reasoning>
    <answer>
    ...
    </answer>

Each built-in returns a score in [0, 1] (xml_count may go slightly negative) and the default weights
carry the recipe's magnitudes, so weight x score reproduces example.py exactly: correct 2.0, integer
0.5, strict_format 0.5, soft_format 0.5, xml_count up to 0.5 (0.125 per tag line, 0.001 per trailing
character). Like example.py, every pattern is matched with re.DOTALL, so the reasoning may span lines:

    correct        the stripped text of the last <answer> block == the gold string (answers.hash_answer:
                   the text after "####" without "," and "$"), compared as strings
    integer        that text isdigit()
    strict_format  re.match  ^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$   (a final newline
                   is required; Python's $ also accepts one more newline after it)
    soft_format    re.match  <reasoning>.*?</reasoning>\s*<answer>.*?</answer>  on the stripped completion

lorapar's earlier, lenient variants stay available under their own names: correct_lenient (the
normalised number after the first "####" or in the first <answer> tag, the rule of --extraction
lenient, so "1,000" == "1000.0"), strict_format_lenient (the final newline optional) and
soft_format_lenient (the pair of blocks anywhere in the text).

A spec string picks functions and weights: "correct=2,integer=0.5,mypkg.rewards:brevity=0.1", where a
name with a colon is `module:function` imported from the Python path.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable, Optional

from lorapar.answers import extract_gsm8k_number, final_answer, hash_answer, xml_answer
from lorapar.data import Example

RewardFn = Callable[[str, Example], float]

STRICT_FORMAT = re.compile(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$", re.DOTALL)
SOFT_FORMAT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)
STRICT_FORMAT_LENIENT = re.compile(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n?$", re.DOTALL)


def gold_string(example: Example) -> Optional[str]:
    """The reference the correctness reward compares with: example.py's hash_answer of the reference
    answer; for a record without "####" (MMLU: a letter) its final answer as it stands."""
    gold = hash_answer(example.answer) if example.answer else None
    return gold if gold is not None else example.final


def correct(completion: str, example: Example) -> float:
    """1 when the last <answer> block, stripped, is exactly the gold string (example.py)."""
    gold = gold_string(example)
    return float(gold is not None and xml_answer(completion) == gold)


def correct_lenient(completion: str, example: Example) -> float:
    """1 when the completion's lenient final answer (answers.final_answer) equals the reference's number."""
    if example.final is None:
        return 0.0
    return float(final_answer(completion) == extract_gsm8k_number(example.final))


def integer(completion: str, example: Example) -> float:
    """1 when the last <answer> block is a bare non-negative integer (str.isdigit, as example.py)."""
    return float(xml_answer(completion).isdigit())


def strict_format(completion: str, example: Example) -> float:
    return float(STRICT_FORMAT.match(completion) is not None)


def strict_format_lenient(completion: str, example: Example) -> float:
    return float(STRICT_FORMAT_LENIENT.match(completion) is not None)


def soft_format(completion: str, example: Example) -> float:
    return float(SOFT_FORMAT.match(completion.strip()) is not None)


def soft_format_lenient(completion: str, example: Example) -> float:
    return float(SOFT_FORMAT.search(completion) is not None)


def xml_count(completion: str, example: Example) -> float:
    """A quarter per well-placed tag line, minus a little (0.002 per character) for text after </answer>;
    weighted 0.5 this is example.py's count_xml (0.125 per tag, 0.001 per character)."""
    score = 0.0
    if completion.count("<reasoning>\n") == 1:
        score += 0.25
    if completion.count("\n</reasoning>\n") == 1:
        score += 0.25
    if completion.count("\n<answer>\n") == 1:
        score += 0.25 - len(completion.split("\n</answer>\n")[-1]) * 0.002
    if completion.count("\n</answer>") == 1:
        score += 0.25 - (len(completion.split("\n</answer>")[-1]) - 1) * 0.002
    return score


BUILTIN: dict[str, RewardFn] = {
    "correct": correct,
    "integer": integer,
    "strict_format": strict_format,
    "soft_format": soft_format,
    "xml_count": xml_count,
    "correct_lenient": correct_lenient,
    "strict_format_lenient": strict_format_lenient,
    "soft_format_lenient": soft_format_lenient,
}
DEFAULT_SPEC = "correct=2.0,integer=0.5,strict_format=0.5,soft_format=0.5,xml_count=0.5"


def resolve(name: str) -> RewardFn:
    """A built-in by name, or `module:function` imported from the Python path."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ValueError(f"unknown reward {name!r}: expected one of {sorted(BUILTIN)} or module:function")
    module_name, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"reward {name!r}: cannot import {attr!r} from module {module_name!r} ({error})") from None
    if not callable(fn):
        raise ValueError(f"reward {name!r} is not callable")
    return fn


def parse_spec(spec: str) -> list[tuple[str, RewardFn, float]]:
    """ "name=weight,..." -> [(name, function, weight)]; a name without "=weight" weighs 1."""
    out = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, weight = item.rpartition("=") if "=" in item else (item, "", "1")
        try:
            value = float(weight)
        except ValueError:
            raise ValueError(f"reward spec {item!r}: weight {weight!r} is not a number") from None
        out.append((name, resolve(name), value))
    if not out:
        raise ValueError(f"reward spec {spec!r} names no reward function")
    names = [name for name, _, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"reward spec {spec!r} names a function twice")
    return out
