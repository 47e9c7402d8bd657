"""From examples to training batches: label masking, the SFT dataset, the one right-padding collator
and the length-grouped distributed sampler.


Tokenisation: prompt and response are encoded separately (BOS + prompt, response + EOS) and concatenated,
so the boundary is exact and matches generation, which continues from the prompt's tokens. SentencePiece
"""

from __future__ import annotations

import logging
import math
import random
from typing import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from lorapar.data import Example
from lorapar.loss import IGNORE_INDEX
from lorapar.templates import chat_format, format_prompt, format_response, prompt_ends_with_eos

log = logging.getLogger(__name__)


def encode_example(
    tokenizer,
    prompt: str,
    response: str,
    max_len: int,
    *,
    bos: bool = True,
    prompt_eos: bool = False,
    response_eos: bool = True,
) -> tuple[list[int], list[int], bool]:
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

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer,
        template: str = "plain",
        max_len: int = 512,
        overflow: str = "drop",
    ):
        if overflow not in ("drop", "truncate"):
            raise ValueError(f"overflow must be 'drop' or 'truncate', got {overflow!r}")
        self.items: list[dict[str, list[int]]] = []
        self.examples: list[Example] = []
        self.dropped = self.truncated = 0
        for example in examples:
            ids, labels, cut = encode_example(
                tokenizer,
                format_prompt(example, template, chat=chat_format(tokenizer)),
                format_response(example, template),
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
            log.warning(
                "SFTDataset: %d of %d examples longer than max_len=%d: %d dropped, %d truncated",
                self.dropped + self.truncated,
                len(examples),
                max_len,
                self.dropped,
                self.truncated,
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.items[index]

    @property
    def lengths(self) -> list[int]:
        return [len(item["input_ids"]) for item in self.items]


def collate(batch: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: input_ids with pad_id, labels with -100 (B, T) int64.

    The one collator: SFT batches, GRPO's rollouts (grpo.pack), importance scoring and the teachers'
    likelihoods. Right padding is what causal attention needs to leave every real position as it is."""
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

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        mega_batches: int = 50,
    ):
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
