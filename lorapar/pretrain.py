"""Pretrain a tiny LLaMA on the synthetic corpus, and build every asset of the embedded default.

`build_default_assets(out_dir, scale)` writes the task (train/test jsonl), its corpus, a SentencePiece
tokenizer and a pretrained base checkpoint (Hugging Face layout, read back by `checkpoint.load_model`).
It is resumable: each file is written atomically, so one that exists is complete, and a run that
stopped midway redoes only what is missing. `assets.json` records the scale, seed and configs; asking
for a different one in the same directory is an error rather than a silent mix of two builds.

Pretraining is plain next-token cross-entropy with AdamW on random windows of the concatenated
documents (each `<s> doc </s>`), a linear warm-up and a cosine decay: nanoGPT's recipe, scaled down
to a few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from tqdm import tqdm

from lorapar.checkpoint import load_model, save_model
from lorapar.config import ModelArgs, field, save_config
from lorapar.data import load_examples
from lorapar.io import atomic_write_json
from lorapar.model import Transformer
from lorapar.optim import learning_rate
from lorapar.synthetic import SyntheticArgs, read_corpus, train_tokenizer, write_task
from lorapar.templates import format_prompt, format_response
from lorapar.tokenizer import Tokenizer

# The templates whose spellings the embedded tokenizer learns; lorapar's texts (the question, the answer as
# written, the chat prompt) add none, and listing them would change the embedded default's tokenizer.
TOKENIZER_TEMPLATES = ("plain", "chat", "reasoning")


@dataclass
class PretrainArgs:
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = 352  # about 8/3 * dim, as LLaMA's SwiGLU rule gives
    vocab_size: int = field(
        default=512, metadata={"help": "SentencePiece pieces trained on the corpus (the task has few words)"}
    )
    seq_len: int = field(default=128, metadata={"help": "tokens per training window"})
    batch_size: int = 32
    steps: int = field(default=700, metadata={"help": "optimizer steps (deterministic, unlike a time budget)"})
    ranks: int = field(
        default=2,
        metadata={
            "help": "data-parallel processes, each one thread on its half of every batch "
            "(the base depends on it only through float rounding)"
        },
    )
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0

    def model_args(self) -> ModelArgs:
        return ModelArgs(
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            hidden_dim=self.hidden_dim,
            vocab_size=self.vocab_size,
            max_seq_len=1024,
        )  # the local teacher's role-play prompt is ~560 tokens


# "full": ~2-3 minutes of pretraining on 2 CPU cores; "smoke": a few seconds, for CI's end-to-end run.
SCALES: dict[str, tuple[SyntheticArgs, PretrainArgs]] = {
    "full": (SyntheticArgs(), PretrainArgs()),
    "smoke": (
        SyntheticArgs(n_train=200, n_test=40, n_stories=800, n_table_docs=200),
        PretrainArgs(
            dim=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            hidden_dim=176,
            vocab_size=512,
            batch_size=16,
            steps=120,
            warmup_steps=10,
            ranks=1,
        ),
    ),
}


def token_stream(docs: list[str], tokenizer) -> torch.Tensor:
    """All documents as one 1-D tensor: <s> doc </s> <s> doc </s> ..."""
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer.encode(doc, bos=True, eos=True)
    return torch.tensor(ids, dtype=torch.long)


def pretrain(stream: torch.Tensor, args: PretrainArgs, progress: bool = True) -> tuple[Transformer, list[float]]:
    """Train a fresh model on random windows of `stream`; returns it (eval mode) and the loss per step.

    With args.ranks > 1 the steps run data-parallel in that many spawned processes (gloo, one thread
    each: this model is too small for threads to help, while two processes nearly halve the time): every
    rank draws the same windows, takes its share of them and the ranks average their gradients, so each
    step is the one-process step up to float rounding."""
    if stream.numel() <= args.seq_len + 1:
        raise ValueError(f"pretraining stream has {stream.numel()} tokens, fewer than seq_len+1={args.seq_len + 1}")
    if args.batch_size % args.ranks:
        raise ValueError(f"pretraining batch_size {args.batch_size} does not split over {args.ranks} ranks")
    if args.ranks == 1:
        return _pretrain_rank(0, stream, args, progress, None)
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(_pretrain_rank, args=(stream, args, progress, tmp), nprocs=args.ranks)
        result = torch.load(os.path.join(tmp, "result.pt"))
    model = Transformer(args.model_args())
    model.load_state_dict(result["model"])
    return model.eval(), result["losses"]


def _pretrain_rank(rank: int, stream: torch.Tensor, args: PretrainArgs, progress: bool, tmp: Optional[str]):
    """The training loop of one rank (tmp: the rendezvous and result directory of a multi-rank run)."""
    if tmp is not None:
        torch.set_num_threads(1)
        torch_dist.init_process_group(
            "gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=rank, world_size=args.ranks
        )
    model = Transformer(args.model_args())
    model.init_weights(args.seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]  # no decay on norm gains
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(args.seq_len + 1)
    share = args.batch_size // args.ranks
    losses = []
    bar = tqdm(range(args.steps), desc="pretrain", disable=not progress or rank != 0)
    for step in bar:
        starts = torch.randint(0, stream.numel() - args.seq_len - 1, (args.batch_size,), generator=gen)
        window = stream[starts[rank * share : (rank + 1) * share, None] + offsets]
        logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup_steps, "cosine", args.min_lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loss = loss.detach()
        if tmp is not None:  # the mean over the whole batch: every rank holds an equal share of it
            flat = torch.cat([loss.reshape(1)] + [p.grad.reshape(-1) for p in params]).div_(args.ranks)
            torch_dist.all_reduce(flat)
            loss, offset = flat[0], 1
            for p in params:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    if tmp is None:
        return model.eval(), losses
    if rank == 0:
        torch.save({"model": model.state_dict(), "losses": losses}, os.path.join(tmp, "result.pt"))
    torch_dist.destroy_process_group()
    return None


# ----------------------------------------------------------------------------- the default assets


def _spec(scale: str, seed: int) -> dict:
    task, train = SCALES[scale]
    spec = {
        "scale": scale,
        "seed": seed,
        "SyntheticArgs": dataclasses.asdict(dataclasses.replace(task, seed=seed)),
        "PretrainArgs": dataclasses.asdict(dataclasses.replace(train, seed=seed)),
    }
    return json.loads(json.dumps(spec))  # as read back from assets.json (tuples become lists)


def build_default_assets(out_dir: str, scale: str = "full", seed: int = 0, progress: bool = True) -> dict:
    """Write (or reuse) the embedded default's task, corpus, tokenizer and base checkpoint under out_dir.

    Returns {"train", "test", "corpus", "tokenizer", "base"} paths plus "seconds" spent per part
    (0 for a part that already existed).
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {sorted(SCALES)}")
    os.makedirs(out_dir, exist_ok=True)
    spec, spec_path = _spec(scale, seed), os.path.join(out_dir, "assets.json")
    if os.path.exists(spec_path):
        with open(spec_path, encoding="utf-8") as handle:
            found = json.load(handle)
        if found != spec:
            raise ValueError(
                f"{spec_path}: built for scale={found.get('scale')!r} seed={found.get('seed')!r} "
                f"with other settings; use another directory for scale={scale!r} seed={seed}"
            )
    else:
        atomic_write_json(spec_path, spec)
    task_args, train_args = (dataclasses.replace(a, seed=seed) for a in SCALES[scale])
    paths = {
        name: os.path.join(out_dir, file)
        for name, file in [
            ("train", "train.jsonl"),
            ("test", "test.jsonl"),
            ("corpus", "corpus.txt"),
            ("tokenizer", "tokenizer.model"),
            ("base", "base"),
        ]
    }
    seconds = {"data": 0.0, "tokenizer": 0.0, "pretrain": 0.0}

    start = time.perf_counter()
    if not all(os.path.exists(paths[k]) for k in ("train", "test", "corpus")):
        write_task(out_dir, task_args)
        seconds["data"] = time.perf_counter() - start

    start = time.perf_counter()
    if not os.path.exists(paths["tokenizer"]):
        # The training split, in every prompt template, joins the corpus so that question words and
        # template tags (<reasoning>, [INST], ...) get whole pieces; a tokenizer learns spellings only,
        # nothing of the answers a model is asked for.
        examples = load_examples(paths["train"], "gsm8k")
        texts = read_corpus(paths["corpus"]) + [
            format_prompt(e, template) + "\n" + format_response(e, template)
            for e in examples
            for template in TOKENIZER_TEMPLATES
        ]
        train_tokenizer(texts, paths["tokenizer"], vocab_size=train_args.vocab_size)
        seconds["tokenizer"] = time.perf_counter() - start
    tokenizer = Tokenizer(paths["tokenizer"])

    start = time.perf_counter()
    if not os.path.exists(os.path.join(paths["base"], "pretrain.json")):  # written last, after the weights
        stream = token_stream(read_corpus(paths["corpus"]), tokenizer)
        model, losses = pretrain(stream, train_args, progress=progress)
        save_model(model, paths["base"], format="hf")
        save_config(
            os.path.join(paths["base"], "pretrain.json"),
            train_args,
            extra={
                "tokens": stream.numel(),
                "loss_first": losses[0],
                "loss_last": losses[-1],
                "seconds": time.perf_counter() - start,
            },
        )
        seconds["pretrain"] = time.perf_counter() - start
    else:
        load_model(paths["base"])  # an unreadable checkpoint fails here, naming its path
    return {**paths, "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the embedded default: task, corpus, tokenizer, base model.")
    parser.add_argument("--out", required=True, help="directory for the assets (reused when already built)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = build_default_assets(args.out, args.scale, args.seed)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
