"""GRPO reward functions: plain callables `fn(completion: str, example: Example) -> float`.

The built-in set is LoRA-PAR's, adapted (as the authors did) from the widely used GRPO GSM8K recipe
whose completions follow the format

    <reasoning>
    ...
    </reasoning>
    <answer>
    ...
    </answer>

Each built-in returns a score in [0, 1] (xml_count may go slightly negative) and the default weights
carry the recipe's magnitudes, so weight x score reproduces it: correct 2.0, integer 0.5,
strict_format 0.5, soft_format 0.5, xml_count up to 0.5. Two deliberate differences: `correct`
compares normalised numbers ("1,000" == "1000.0") rather than raw strings, read by the same rule as
evaluation (lorapar.data.final_answer), and the format patterns
match across lines (re.DOTALL); the recipe's patterns without DOTALL never match a multi-line
reasoning, so those rewards were constantly zero.

A spec string picks functions and weights: "correct=2,integer=0.5,mypkg.rewards:brevity=0.1", where a
name with a colon is `module:function` imported from the Python path.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable

from lorapar.data import Example, extract_gsm8k_number, final_answer

RewardFn = Callable[[str, Example], float]

STRICT_FORMAT = re.compile(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n?$", re.DOTALL)
SOFT_FORMAT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)


def xml_answer(text: str) -> str:
    """The text between the last <answer> and the following </answer> (the whole text without tags)."""
    return text.split("<answer>")[-1].split("</answer>")[0].strip()


def correct(completion: str, example: Example) -> float:
    """1 when the completion's final answer (data.final_answer: the rule evaluation uses) equals the reference's."""
    if example.final is None:
        return 0.0
    return float(final_answer(completion) == extract_gsm8k_number(example.final))


def integer(completion: str, example: Example) -> float:
    """1 when the <answer> block is a bare non-negative integer."""
    return float(xml_answer(completion).isdigit())


def strict_format(completion: str, example: Example) -> float:
    return float(STRICT_FORMAT.match(completion) is not None)


def soft_format(completion: str, example: Example) -> float:
    return float(SOFT_FORMAT.search(completion) is not None)


def xml_count(completion: str, example: Example) -> float:
    """A quarter per well-placed tag line, minus a little (0.002 per character) for text after </answer>."""
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
    """"name=weight,..." -> [(name, function, weight)]; a name without "=weight" weighs 1."""
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
