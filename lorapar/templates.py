"""Prompt templates: how an Example becomes the prompt text a model continues and the response it learns.

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
"""

from __future__ import annotations

import re

from lorapar.data import Example
from lorapar.tokenizer import chat_prompt

TEMPLATES = ("plain", "chat", "reasoning", "lorapar", "alpaca")
PHASES = ("sft", "rl")  # which stage a prompt is for; only the lorapar template tells them apart
REASONING_SYSTEM_PROMPT = "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"
# example.py's SYSTEM_PROMPT verbatim (a triple-quoted string: it starts and ends with a newline).
LORAPAR_SYSTEM_PROMPT = "\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"
# The DM-LoRA supplement's prompt (PiSSA's train.py, which it was derived from): Alpaca's no-input form.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{question}\n\n### Response:"
)


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
