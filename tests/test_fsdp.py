"""--fsdp on two gloo ranks: per-rank shard reading (also GGUF), lockstep generation, SFT and GRPO equal to one process,
frozen elements bit-exact, a halted and resumed FSDP run equal to an uninterrupted one, importance scoring equal to
one process with each rank's moment state its own rows.

Everything distributed runs inside ONE two-process spawn (the machine has two cores shared with others);
the single-process references run in the test process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from test_gguf import _random_k_blocks, gguf_name, write_gguf
from test_importance import random_rows
from test_score import argv as score_argv
from test_score import write_checkpoint, write_labelled
from test_sft import TINY, adapter, arithmetic_rows, initial_adapter, write_jsonl
from test_sft import run as run_sft
from test_train_rl import build_sft, rl_argv

import score
import train_rl
import train_sft
from lorapar.checkpoint import base_state_dict, load_model, save_model
from lorapar.checkpoint.meta import META_SHARD_DIM, meta_params
from lorapar.checkpoint.names import meta_to_hf_state_dict
from lorapar.config import ModelArgs
from lorapar.masks import save_masks
from lorapar.model import Transformer

# Odd sizes on purpose: 3 heads of 8 rows split 12/12 cuts a head in two (the HF q/k permutation is per
# head), one kv head of 8 rows splits 4/4 inside it, and vocab 51 gives torch.chunk's uneven 26/25.
READER_ARGS = dict(dim=24, n_layers=2, n_heads=3, n_kv_heads=1, vocab_size=51, hidden_dim=40, max_seq_len=64)
SFT_COMMON = [
    "--max-steps",
    "4",
    "--global-batch",
    "8",
    "--weight-decay",
    "0.1",
    "--save-every",
    "2",
    "--device",
    "cpu",
]
RL_COMMON = [
    "--max-steps",
    "2",
    "--prompts-per-step",
    "4",
    "--micro-batch",
    "3",
    "--weight-decay",
    "0.1",
    "--mu",
    "2",
    "--beta",
    "0.1",
    "--loss-type",
    "dapo",
    "--lr",
    "1e-3",
    "--device",
    "cpu",
]


def write_meta_two_shards(model: Transformer, path: Path) -> None:
    """A Meta release split over 2 model-parallel ranks, as Meta's 13B is."""
    path.mkdir()
    state = base_state_dict(model)
    for rank in range(2):
        part = {}
        for name, tensor in state.items():
            dim = META_SHARD_DIM.get(name.split(".")[-2])
            part[name] = tensor.clone() if dim is None else tensor.chunk(2, dim=dim)[rank].clone()
        torch.save(part, path / f"consolidated.0{rank}.pth")
    (path / "params.json").write_text(json.dumps(meta_params(model.args)))


def write_model_gguf(model: Transformer, path: Path, arch: str, kinds: dict | None = None) -> None:
    """`model` as llama.cpp's converter stores it (a tied head once; Qwen2's q/k rows in Hugging Face's order),
    each tensor of type kinds.get(GGUF name, F32); Q4_K / Q6_K get random valid blocks (gguf cannot quantize them)."""
    from conftest import require

    gguf = require("gguf")
    Q = gguf.GGMLQuantizationType
    state = base_state_dict(model)
    if arch == "qwen2":
        hf = meta_to_hf_state_dict(state, model.args)
        state = {name: hf[key] for name, key in zip(state, hf)}
    rng = np.random.default_rng(0)
    tensors = {}
    for name, value in state.items():
        key, data = gguf_name(name), value.numpy()
        kind = (kinds or {}).get(key, Q.F32)
        if kind in (Q.Q4_K, Q.Q6_K):
            tensors[key] = (_random_k_blocks(*data.shape, kind, rng), kind)
        elif kind in (Q.F32, Q.F16):
            tensors[key] = (data.astype(np.float16 if kind == Q.F16 else np.float32), None)
        else:
            tensors[key] = (gguf.quants.quantize(data, kind), kind)
    write_gguf(path, arch, model.args, tensors)


