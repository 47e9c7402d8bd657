r"""How an answer is read from a text: the rules GRPO rewards and evaluation apply, each defined once.

extract_gsm8k_number   a GSM8K reference's normalised number (Example.final)
final_answer           lenient: the normalised number after the first "####" or in the first <answer>
last_hash_integer      example.py after SFT: int of the last "####\s*(-?\d+)" match
last_answer_integer    example.py after RL: int() of the last <answer>...</answer> (DOTALL), None if int() fails
hash_answer            example.py's gold string: text after "####", stripped, "," and "$" removed
xml_answer             example.py's GRPO rewards: the stripped text between the last <answer> and the next
                       </answer> (the whole text, stripped, when there is no tag)
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Optional


def extract_gsm8k_number(text: str) -> Optional[str]:
    """The number after the last "####" (or, without one, the last number in `text`), normalised.

    "1,450,000" -> "1450000", "$10.00" -> "10", "-3.50" -> "-3.5"; None when there is no number.
    """
    if text is None:
        return None
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", tail.replace("$", ""))
    if not numbers:
        return None
    candidate = numbers[0] if "####" in text else numbers[-1]
    try:
        value = Decimal(candidate.replace(",", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def hash_answer(text: str) -> Optional[str]:
    """example.py's gold string (`extract_hash_answer`): the text after "####", stripped, with "," and "$"
    removed and nothing else normalised ("$1,000.00" -> "1000.00"); None without "####"."""
    if "####" not in text:
        return None
    return text.split("####")[1].strip().replace(",", "").replace("$", "")


def xml_answer(text: str) -> str:
    """example.py's `extract_xml_answer`: what the correctness and int rewards compare."""
    return text.split("<answer>")[-1].split("</answer>")[0].strip()


def last_hash_integer(text: str) -> Optional[int]:
    """example.py's answer after SFT (`extract_final_number`): int of the last "####\\s*(-?\\d+)" match."""
    matches = re.findall(r"####\s*(-?\d+)", text)
    return int(matches[-1]) if matches else None


def last_answer_integer(text: str) -> Optional[int]:
    """example.py's answer after RL (`extract_final_answer_plus`): int() of the last <answer>...</answer>
    (DOTALL); None when there is none or int() refuses it ("12.5", "twelve")."""
    matches = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
    if not matches:
        return None
    try:
        return int(matches[-1])
    except ValueError:
        return None


def final_answer(text: str) -> Optional[str]:
    """A model output's final answer: the normalised number after the first `####` or inside the first
    `<answer>` tag; None if neither. The lenient rule of evaluation (--extraction lenient) and of the
    `correct_lenient` reward; the paper recipe reads answers as example.py does (the rules above)."""
    if "####" in text:
        after = text.split("####", 1)[1]
        return extract_gsm8k_number("####" + after.split("\n", 1)[0]) if after.strip() else None
    tagged = re.search(r"<answer>(.*?)(?:</answer>|$)", text, flags=re.S)
    return extract_gsm8k_number(tagged.group(1)) if tagged else None
