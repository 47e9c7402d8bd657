"""Teachers that label an example System 1 or System 2, the role-play prompt, voting and agreement.

LoRA-PAR splits the training data by asking several teacher LLMs to role-play the target model and
say which "system" an item needs (System 1: immediate recall, straightforward reading or one simple
inference; System 2: multi-step reasoning or chaining), then takes the majority vote.

A teacher is built from a spec string (`make_teacher`):
  local:CKPT[,tokenizer=PATH]   a checkpoint lorapar loads; the label whose continuation ("System 1" vs
                                "System 2" after the chat prompt) has the higher log-likelihood; batched,
                                no free text. The tokenizer defaults to CKPT/tokenizer.model.
  http:URL#MODEL                an OpenAI-compatible server: POST URL/v1/chat/completions (URL may already
                                end in /v1 or /chat/completions), greedy, the reply parsed by `parse_label`.
  rule:gsm8k-steps[,threshold=N]  GSM8K only: steps = max(calculator annotations <<...>>, non-empty lines
                                before "####") of the reference answer; System 2 when steps >= N (default 3).
  rule:length[,threshold=N]     any format: System 2 when the reference answer has >= N words (default 40).
  rule:oracle                   the row's own `system` field (a known label, e.g. synthetic ground truth);
                                abstains when the row has none.
Every teacher returns, per example, (label or None for an abstention, the raw reply as text).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from lorapar.batching import collate
from lorapar.checkpoint import load_model
from lorapar.data import Example
from lorapar.errors import check_fields
from lorapar.loss import IGNORE_INDEX, target_logprobs
from lorapar.templates import gsm8k_reasoning
from lorapar.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Vote = tuple[Optional[int], str]  # (1 | 2 | None for an abstention, the raw reply)

ROLE_PLAY = """Act as {target}. You will be shown a question together with its reference answer. Decide which \
kind of thinking you, as {target}, would need in order to produce that answer.

System 1: fast and intuitive. The answer comes from immediate recall of a fact, a straightforward reading \
of the question, or one simple inference.
System 2: slow and deliberate. The answer needs multi-step reasoning, several calculations, or chaining \
facts and inferences together.

Question:
{question}

Reference answer:
{answer}

