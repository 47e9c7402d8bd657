"""lorapar.serve as a real subprocess on a free loopback port, and classify.py against it over HTTP.

The model is a tiny random LLaMA with the real LLaMA-2 tokenizer's 32000-piece vocabulary, saved with
checkpoint.save_model; the server's greedy completions must equal lorapar.generate run in this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import classify
from lorapar.checkpoint import load_model, save_model
from lorapar.config import ModelArgs
from lorapar.generate import generate
from lorapar.model import Transformer
from lorapar.teachers import TeacherArgs, make_teacher, parse_label, role_play_prompt
from lorapar.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
ARGS = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, hidden_dim=64, max_seq_len=640)


@pytest.fixture
def ckpt(tmp_path, asset):
    model = Transformer(ModelArgs(**ARGS))
    model.init_weights(seed=0)
    save_model(model, tmp_path / "ckpt")
    return tmp_path / "ckpt", asset("models/llama2-tokenizer.model")


@pytest.fixture
def serve():
    procs = []

    def start(ckpt_dir, tokenizer, *extra) -> str:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lorapar.serve",
                "--ckpt",
                str(ckpt_dir),
                "--tokenizer",
                str(tokenizer),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--model-name",
                "tiny",
                *extra,
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        line = proc.stdout.readline()  # "serving tiny on http://127.0.0.1:PORT", or "" if it died
        if not line.startswith("serving"):
            proc.kill()
            pytest.fail(f"server did not start: {line!r} {proc.stderr.read()[-2000:]}")
        return line.split(" on ", 1)[1].strip()

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


def call(url: str, method: str = "GET", body=None, raw: bytes | None = None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


def expected_greedy(model, tokenizer: Tokenizer, prompt_ids: list[int], n: int) -> str:
    out = generate(model, [prompt_ids], n, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    tokens = out.tokens[0][:-1] if out.finished[0] else out.tokens[0]
    return tokenizer.decode(tokens)


def test_endpoints_completions_and_errors(ckpt, serve):
    ckpt_dir, tokenizer_path = ckpt
    url = serve(ckpt_dir, tokenizer_path, "--max-body-bytes", "20000")
    tokenizer, model = Tokenizer(tokenizer_path), load_model(ckpt_dir)

    assert call(url + "/health")[:2][0] == 200 and call(url + "/health")[2]["status"] == "ok"
    assert call(url + "/v1/models")[2]["data"][0]["id"] == "tiny"

    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    status, _, reply = call(
        url + "/v1/chat/completions", "POST", {"messages": messages, "max_tokens": 6, "temperature": 0}
    )
    assert status == 200 and reply["object"] == "chat.completion" and reply["model"] == "tiny"
    prompt = tokenizer.encode_chat("What is 2 + 3?")
    assert reply["choices"][0]["message"] == {
        "role": "assistant",
        "content": expected_greedy(model, tokenizer, prompt, 6),
    }
    assert reply["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 6, "total_tokens": len(prompt) + 6}
    assert reply["choices"][0]["finish_reason"] == "length"

    # Multi-turn: Meta's layout, "<s>[INST] <<SYS>>...<</SYS>>\n\nu1 [/INST] a1 </s><s>[INST] u2 [/INST]".
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Sum 1 and 1"},
    ]
    first = tokenizer.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello ", bos=True, eos=True)
    second = tokenizer.encode("[INST] Sum 1 and 1 [/INST]", bos=True)
    status, _, reply = call(
        url + "/v1/chat/completions", "POST", {"messages": turns, "max_tokens": 2, "temperature": 0}
    )
    assert status == 200 and reply["usage"]["prompt_tokens"] == len(first + second)
    assert reply["choices"][0]["message"]["content"] == expected_greedy(model, tokenizer, first + second, 2)

    post = lambda body=None, raw=None: call(url + "/v1/chat/completions", "POST", body, raw)  # noqa: E731
    for status, body in [
        (post(raw=b"{not json"), "not valid JSON"),
        (post({"model": "tiny"}), "missing required field 'messages'"),
        (post({"messages": [{"role": "assistant", "content": "x"}]}), "alternate"),
        (post({"messages": messages, "temperature": -1}), "'temperature'"),
        (post({"messages": messages, "max_tokens": 0}), "'max_tokens'"),
        (post({"messages": messages, "n": 2}), "n = 1"),
        (post({"messages": [{"role": "user", "content": "word " * 700}]}), "context"),
    ]:
        assert status[0] == 400 and body in status[2]["error"]["message"], status
    status, _, error = post(raw=b"x" * 30000)
    assert status == 413 and error["error"]["code"] == 413
    status, _, error = call(url + "/v1/completions", "POST", {"prompt": "x"})
    assert status == 404 and error["error"]["type"] == "not_found_error"
    status, headers, error = call(url + "/v1/chat/completions")
    assert status == 405 and headers["Allow"] == "POST"
    assert call(url + "/health")[0] == 200  # still serving after all of that


def test_out_of_range_values_deep_json_and_stalled_connections(ckpt, serve):
    import socket
    import time

    ckpt_dir, tokenizer_path = ckpt
    # a read timeout well above the test's own steps: on a loaded machine a 1 s one expired the stalled
    # connections before the extra one arrived, which then got a slot and no 503
    url = serve(ckpt_dir, tokenizer_path, "--read-timeout", "4", "--max-connections", "3")
    messages = [{"role": "user", "content": "Hi"}]
    post = lambda body=None, raw=None: call(url + "/v1/chat/completions", "POST", body, raw)  # noqa: E731
    status, _, error = post({"messages": messages, "seed": 2**70, "max_tokens": 1})
    assert status == 400 and "'seed'" in error["error"]["message"]
    status, _, error = post(raw=b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and "nested too deeply" in error["error"]["message"]

    host, port = url.split("//")[1].split(":")
    stalled = [socket.create_connection((host, int(port)), timeout=5) for _ in range(3)]  # send nothing
    try:
        time.sleep(0.3)  # the server has accepted all three and gives each a thread
        extra = socket.create_connection((host, int(port)), timeout=5)
        assert extra.recv(200).startswith(b"HTTP/1.1 503"), "a connection over the cap was not refused"
        extra.close()
        start = time.perf_counter()
        for sock in stalled:  # each is closed by the server after its read timeout
            assert sock.recv(100) == b""
        assert time.perf_counter() - start < 8.0
    finally:
        for sock in stalled:
            sock.close()
    for _ in range(20):  # a slot is released just after its connection closes
        if call(url + "/health")[0] == 200:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the server did not serve again after the stalled connections were closed")


def test_classify_over_http_and_local_teacher(ckpt, serve, asset, tmp_path):
    ckpt_dir, tokenizer_path = ckpt
    url = serve(ckpt_dir, tokenizer_path)
    data = asset("gsm8k/test.jsonl")
    out = tmp_path / "http.jsonl"
    summary = classify.main(
        [
            "--data",
            str(data),
            "--format",
            "gsm8k",
            "--out",
            str(out),
            "--limit",
            "3",
            "--teacher",
            f"http:{url}#tiny",
            "--max-tokens",
            "3",
            "--concurrency",
            "2",
        ]
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tokenizer, model = Tokenizer(tokenizer_path), load_model(ckpt_dir)
    from lorapar.data import load_examples

    examples = load_examples(data, "gsm8k")[:3]
    for row, example in zip(rows, examples):
        # classify sends temperature 0, so the reply is the greedy continuation of the role-play prompt.
        prompt = tokenizer.encode_chat(role_play_prompt(example))
        assert row["replies"] == [expected_greedy(model, tokenizer, prompt, 3)]
        assert row["votes"] == [parse_label(row["replies"][0])]
    assert summary["rows"] == 3 and summary["abstentions"] == sum(r["votes"] == [None] for r in rows)

    # local: the vote compares the summed log-probs of the two label continuations, checked here with a
    # plain full-logits forward.
    teacher = make_teacher(f"local:{ckpt_dir},tokenizer={tokenizer_path}", TeacherArgs(batch_size=2))
    votes = teacher.classify(examples)
    for (vote, reply), example in zip(votes, examples):
        prompt = tokenizer.encode_chat(role_play_prompt(example))
        scores = []
        for text in ("System 1", "System 2"):
            cont = tokenizer.encode(text)
            with torch.no_grad():
                logp = model(torch.tensor([prompt + cont])).log_softmax(-1)[0]
            scores.append(sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(cont)))
        assert vote == (1 if scores[0] >= scores[1] else 2)
        assert reply == f"logp(System 1)={scores[0]:.4f} logp(System 2)={scores[1]:.4f}"


def test_serve_with_adapter_matches_in_process(ckpt, serve, tmp_path):
    from lorapar.adapter import save_adapter
    from lorapar.lora import LoraArgs, apply_lora

    ckpt_dir, tokenizer_path = ckpt
    model = load_model(ckpt_dir)
    args = LoraArgs(r=4, alpha=8.0, init="gaussian", init_std=0.3, seed=1)
    apply_lora(model, args)
    save_adapter(model, str(tmp_path / "adapter"), args)
    url = serve(ckpt_dir, tokenizer_path, "--adapter", str(tmp_path / "adapter"))
    tokenizer = Tokenizer(tokenizer_path)
    prompt = tokenizer.encode_chat("Name a colour.")
    status, _, reply = call(
        url + "/v1/chat/completions",
        "POST",
        {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 5, "temperature": 0},
    )
    assert status == 200
    assert reply["choices"][0]["message"]["content"] == expected_greedy(model.eval(), tokenizer, prompt, 5)
    assert reply["choices"][0]["message"]["content"] != expected_greedy(load_model(ckpt_dir), tokenizer, prompt, 5)
