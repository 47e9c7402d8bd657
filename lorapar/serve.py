"""An OpenAI-compatible chat-completions server for a lorapar checkpoint (standard library only).

    python -m lorapar.serve --ckpt CKPT [--tokenizer tokenizer.model] [--adapter DIR] --port 8000

Endpoints: POST /v1/chat/completions, GET /v1/models, GET /health. Errors are JSON
{"error": {"message", "type", "code"}} with the matching status: 400 (bad JSON, missing or malformed
fields, a prompt longer than the context), 404 (unknown path), 405 (wrong method), 411 (no
Content-Length), 413 (body too large), 500 (generation failed). Messages become LLaMA-2 chat turns
(system text inside the first [INST] block, earlier turns as "<s>[INST] user [/INST] assistant </s>");
the request's `model` is not checked.
Sampling fields: max_tokens (capped to the room left in the model's context; finish_reason "length"
then), temperature (OpenAI's default 1.0; 0 is greedy), top_p, seed, stop (strings cut from the text).

Requests are served by threads, but the model sits behind one lock: one generation runs at a time,
others queue. That keeps memory flat and results deterministic; batching concurrent requests would
raise throughput and is not done here. With --adapter the adapter (LoRA or DM-LoRA) is merged into the base once
at start-up. --port 0 picks a free port; the first line on stdout says where the server listens.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from lorapar.adapter import load_merged
from lorapar.config import add_dataclass_args, dataclass_from_args
from lorapar.errors import FlagError, check_fields, run_main
from lorapar.generate import generate
from lorapar.tokenizer import Tokenizer

log = logging.getLogger("lorapar.serve")

ROUTES = {"/v1/chat/completions": "POST", "/v1/models": "GET", "/health": "GET"}


@dataclass
class ServeArgs:
    ckpt: str = field(
        default="", metadata={"help": "checkpoint lorapar loads: HF dir, Meta dir or llama2.c .bin (required)"}
    )
    tokenizer: str = field(default="", metadata={"help": "SentencePiece model (default: CKPT/tokenizer.model)"})
    adapter: str = field(
        default="", metadata={"help": "adapter directory (LoRA or DM-LoRA) to apply and merge (optional)"}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (loopback by default)"})
    port: int = field(default=8000, metadata={"help": "port to bind; 0 picks a free one"})
    model_name: str = field(default="", metadata={"help": "name reported by /v1/models (default: CKPT's base name)"})
    max_new_tokens: int = field(default=256, metadata={"help": "completion length when a request gives no max_tokens"})
    device: str = field(default="cpu", metadata={"help": "torch device for the model"})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "largest request body accepted"})
    read_timeout: float = field(default=30.0, metadata={"help": "seconds a connection may stall sending a request"})
    max_connections: int = field(default=32, metadata={"help": "connections served at once; more get a 503"})

    def __post_init__(self) -> None:
        check_fields(
            self,
            positive=("max_new_tokens", "max_body_bytes", "max_connections"),
            positive_float=("read_timeout",),
            non_negative=("port",),
        )
        if self.port > 65535:
            raise FlagError(f"--port {self.port}: expected 0..65535")


class RequestError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class ChatModel:
    """The model, its tokenizer and the lock that serialises generation."""

    def __init__(self, model, tokenizer: Tokenizer, name: str, default_max_tokens: int = 256):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.default_max_tokens = default_max_tokens
        self.lock = threading.Lock()

    def prompt_ids(self, messages) -> list[int]:
        """LLaMA-2 chat tokens: system messages join the first user turn; turns alternate user/assistant."""
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "'messages' must be a non-empty list of {role, content}")
        for i, m in enumerate(messages):
            if not (
                isinstance(m, dict)
                and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)
            ):
                raise RequestError(400, f"messages[{i}] must be {{'role': system|user|assistant, 'content': str}}")
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or None
        turns = [m for m in messages if m["role"] != "system"]
        if [m["role"] for m in turns] != ["user", "assistant"] * (len(turns) // 2) + ["user"]:
            raise RequestError(400, "after system messages, roles must alternate user/assistant and end with user")
        tok, ids = self.tokenizer, []
        for k in range(0, len(turns) - 1, 2):
            prompt = tok.chat_prompt(turns[k]["content"], system if k == 0 else None)
            ids += tok.encode(f"{prompt} {turns[k + 1]['content'].strip()} ", bos=True, eos=True)
        return ids + tok.encode_chat(turns[-1]["content"], system if len(turns) == 1 else None)

    def complete(self, request) -> dict:
        if not isinstance(request, dict):
            raise RequestError(400, "the request body must be a JSON object")
        if "messages" not in request:
            raise RequestError(400, "missing required field 'messages'")
        ids = self.prompt_ids(request["messages"])
        max_tokens, temperature, top_p, seed, stop = self._options(request)
        room = self.model.args.max_seq_len - len(ids)
        if room < 1:
            raise RequestError(
                400,
                f"the prompt has {len(ids)} tokens; the model's context is {self.model.args.max_seq_len}",
                "context_length_exceeded",
            )
        max_new = min(max_tokens, room)
        with self.lock:
            out = generate(
                self.model,
                [ids],
                max_new,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                eos_id=self.tokenizer.eos_id,
                pad_id=self.tokenizer.pad_id,
                stop_ids=getattr(self.tokenizer, "stop_ids", None),
            )
        tokens, finished = out.tokens[0], out.finished[0]
        text = self.tokenizer.decode(tokens[:-1] if finished else tokens)
        cut = [text.index(s) for s in stop if s in text]
        if cut:
            text, finished = text[: min(cut)], True
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop" if finished else "length",
                }
            ],
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": len(tokens),
                "total_tokens": len(ids) + len(tokens),
            },
        }

    def _options(self, request: dict):
        def number(key, default, ok, expected, kind=(int, float)):
            value = request.get(key)
            if value is None:
                return default
            if isinstance(value, bool) or not isinstance(value, kind) or not ok(value):
                raise RequestError(400, f"'{key}' must be {expected}, got {value!r}")
            return value

        max_tokens = number("max_tokens", self.default_max_tokens, lambda v: v >= 1, "a positive integer", int)
        temperature = number("temperature", 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")
        top_p = number("top_p", 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
        seed = number("seed", None, lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)", int)
        if request.get("n", 1) != 1:
            raise RequestError(400, "only n = 1 is supported")
        stop = request.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise RequestError(400, "'stop' must be a string or a list of non-empty strings")
        return max_tokens, float(temperature), float(top_p), seed, stop


class Handler(BaseHTTPRequestHandler):
    server_version = "lorapar-serve"
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.timeout = self.server.read_timeout  # type: ignore[attr-defined]  # a stalled client frees its thread
        super().setup()

    @property
    def app(self) -> ChatModel:
        return self.server.app  # type: ignore[attr-defined]

    def send_json(self, status: int, payload: dict, headers: Optional[dict] = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def send_error_json(self, error: RequestError, headers: Optional[dict] = None) -> None:
        self.close_connection = True  # the refused request's body may be unread: never reuse the connection
        self.send_json(
            error.status, {"error": {"message": error.message, "type": error.kind, "code": error.status}}, headers
        )

    def route(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path not in ROUTES:
                raise RequestError(404, f"unknown path {path}; available: {sorted(ROUTES)}", "not_found_error")
            if ROUTES[path] != method:
                return self.send_error_json(
                    RequestError(405, f"{path} accepts {ROUTES[path]} only", "method_not_allowed"),
                    {"Allow": ROUTES[path]},
                )
            if path == "/health":
                return self.send_json(200, {"status": "ok", "model": self.app.name})
            if path == "/v1/models":
                model = {"id": self.app.name, "object": "model", "owned_by": "lorapar"}
                return self.send_json(200, {"object": "list", "data": [model]})
            self.send_json(200, self.app.complete(self.read_json()))
        except RequestError as error:
            self.send_error_json(error)
        except Exception as error:  # a bug or a failed generation: report it, keep serving
            log.exception("request failed")
            self.send_error_json(RequestError(500, f"internal error: {type(error).__name__}: {error}", "server_error"))

    def read_json(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(411 if length is None else 400, "a Content-Length header is required")
        limit = self.server.max_body_bytes  # type: ignore[attr-defined]
        if int(length) > limit:
            raise RequestError(413, f"request body of {length} bytes exceeds the limit of {limit}")
        try:
            raw = self.rfile.read(int(length))
        except TimeoutError:
            raise RequestError(408, f"the request body did not arrive within {self.timeout} s", "timeout") from None
        try:
            return json.loads(raw)
        except RecursionError:  # the decoder recurses once per nesting level
            raise RequestError(400, "request body is nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as error:
            raise RequestError(400, f"request body is not valid JSON: {error}") from None

    def do_GET(self) -> None:
        self.route("GET")

    def do_POST(self) -> None:
        self.route("POST")

    def do_PUT(self) -> None:
        self.route("PUT")

    def do_DELETE(self) -> None:
        self.route("DELETE")

    def do_PATCH(self) -> None:
        self.route("PATCH")

    def log_message(self, format: str, *args) -> None:
        log.info("%s %s", self.address_string(), format % args)


def load_chat_model(args: ServeArgs) -> ChatModel:
    model = load_merged(args.ckpt, args.adapter, device=args.device)
    ckpt_dir = os.path.dirname(args.ckpt) if os.path.isfile(args.ckpt) else args.ckpt
    tokenizer = Tokenizer(args.tokenizer or os.path.join(ckpt_dir, "tokenizer.model"))
    if tokenizer.vocab_size > model.args.vocab_size:
        raise ValueError(
            f"{tokenizer.path}: {tokenizer.vocab_size} pieces, but {args.ckpt} has vocab_size {model.args.vocab_size}"
        )
    name = args.model_name or os.path.basename(os.path.normpath(args.ckpt))
    return ChatModel(model.eval(), tokenizer, name, args.max_new_tokens)


class BoundedServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with at most `max_connections` handler threads; a connection over the cap gets a 503."""

    daemon_threads = True

    def __init__(self, address, handler, max_connections: int):
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(max_connections)
        self.max_connections = max_connections

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            body = json.dumps(
                {
                    "error": {
                        "message": f"the server is at its limit of {self.max_connections} connections",
                        "type": "server_busy",
                        "code": 503,
                    }
                }
            ).encode()
            try:
                request.settimeout(1.0)
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                )
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def make_server(
    app: ChatModel,
    host: str,
    port: int,
    max_body_bytes: int = 1 << 20,
    read_timeout: float = 30.0,
    max_connections: int = 32,
) -> ThreadingHTTPServer:
    server = BoundedServer((host, port), Handler, max_connections)
    server.app, server.max_body_bytes = app, max_body_bytes  # type: ignore[attr-defined]
    server.read_timeout = read_timeout  # type: ignore[attr-defined]
    return server


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, ServeArgs)
    args = dataclass_from_args(ServeArgs, parser.parse_args(argv))
    if not args.ckpt:
        parser.error("--ckpt is required")
    app = load_chat_model(args)
    server = make_server(app, args.host, args.port, args.max_body_bytes, args.read_timeout, args.max_connections)
    host, port = server.server_address[:2]
    print(f"serving {app.name} on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    run_main(main)