def quantized_gguf(path: Path) -> str:
    """A Qwen2 GGUF holding every supported type (row lengths of 256, as Q4_K needs); q/k are quantized in
    Hugging Face's row order, so a row range that cuts a head must dequantize, then un-permute, whole heads."""
    from conftest import require

    Q = require("gguf").GGMLQuantizationType
    model = Transformer(
        ModelArgs(dim=256, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=51, hidden_dim=256, qkv_bias=True)
    )
    model.init_weights(seed=7)
    kinds = {
        "token_embd.weight": Q.Q8_0,
        "blk.0.attn_q.weight": Q.Q4_0,
        "blk.0.attn_k.weight": Q.Q4_1,
        "blk.0.attn_v.weight": Q.Q4_K,
        "blk.0.attn_output.weight": Q.Q6_K,
        "blk.0.ffn_gate.weight": Q.F16,
        "blk.0.ffn_up.weight": Q.BF16,
        "blk.0.ffn_down.weight": Q.F32,
        "output.weight": Q.Q8_0,
    }
    write_model_gguf(model, path, "qwen2", kinds)
    return str(path)


def check_shard_reading(rank: int, checkpoints: dict[str, str]) -> None:
    from torch.distributed.tensor import DTensor

    from lorapar.fsdp import load_sharded_model, local_rows

    for kind, path in checkpoints.items():
        full = dict(load_model(path).named_parameters())
        sharded = load_sharded_model(path, torch.float32, torch.device("cpu"), 0)
        for name, p in sharded.named_parameters():
            assert isinstance(p, DTensor), f"{kind}: {name} is not sharded"
            start, stop = local_rows(p)
            local = p.to_local()
            assert local.shape[0] == stop - start <= -(-p.shape[0] // 2), (kind, name, local.shape)
            assert torch.equal(local, full[name][start:stop]), f"{kind}: rank {rank} rows of {name} differ"


def check_lockstep_generation(rank: int, base: str, expected: list) -> None:
    """Rank 0 decodes 2 tokens, rank 1 five: without lockstep the ranks' all-gathers would not pair up."""
    from lorapar.dist import DistInfo
    from lorapar.fsdp import load_sharded_model, lockstep
    from lorapar.generate import generate

    model = load_sharded_model(base, torch.float32, torch.device("cpu"), 0)
    info = DistInfo(rank=rank, world_size=2)
    with lockstep(model, info):
        tokens = generate(model, [[1, 5, 9], [1, 7]], [2, 5][rank]).tokens
    assert tokens == expected[rank], (rank, tokens, expected[rank])


def check_sharded_optimizer(rank: int, base: str) -> None:
    """Packed state for the active elements of this rank's rows only; the clipped norm is the global one."""
    from lorapar.fsdp import init_sharded_lora, load_sharded_model, local_rows
    from lorapar.lora import LoraArgs, apply_lora, named_lora_parameters, replace_linears, set_masks
    from lorapar.optim import MaskedAdamW

    lora = LoraArgs(r=2, init="gaussian", targets=("q", "k", "down"))
    plain = load_model(base)
    apply_lora(plain, lora)
    gen = torch.Generator().manual_seed(7)
    masks = {k: torch.rand(p.shape, generator=gen) < 0.4 for k, p in named_lora_parameters(plain)}
    set_masks(plain, masks)
    sharded = load_sharded_model(
        base, torch.float32, torch.device("cpu"), 0, with_adapter=lambda m: replace_linears(m, lora)
    )
    init_sharded_lora(sharded, lora)
    set_masks(sharded, masks)
    tokens = torch.tensor([[1, 5, 9, 33, 2, 7], [3, 3, 8, 40, 0, 11]])
    norms, optimizers = [], []
    for model in (plain, sharded):
        optimizers.append(MaskedAdamW.for_model(model, lr=1e-2, weight_decay=0.1))
        logits = model(tokens)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
        norms.append(float(optimizers[-1].clip_grad_norm_(1e-3)))
        optimizers[-1].step()
    assert norms[1] == pytest.approx(norms[0], rel=1e-5), norms
    packed, active = torch.zeros(1, dtype=torch.int64), 0
    for (key, p), (_, q) in zip(named_lora_parameters(sharded), named_lora_parameters(plain)):
        start, stop = local_rows(p)
        state = optimizers[1].state[p]["exp_avg"]
        assert state.numel() == int(masks[key][start:stop].sum()), key
        packed += state.numel()
        active += int(masks[key].sum())
        torch.testing.assert_close(p.to_local(), q.detach()[start:stop], rtol=0, atol=1e-6)
    torch_dist.all_reduce(packed)
    assert int(packed) == active  # the ranks' packed states together hold every active element once


# Sharded scoring: r 3 splits A's rows 2/1 over 2 ranks; r 1 leaves rank 1 no rows of A at all.
SCORING_CASES = [dict(r=3, targets=("q", "v", "down")), dict(r=1, targets=("k", "up"))]


def scoring_lora(case: dict):
    from lorapar.lora import LoraArgs

    return LoraArgs(**case, alpha=4.0, init="gaussian", init_std=0.05, seed=2)


def run_sharded_scoring(rank: int, base: str, rows: list, out: str) -> None:
    """fsdp_scoring.score_rows_sharded one row at a time (rank 1 runs a stand-in batch); what each rank holds goes
    to out/scoring-case{i}-rank{rank}.pt for the test to check."""
    from lorapar.dist import DistInfo
    from lorapar.fsdp import build_lora_model
    from lorapar.fsdp_scoring import score_rows_sharded

    info = DistInfo(rank=rank, world_size=2)
    for i, case in enumerate(SCORING_CASES):
        model, _, _ = build_lora_model(base, "float32", "", None, scoring_lora(case), info, 0)
        scores, moments = score_rows_sharded(model, rows, "second", info, None, batch_size=1)
        torch.save(
            {
                "scores": scores,
                "rows": moments.rows,
                "keys": moments.keys,
                "shapes": moments.shapes,
                "sum_grad": moments.sum_grad,
                "sum_grad_sq": moments.sum_grad_sq,
                "count": moments.count,
                "tokens": moments.tokens,
            },
            os.path.join(out, f"scoring-case{i}-rank{rank}.pt"),
        )


def worker(rank: int, store: str, jobs: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        check_shard_reading(rank, jobs["checkpoints"])
        check_lockstep_generation(rank, jobs["checkpoints"]["hf"], jobs["generations"])
        check_sharded_optimizer(rank, jobs["checkpoints"]["hf"])
        run_sharded_scoring(rank, jobs["checkpoints"]["hf"], jobs["scoring_rows"], jobs["scoring_out"])
        for argv in jobs["sft"]:
            train_sft.main(argv)
        for argv in jobs["rl"]:
            train_rl.main(argv)
        for argv in jobs["score"]:
            score.main(argv)
    except BaseException:
        traceback.print_exc()  # mp.spawn reports only the last line otherwise
        raise
    finally:
        torch_dist.destroy_process_group()


@pytest.fixture(scope="module")
def built() -> dict:
    return {}


@pytest.fixture
def fsdp_runs(built, tmp_path_factory, asset):
    """The single-process references and one two-rank spawn running every --fsdp job, built once."""
    if not built:
        built.update(build_runs(tmp_path_factory, asset))
    return built


def build_runs(tmp_path_factory, asset) -> dict:
    from lorapar.generate import generate

    root = tmp_path_factory.mktemp("fsdp")
    tokenizer = str(asset("models/llama2-tokenizer.model"))
    torch.manual_seed(0)
    reader_model = Transformer(ModelArgs(**READER_ARGS))
    reader_model.init_weights(seed=3)
    save_model(reader_model, root / "reader-hf")
    write_meta_two_shards(reader_model, root / "reader-meta")
    checkpoints = {
        "hf": str(root / "reader-hf"),
        "meta": str(root / "reader-meta"),
        "llama2c": str(asset("models/stories260K.bin")),
    }
    if importlib.util.find_spec("gguf"):  # test-only dependency: without it the rest still runs
        gguf_model = Transformer(ModelArgs(**READER_ARGS, qkv_bias=True, tie_embeddings=True))
        gguf_model.init_weights(seed=4)
        write_model_gguf(gguf_model, root / "reader-f32.gguf", "qwen2")
        checkpoints["gguf-f32"] = str(root / "reader-f32.gguf")
        checkpoints["gguf-quantized"] = quantized_gguf(root / "reader-quantized.gguf")
    generations = [generate(load_model(checkpoints["hf"]), [[1, 5, 9], [1, 7]], n).tokens for n in (2, 5)]

    # SFT: the one-process reference, with masks and weight decay, then the same under --fsdp
    sft_model = Transformer(ModelArgs(**TINY))
    sft_model.init_weights(seed=0)
    with torch.no_grad():
        sft_model.output.weight.mul_(40)
    save_model(sft_model, root / "base")
    data = write_jsonl(root / "train.jsonl", arithmetic_rows(16))
    start = initial_adapter()
    gen = torch.Generator().manual_seed(1)
    masks = {k: torch.rand(v.shape, generator=gen) < 0.4 for k, v in start.items()}
    save_masks(str(root / "masks.safetensors"), masks)
    setup = (root, str(root / "base"), data)
    find = lambda _: tokenizer  # noqa: E731  (test_sft.run's asset lookup)
    masked = ["--masks", str(root / "masks.safetensors")]
    argv, _ = run_sft(setup, find, root / "sft-one", *SFT_COMMON, *masked)

    def fsdp_argv(out: str, *extra: str) -> list[str]:
        return [str(root / out) if a == str(root / "sft-one") else a for a in argv] + ["--fsdp", *extra]

    sft_jobs = [fsdp_argv("sft-fsdp"), fsdp_argv("sft-halted", "--halt-at", "2"), fsdp_argv("sft-halted", "--resume")]

    # GRPO from an SFT adapter (loaded shard by shard under --fsdp)
    (root / "rl").mkdir()
    rl = build_sft(root / "rl", tokenizer)
    train_rl.main(rl_argv(rl, root / "rl-one", *RL_COMMON))
    rl_jobs = [rl_argv(rl, root / "rl-fsdp", *RL_COMMON, "--fsdp")]

    # Importance scoring: 3 rows per system over 2 ranks, one at a time, so rank 1 runs a stand-in batch
    (root / "score").mkdir()
    score_inputs = dict(
        ckpt=write_checkpoint(root / "score" / "base", 32000),
        tokenizer=tokenizer,
        data=write_labelled(root / "score" / "labelled.jsonl"),
    )
    score.main(score_argv(score_inputs, root / "score-one", "--device", "cpu"))
    score_jobs = [score_argv(score_inputs, root / "score-fsdp", "--device", "cpu", "--fsdp", "--batch-size", "1")]
    (root / "sharded-scoring").mkdir()

    jobs = {
        "checkpoints": checkpoints,
        "generations": generations,
        "sft": sft_jobs,
        "rl": rl_jobs,
        "score": score_jobs,
        "scoring_rows": random_rows(3, vocab=READER_ARGS["vocab_size"]),
        "scoring_out": str(root / "sharded-scoring"),
    }
    mp.spawn(worker, args=(str(root / "store"), jobs), nprocs=2, join=True)
    return {"root": root, "start": start, "masks": masks, "rl": rl}


def metric(out: Path, name: str) -> list[float]:
    return [m[name] for m in map(json.loads, Path(out, "metrics.jsonl").read_text().splitlines()) if name in m]


def losses(out: Path) -> list[float]:
    return metric(out, "loss")


def test_fsdp_sft_equals_one_process_and_frozen_elements_are_bit_exact(fsdp_runs):
    root, start, masks = fsdp_runs["root"], fsdp_runs["start"], fsdp_runs["masks"]
    one, sharded = adapter(root / "sft-one"), adapter(root / "sft-fsdp")
    for key, mask in masks.items():
        torch.testing.assert_close(sharded[key], one[key], rtol=0, atol=1e-5)
        assert torch.equal(sharded[key][~mask], start[key][~mask]), f"{key}: a frozen element moved under FSDP"
        assert (sharded[key][mask] != start[key][mask]).all(), key
    assert losses(root / "sft-fsdp") == pytest.approx(losses(root / "sft-one"), rel=1e-5)
    # the gradient is the one process's sum, not a mean over the ranks (clipping and Adam would hide a 1/N)
    assert metric(root / "sft-fsdp", "grad_norm") == pytest.approx(metric(root / "sft-one", "grad_norm"), rel=1e-5)
    step = root / "sft-fsdp" / "checkpoints" / "step-000004"
    assert sorted(p.name for p in step.glob("shard-rank*.pt")) == ["shard-rank0.pt", "shard-rank1.pt"]
    assert (step / "COMPLETE").exists() and (step / "adapter_model.safetensors").exists()
    assert (root / "sft-fsdp" / "masks.safetensors").exists()  # the final masks, gathered, peft keys


def test_fsdp_halted_and_resumed_equals_uninterrupted(fsdp_runs):
    root = fsdp_runs["root"]
    straight, resumed = adapter(root / "sft-fsdp"), adapter(root / "sft-halted")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert losses(root / "sft-halted") == losses(root / "sft-fsdp")


def test_fsdp_grpo_equals_one_process(fsdp_runs):
    root = fsdp_runs["root"]
    one, sharded = adapter(root / "rl-one"), adapter(root / "rl-fsdp")
    start = adapter(fsdp_runs["rl"]["sft"])
    for key in one:
        torch.testing.assert_close(sharded[key], one[key], rtol=0, atol=1e-5)
        assert not torch.equal(one[key], start[key]), key

    def records(out):
        return [m for m in map(json.loads, Path(out, "metrics.jsonl").read_text().splitlines()) if "reward_mean" in m]

    for a, b in zip(records(root / "rl-one"), records(root / "rl-fsdp"), strict=True):
        assert b["reward_mean"] == pytest.approx(a["reward_mean"], rel=1e-6)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_fsdp_refuses_what_it_cannot_shard(tmp_path, asset):
    from lorapar.fsdp import init_sharded_lora
    from lorapar.lora import LoraArgs

    with pytest.raises(ValueError, match="pissa takes an SVD of each full base weight"):
        init_sharded_lora(None, LoraArgs(init="pissa"))
    with pytest.raises(RuntimeError, match="launch with torchrun"):
        from lorapar.fsdp import load_sharded_model

        load_sharded_model(str(asset("models/stories260K.bin")), torch.float32, torch.device("cpu"), 0)


def test_fsdp_scoring_equals_one_process(fsdp_runs):
    from safetensors.torch import load_file

    root = fsdp_runs["root"]
    one, sharded = (load_file(str(root / out / "importance.safetensors")) for out in ("score-one", "score-fsdp"))
    assert one.keys() == sharded.keys()
    for key in one:
        torch.testing.assert_close(sharded[key], one[key], rtol=1e-5, atol=1e-9)
    masks_one, masks_sharded = (load_file(str(root / out / "masks.safetensors")) for out in ("score-one", "score-fsdp"))
    assert all(torch.equal(masks_one[k], masks_sharded[k]) for k in masks_one)
    report = json.loads((root / "score-fsdp" / "report.json").read_text())
    assert report["scoring"]["system1"]["scored"] == 3 and report["scoring"]["system2"]["scored"] == 3
    # adapter_init/ is the whole scored adapter, gathered from the shards: the one process's, bit for bit
    init_one, init_sharded = (
        load_file(str(root / out / "adapter_init" / "adapter_model.safetensors")) for out in ("score-one", "score-fsdp")
    )
    assert init_one.keys() == init_sharded.keys() and all(torch.equal(init_one[k], init_sharded[k]) for k in init_one)


def test_fsdp_scoring_keeps_each_ranks_rows_of_the_moments(fsdp_runs):
    """Each rank's moment state is its shard's rows of every tensor (1/N of the adapter), summed over both ranks'
    examples; the scores gathered to rank 0 equal one process's, rank 1 holds none."""
    from lorapar.importance import score_rows
    from lorapar.lora import apply_lora

    root = fsdp_runs["root"]
    rows = random_rows(3, vocab=READER_ARGS["vocab_size"])
    for i, case in enumerate(SCORING_CASES):
        model = load_model(str(root / "reader-hf"))
        apply_lora(model, scoring_lora(case))
        scores, moments = score_rows(model, rows, "second", batch_size=2)
        sizes = [shape.numel() for shape in moments.shapes]
        whole = {
            key: (g.view(shape), g2.view(shape))
            for key, shape, g, g2 in zip(
                moments.keys, moments.shapes, moments.sum_grad.split(sizes), moments.sum_grad_sq.split(sizes)
            )
        }
        held = [torch.load(root / "sharded-scoring" / f"scoring-case{i}-rank{rank}.pt") for rank in range(2)]
        for rank, got in enumerate(held):
            assert got["keys"] == moments.keys and (got["count"], got["tokens"]) == (3, moments.tokens)
            expected_numel = 0
            for key, shape, (start, stop), local_shape in zip(moments.keys, moments.shapes, got["rows"], got["shapes"]):
                per_rank = -(-shape[0] // 2)
                assert (start, stop) == (min(rank * per_rank, shape[0]), min((rank + 1) * per_rank, shape[0])), key
                assert tuple(local_shape) == (stop - start, *shape[1:]), key
                expected_numel += local_shape.numel()
            assert got["sum_grad"].numel() == got["sum_grad_sq"].numel() == expected_numel
            offset = 0
            for key, (start, stop), local_shape in zip(moments.keys, got["rows"], got["shapes"]):
                n = local_shape.numel()
                for name, flat, ref in (
                    ("sum g", got["sum_grad"], whole[key][0]),
                    ("sum g^2", got["sum_grad_sq"], whole[key][1]),
                ):
                    # a sum over examples cancels: an element far below the tensor's scale keeps fewer digits
                    torch.testing.assert_close(
                        flat[offset : offset + n].view(local_shape),
                        ref[start:stop],
                        rtol=1e-5,
                        atol=1e-6 * float(ref.abs().max()),
                        msg=lambda m: f"{key} {name}: {m}",
                    )
                offset += n
        assert held[0]["sum_grad"].numel() + held[1]["sum_grad"].numel() == moments.sum_grad.numel()
        assert held[0]["sum_grad"].numel() < moments.sum_grad.numel()
        if case["r"] == 1:  # rank 1 holds no row of any A: its reduce-scatter share is empty
            assert all(stop == start for key, (start, stop) in zip(moments.keys, held[1]["rows"]) if "lora_A" in key)
        assert held[1]["scores"] is None and held[0]["scores"].keys() == scores.keys()
        for key in scores:
            torch.testing.assert_close(
                held[0]["scores"][key],
                scores[key],
                rtol=1e-5,
                atol=1e-6 * float(scores[key].abs().max()),
                msg=lambda m: f"{key}: {m}",
            )


def test_shard_reader_rows_and_shapes_match_the_full_loader(tmp_path):
    """Any row range, also one cutting a head in two, in all three formats; unknown keys are an error."""
    from safetensors.torch import load_file, save_file

    from lorapar.checkpoint import CheckpointError
    from lorapar.shard_reader import ShardReader

    model = Transformer(ModelArgs(**READER_ARGS))
    model.init_weights(seed=5)
    save_model(model, tmp_path / "hf")
    write_meta_two_shards(model, tmp_path / "meta")
    full = dict(model.named_parameters())
    for kind in ("hf", "meta"):
        reader = ShardReader(str(tmp_path / kind))
        assert reader.names() == set(full)
        for name, tensor in full.items():
            assert reader.shape(name) == tuple(tensor.shape), (kind, name)
            for start, stop in ((0, 1), (3, 13), (5, tensor.shape[0])):
                stop = min(stop, tensor.shape[0])
                assert torch.equal(reader.rows(name, start, stop), tensor.detach()[start:stop]), (kind, name, start)
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    extra = {**tensors, "model.layers.0.mlp.extra.weight": torch.zeros(2)}
    save_file(extra, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unknown key 'model.layers.0.mlp.extra.weight'"):
        ShardReader(str(tmp_path / "hf"))


def test_shard_reader_reads_gguf_row_ranges_as_the_full_loader(tmp_path):
    """Every supported GGUF type, in row ranges that start mid-tensor and cut a q/k head: each range,
    dequantized on its own, equals those rows of the whole-model loader's tensor bit for bit."""
    from lorapar.shard_reader import ShardReader

    path = quantized_gguf(tmp_path / "q.gguf")
    full = dict(load_model(path).named_parameters())
    reader = ShardReader(path)
    assert reader.kind == "gguf" and reader.names() == set(full)
    for name, tensor in full.items():
        assert reader.shape(name) == tuple(tensor.shape), name
        rows = tensor.shape[0]
        for start, stop in ((0, 1), (3, 13), (100, 200), (5, rows), (rows, rows)):
            start, stop = min(start, rows), min(stop, rows)
            got = reader.rows(name, start, stop)
            assert got.shape == tensor[start:stop].shape, (name, start, stop)
            assert torch.equal(got.float(), tensor.detach()[start:stop]), (name, start, stop)