Which system does {target} need for this question? Reply with exactly "System 1" or "System 2"."""

LABEL_TEXT = {1: "System 1", 2: "System 2"}


def role_play_prompt(example: Example, target: str = "LLaMA-2-7B") -> str:
    return ROLE_PLAY.format(target=target, question=example.question.strip(), answer=example.answer.strip())


def parse_label(reply: str) -> Optional[int]:
    """1 or 2 from a free-text reply, None (abstention) when it names neither or is ambiguous.

    Accepts "System 1", "system-2", "System2", "**System 2**", a bare "1"/"2". A reply that mentions both
    systems is decided by its last line when that line names exactly one, otherwise it abstains.
    """
    text = reply.strip()
    if text.strip("*. ") in ("1", "2"):
        return int(text.strip("*. "))
    found = set(re.findall(r"system[\s\-_]*([12])\b", text, flags=re.IGNORECASE))
    if len(found) == 1:
        return int(found.pop())
    if len(found) > 1:
        last = set(re.findall(r"system[\s\-_]*([12])\b", text.splitlines()[-1], flags=re.IGNORECASE))
        if len(last) == 1:
            return int(last.pop())
    return None


# ----------------------------------------------------------------------------- voting and agreement


def majority_vote(votes: Sequence[Optional[int]], default: int) -> tuple[int, str]:
    """(label, how it was decided): "majority", or `default` when every teacher abstained ("all-abstain")
    or the non-abstaining votes tie ("tie")."""
    ones, twos = sum(v == 1 for v in votes), sum(v == 2 for v in votes)
    if ones == twos:
        return default, "all-abstain" if ones == 0 else "tie"
    return (1 if ones > twos else 2), "majority"


def fleiss_kappa(rows: Sequence[Sequence[Optional[int]]]) -> Optional[float]:
    """Fleiss' kappa over the items where every teacher voted (categories 1 and 2).

    kappa = (P - Pe) / (1 - Pe), P the mean per-item agreement (sum_j n_ij^2 - n) / (n (n - 1)),
    Pe = sum_j p_j^2 with p_j the overall share of category j. None when undefined: fewer than two
    teachers, no complete item, or every vote in one category (Pe = 1).
    """
    complete = [r for r in rows if all(v is not None for v in r)]
    if not complete or len(complete[0]) < 2:
        return None
    n = len(complete[0])
    counts = [(sum(v == 1 for v in r), sum(v == 2 for v in r)) for r in complete]
    agreement = sum((a * a + b * b - n) / (n * (n - 1)) for a, b in counts) / len(counts)
    share_1 = sum(a for a, _ in counts) / (n * len(counts))
    expected = share_1**2 + (1 - share_1) ** 2
    if expected >= 1.0:
        return None
    return (agreement - expected) / (1 - expected)


# ----------------------------------------------------------------------------- backends


@dataclass
class TeacherArgs:
    target_model: str = field(default="LLaMA-2-7B", metadata={"help": "model name the teachers role-play"})
    batch_size: int = field(default=8, metadata={"help": "examples per teacher call (local: forward batch)"})
    device: str = field(default="cpu", metadata={"help": "device for local: teachers"})
    timeout: float = field(default=60.0, metadata={"help": "http: seconds per request"})
    retries: int = field(default=4, metadata={"help": "http: retries after a 5xx, 429, timeout or connection error"})
    backoff: float = field(default=1.0, metadata={"help": "http: first retry delay in seconds, doubled each retry"})
    concurrency: int = field(
        default=4, metadata={"help": "http: requests in flight per teacher (at most --batch-size)"}
    )
    max_tokens: int = field(default=16, metadata={"help": "http: completion token limit per reply"})
    api_key_env: str = field(
        default="LORAPAR_API_KEY,OPENAI_API_KEY",
        metadata={"help": "http: environment variables tried in order for the API key (Bearer); none set: no key"},
    )

    def __post_init__(self) -> None:
        for name in ("batch_size", "concurrency", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"TeacherArgs.{name} must be >= 1, got {getattr(self, name)}")
        check_fields(self, non_negative=("retries", "backoff"), positive_float=("timeout",))


class TeacherError(RuntimeError):
    """A teacher could not answer at all (server down after retries, bad spec): the run stops, resumable."""


class RuleTeacher:
    DEFAULTS = {"gsm8k-steps": 3, "length": 40, "oracle": None}

    def __init__(self, name: str, threshold: Optional[float] = None):
        if name not in self.DEFAULTS:
            raise ValueError(f"unknown rule {name!r}; expected one of {sorted(self.DEFAULTS)}")
        self.name = name
        self.threshold = self.DEFAULTS[name] if threshold is None else threshold

    def classify(self, examples: Sequence[Example]) -> list[Vote]:
        return [self._one(ex) for ex in examples]

    def _one(self, ex: Example) -> Vote:
        if self.name == "oracle":
            known = ex.source.get("system")
            return (known, f"system field = {known}") if known in (1, 2) else (None, "no system field")
        if self.name == "length":
            words = len(ex.answer.split())
            return (2 if words >= self.threshold else 1), f"words={words} threshold={self.threshold:g}"
        if ex.format != "gsm8k":
            raise TeacherError(f"rule:gsm8k-steps needs GSM8K rows, got format {ex.format!r}")
        annotations = len(re.findall(r"<<[^>]*>>", ex.answer))
        lines = len([line for line in gsm8k_reasoning(ex.answer).splitlines() if line.strip()])
        steps = max(annotations, lines)
        return (2 if steps >= self.threshold else 1), f"steps={steps} threshold={self.threshold:g}"


REFUSED = "refused by the server: "  # the start of the reply recorded for a request the server rejected


class RequestRefused(Exception):
    """The server rejected this one request (400, 413, 422: e.g. a prompt over its context)."""


class HttpTeacher:
    """An OpenAI-compatible chat-completions endpoint, called with the standard library only.

    A 5xx, 429, timeout or connection error is retried. A 400, 413 or 422 is about this request only (a
    prompt over the server's context, say): the teacher abstains on that row and the server's message is
    kept as its reply (counted as `refused` in classify's summary), as the local: teacher abstains on a
    prompt it cannot fit. Any other status (401, 403, 404: the key, URL or model is wrong) stops the run.
    """

    RETRYABLE = (429, 500, 502, 503, 504)
    ROW_SPECIFIC = (400, 413, 422)
    HINTS = {
        401: "the API key was refused (see --api-key-env)",
        403: "the API key may not use this model",
        404: "no such endpoint or model: check the URL and #MODEL",
    }

    def __init__(self, url: str, model: str, args: TeacherArgs):
        base = url.rstrip("/")
        if not base.endswith("/chat/completions"):
            base = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self.url, self.model, self.args = base, model, args
        names = [n.strip() for n in args.api_key_env.split(",") if n.strip()]
        self.api_key = next((os.environ[n] for n in names if os.environ.get(n)), None)

    def classify(self, examples: Sequence[Example]) -> list[Vote]:
        prompts = [role_play_prompt(ex, self.args.target_model) for ex in examples]
        stopped = threading.Event()  # after a fatal error, requests not yet sent are not sent

        def one(prompt: str) -> str:
            if stopped.is_set():
                raise TeacherError(f"{self.url}: not sent after an earlier error")
            try:
                return self.complete(prompt)
            except RequestRefused as refusal:
                return REFUSED + str(refusal)
            except TeacherError:
                stopped.set()
                raise

        with ThreadPoolExecutor(max_workers=max(1, self.args.concurrency)) as pool:
            replies = list(pool.map(one, prompts))
        return [(None, reply) if reply.startswith(REFUSED) else (parse_label(reply), reply) for reply in replies]

    def complete(self, prompt: str) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "temperature": 0.0,
                "max_tokens": self.args.max_tokens,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.args.retries + 1):
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.args.timeout) as response:
                    raw = response.read()
                try:
                    return json.loads(raw)["choices"][0]["message"]["content"] or ""
                except (ValueError, KeyError, IndexError, TypeError):
                    raise TeacherError(f"{self.url}: reply is not a chat completion: {raw[:300]!r}") from None
            except urllib.error.HTTPError as err:
                detail = err.read()[:300].decode("utf-8", "replace")
                if err.code in self.ROW_SPECIFIC:
                    raise RequestRefused(f"HTTP {err.code}: {detail}") from None
                if err.code not in self.RETRYABLE:
                    hint = f" ({self.HINTS[err.code]})" if err.code in self.HINTS else ""
                    raise TeacherError(f"{self.url} (model {self.model!r}): HTTP {err.code}{hint}: {detail}") from None
                problem = f"HTTP {err.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                problem = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            if attempt == self.args.retries:
                raise TeacherError(f"{self.url}: gave up after {attempt + 1} attempts; last error {problem}")
            delay = self.args.backoff * 2**attempt
            log.warning("%s: %s; retrying in %.1fs", self.url, problem, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")


class LocalTeacher:
    """A lorapar checkpoint scoring the two label continuations after the chat prompt.

    label = argmax over c in {"System 1", "System 2"} of sum_t log p(c_t | prompt, c_<t). A prompt that does
    not fit the model's max_seq_len is an abstention (reported in the reply), not a silent cut.
    """

    def __init__(self, ckpt: str, tokenizer: Optional[str], args: TeacherArgs):
        tokenizer = tokenizer or os.path.join(ckpt, "tokenizer.model")
        self.tokenizer = Tokenizer(tokenizer)
        self.model = load_model(ckpt, device=args.device, dtype=torch.float32).eval()
        if self.tokenizer.vocab_size > self.model.args.vocab_size:
            raise ValueError(
                f"{tokenizer}: {self.tokenizer.vocab_size} pieces but {ckpt} has vocab {self.model.args.vocab_size}"
            )
        self.args = args
        self.continuations = {label: self.tokenizer.encode(text, eos=False) for label, text in LABEL_TEXT.items()}

    def classify(self, examples: Sequence[Example]) -> list[Vote]:
        votes: list[Optional[Vote]] = [None] * len(examples)
        rows, owners = [], []
        limit = self.model.args.max_seq_len
        for i, ex in enumerate(examples):
            prompt = self.tokenizer.encode_chat(role_play_prompt(ex, self.args.target_model))
            longest = len(prompt) + max(len(c) for c in self.continuations.values())
            if longest > limit:
                votes[i] = (None, f"prompt too long: {longest} tokens > max_seq_len {limit}")
                continue
            for cont in self.continuations.values():
                rows.append({"input_ids": prompt + cont, "labels": [IGNORE_INDEX] * len(prompt) + cont})
            owners.append(i)
        device = self.model.tok_embeddings.weight.device
        for start in range(0, len(rows), 2 * self.args.batch_size):
            batch = collate(rows[start : start + 2 * self.args.batch_size], self.tokenizer.pad_id)
            with torch.inference_mode():
                logp, _ = target_logprobs(self.model, batch["input_ids"].to(device), batch["labels"].to(device))
            totals = logp.sum(-1).tolist()
            for k in range(0, len(totals), 2):
                one, two = totals[k], totals[k + 1]
                votes[owners[(start + k) // 2]] = (
                    1 if one >= two else 2,
                    f"logp(System 1)={one:.4f} logp(System 2)={two:.4f}",
                )
        return votes  # type: ignore[return-value]


def _options(spec: str, parts: list[str], allowed: set[str]) -> dict[str, str]:
    options = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or key not in allowed:
            raise ValueError(f"teacher spec {spec!r}: unexpected option {part!r}; allowed: {sorted(allowed) or 'none'}")
        options[key] = value
    return options


def make_teacher(spec: str, args: TeacherArgs):
    """A teacher from its spec string (see the module docstring)."""
    kind, sep, body = spec.partition(":")
    if not sep or not body:
        raise ValueError(f"teacher spec {spec!r}: expected local:CKPT[,tokenizer=PATH], http:URL#MODEL or rule:NAME")
    if kind == "rule":
        name, *rest = body.split(",")
        threshold = _options(spec, rest, {"threshold"}).get("threshold")
        return RuleTeacher(name, float(threshold) if threshold is not None else None)
    if kind == "local":
        ckpt, *rest = body.split(",")
        return LocalTeacher(ckpt, _options(spec, rest, {"tokenizer"}).get("tokenizer"), args)
    if kind == "http":
        url, sep, model = body.rpartition("#")
        if not sep or not url or not model:
            raise ValueError(f"teacher spec {spec!r}: expected http:URL#MODEL, e.g. http:http://127.0.0.1:8000#llama")
        return HttpTeacher(url, model, args)
    raise ValueError(f"teacher spec {spec!r}: unknown kind {kind!r}; expected local, http or rule")
