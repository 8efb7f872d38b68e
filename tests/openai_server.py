"""A real local HTTP server that speaks the OpenAI protocol, for tests and benchmarks.

``/v1/completions`` (the policy backend): deterministic completions from the
prompt's length and the sample (its ``seed`` plus the choice index), with vLLM-style ``token_id:N`` tokens and
log-probabilities.

``/v1/chat/completions`` (the judge): it grades from the request itself — it
reads the reference solution and the student's reasoning out of the prompt
(the tags of tasks/models/prompts/judge_*.txt) and scores the reasoning against the
reference's intermediate results and answer, so a client that sends the wrong
text gets the wrong scores. Rubric requests get the reference's lines as items.

Told to misbehave through ``Behaviour`` (all requests) or markers in the
request text (one trace): slow, 500 / 429 for the first N attempts, always 500
(``ALWAYS-FAIL``), non-JSON bodies (``GARBAGE``), an unparseable judge reply
(``JUDGE-NONSENSE``; ``JUDGE-NONSENSE-ONCE``: until reminded of the format),
hang (``JUDGE-HANG``), or a dropped connection (``JUDGE-DROP``); or for every
request: one status (``refuse_status = 401``), ``Retry-After`` on its 429s, an
HTML page instead of JSON (``html``).

    python -m tests.openai_server --port 8123 --delay 0.5   # standalone, lean asyncio server (bench/judge.py)
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Behaviour:
    def __init__(self):
        self.slow_seconds = 0.0
        self.fail_first = 0  # 500 for the first N attempts of each prompt
        self.rate_limit_first = 0  # 429 for the first N attempts of each prompt
        self.always_fail = "ALWAYS-FAIL"  # prompts containing this always get 500
        self.garbage = "GARBAGE"  # prompts containing this get a non-JSON 200
        self.no_token_ids = False  # answer like a server without return_tokens_as_token_ids
        self.hang_seconds = 30.0  # how long JUDGE-HANG requests hang
        self.hang_marker: str | None = None  # requests whose text contains this hang for hang_seconds (a server that never answers)
        self.drop_first = 0  # drop the connection for the first N attempts of each request
        self.refuse_status = 0  # answer every request with this status (401: a bad key)
        self.retry_after = None  # seconds sent as Retry-After with each 429
        self.html = False  # answer every request with an HTML page (a proxy's error page) and status 200
        self.no_prompt_logprobs = False  # answer like a server without vLLM's prompt_logprobs
        self.models: dict[str, dict] = {}  # served name -> {"root", "parent"}; empty: any model name is answered
        self.solve_even = False  # completions: even choices end with the right \\boxed{} answer to the prompt's last "a + b =" sum
        self.request_log: str | None = None  # a file that gets a JSON line per completion request: path, model, its root
        self.attempts: Counter = Counter()
        self.authorization: set[str] = set()  # the Authorization headers received
        self.requests: list[dict] = []
        self.in_flight = self.most_in_flight = 0  # slow requests being answered now, and the most at once
        self.lock = threading.Lock()


_EQ = re.compile(r"-?\d+ [-+*/] -?\d+ = -?\d+")


def _between(text: str, tag: str) -> str | None:
    m = re.search(rf"<{tag}>\n?(.*?)\n?</{tag}>", text, re.S)
    return m.group(1) if m else None


def _answer(text: str) -> str | None:
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        return boxed[-1].strip()
    nums = re.findall(r"-?\d+", text)
    return nums[-1] if nums else None


def judge_reply(messages: list[dict]) -> str:
    """What a careful judge would answer to one of guidedrl's judge prompts."""
    user = messages[0]["content"]
    reminded = len(messages) > 1
    if "JUDGE-NONSENSE" in user and not ("JUDGE-NONSENSE-ONCE" in user and reminded):
        return "The reasoning looks quite good to me overall, nice work!"
    reference = _between(user, "reference_solution") or ""
    ref_eqs, ref_answer = _EQ.findall(reference), _answer(reference)
    if "ITEM: <weight>" in user:  # rubric generation
        return "\n".join([f"ITEM: 1 | {e}" for e in ref_eqs] + [f"ITEM: 2 | final answer {ref_answer}"])
    rubric = _between(user, "rubric")
    if rubric is not None:
        trace = _between(user, "student_reasoning") or ""
        items = [re.sub(r"^\d+\. \(weight [^)]*\) ", "", line) for line in rubric.splitlines() if line.strip()]
        scores = [5 if (it.removeprefix("final answer ") == _answer(trace) if it.startswith("final answer") else it in trace) else 1
                  for it in items]
        return "Checked each item.\n" + "\n".join(f"ITEM {k}: {s}" for k, s in enumerate(scores, 1))
    step = _between(user, "student_step")
    if step is not None:  # the segment protocol: this step alone
        eqs = _EQ.findall(step)
        if any(e not in ref_eqs for e in eqs):
            score = 1 if any(e.split("=")[0] == r.split("=")[0] for e in eqs for r in ref_eqs) else 2  # a checkpoint's sum, another result
        elif eqs:
            score = 5
        elif re.search(r"\\boxed\{", step):
            score = 5 if _answer(step) == ref_answer else 1
        else:
            score = 3
        return "Checkpoints: " + ", ".join(ref_eqs) + f"\nThis step alone: {step.strip()[:40]}\nSCORE: {score}"
    steps_block = _between(user, "student_steps")
    if steps_block is not None:
        steps = re.split(r"\[step \d+\]\n", steps_block)[1:]
        lines, seen = [], ""
        for k, step in enumerate(steps, 1):
            seen += step
            frac = (sum(e in seen for e in ref_eqs) / len(ref_eqs)) if ref_eqs else float(_answer(seen) == ref_answer)
            lines.append(f"STEP {k}: {1 + round(4 * frac)}")
        return "Checkpoints: " + ", ".join(ref_eqs) + "\n" + "\n".join(lines)
    trace = _between(user, "student_reasoning") or ""
    return f"The reference's answer is {ref_answer}.\nSCORE: {5 if _answer(trace) == ref_answer else 1}"


_SUM = re.compile(r"(-?\d+(?:\s*[-+]\s*-?\d+)+)\s*=")


def solved(prompt: str) -> str | None:
    """The value of the prompt's last ``a + b - c =`` chain sum (what --solve answers), or None."""
    found = _SUM.findall(prompt)
    if not found:
        return None
    terms = re.findall(r"([-+]?)\s*(-?\d+)", found[-1])
    return str(sum(-int(v) if sign == "-" else int(v) for sign, v in terms))


def fake_prompt_logprob(previous: int, token: int) -> float:
    """The log-probability the server reports for ``token`` after ``previous`` (``prompt_logprobs``)."""
    return -((previous * 31 + token) % 97) / 10 - 0.01


def _handler(b: Behaviour):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers

        def log_message(self, *a):  # quiet
            pass

        def _send(self, code, body: bytes, ctype="application/json", headers=()):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if not self.path.endswith("/models"):
                return self._send(404, b'{"error": {"message": "not found"}}')
            with b.lock:  # a vLLM server lists what it serves; with no names configured, one (any name is answered)
                data = [{"id": name, "object": "model", "owned_by": "vllm", **m} for name, m in b.models.items()] or \
                    [{"id": "any", "object": "model", "owned_by": "vllm"}]
            self._send(200, json.dumps({"object": "list", "data": data}).encode())

        def _load_lora(self, req):
            name, path = req.get("lora_name"), req.get("lora_path")
            with b.lock:
                b.requests.append(req)
                if not name or not path or name in b.models:
                    return self._send(400, json.dumps({"error": {"message": f"The lora adapter '{name}' has already been loaded."
                                                                  if name in b.models else "lora_name and lora_path are required"}}).encode())
                parent = next((n for n, m in b.models.items() if not m.get("parent")), None)
                b.models[name] = {"root": path, "parent": parent}
            self._send(200, f"Success: LoRA adapter '{name}' added successfully.".encode(), "text/plain")

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path.endswith("/load_lora_adapter"):
                return self._load_lora(req)
            chat = "messages" in req
            raw_prompt = req.get("prompt", "")
            prompt = json.dumps(req["messages"]) if chat else raw_prompt if isinstance(raw_prompt, str) else json.dumps(raw_prompt)
            if b.request_log:
                with b.lock, open(b.request_log, "a") as f:
                    f.write(json.dumps({"path": self.path, "model": req.get("model"),
                                        "root": b.models.get(req.get("model"), {}).get("root"),
                                        **({"probe": True} if raw_prompt in ("1 + 1 =", [1, 2, 3]) else {})}) + "\n")
            if b.models and req.get("model") not in b.models:
                return self._send(404, json.dumps({"error": {"message": f"The model `{req.get('model')}` does not exist.",
                                                             "type": "NotFoundError", "code": 404}}).encode())
            with b.lock:
                b.requests.append(req)
                b.authorization.add(self.headers.get("Authorization", ""))
                b.attempts[prompt] += 1
                attempt = b.attempts[prompt]
            if b.slow_seconds:
                with b.lock:
                    b.in_flight += 1
                    b.most_in_flight = max(b.most_in_flight, b.in_flight)
                time.sleep(b.slow_seconds)
                with b.lock:
                    b.in_flight -= 1
            if "JUDGE-HANG" in prompt or (b.hang_marker and b.hang_marker in prompt):
                time.sleep(b.hang_seconds)
            if "JUDGE-DROP" in prompt or attempt <= b.drop_first:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if b.refuse_status:
                return self._send(b.refuse_status, json.dumps({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                                                         "code": "invalid_api_key"}}).encode())
            if b.html:
                return self._send(200, b"<!doctype html><html><body><h1>502 Bad Gateway</h1></body></html>", "text/html")
            if b.always_fail in prompt or attempt <= b.fail_first:
                return self._send(500, json.dumps({"error": {"message": "boom", "type": "server_error"}}).encode())
            if attempt <= b.fail_first + b.rate_limit_first:
                return self._send(429, json.dumps({"error": {"message": "slow down", "type": "rate_limit"}}).encode(),
                                  headers=[("Retry-After", str(b.retry_after))] if b.retry_after is not None else ())
            if b.garbage in prompt:
                return self._send(200, b"<html>this is not json", "application/json")
            if self.path.endswith("/chat/completions"):
                content = judge_reply(req["messages"])
                body = {"id": "chat-x", "object": "chat.completion", "created": 0, "model": req.get("model"),
                        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
                        "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(content) // 4, "total_tokens": 0}}
                return self._send(200, json.dumps(body).encode())
            if not self.path.endswith("/completions"):
                return self._send(404, b'{"error": {"message": "not found"}}')
            if isinstance(raw_prompt, list) and req.get("prompt_logprobs") is not None and not b.no_prompt_logprobs:
                ids = [int(t) for t in raw_prompt]  # vLLM: a prompt of token ids, its log-probs position by position
                entries = [None] + [{str(t): {"logprob": fake_prompt_logprob(p, t), "rank": 1, "decoded_token": ""}}
                                    for p, t in zip(ids, ids[1:])]
                body = {"id": "cmpl-s", "object": "text_completion", "created": 0, "model": req.get("model"),
                        "choices": [{"index": 0, "text": "x", "finish_reason": "length", "logprobs": None, "prompt_logprobs": entries}],
                        "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}}
                return self._send(200, json.dumps(body).encode())
            n = int(req.get("n", 1))
            choices = []
            for i in range(n):
                v = int(req.get("seed") or 0) + i  # the sample: its seed (vLLM: a seeded request is reproducible) and index
                ids = [(len(prompt) + v) % 50, 7, 8][: max(1, min(3, int(req.get("max_tokens", 3))))]
                as_ids = req.get("return_tokens_as_token_ids") and not b.no_token_ids  # vLLM's field: ids only when asked
                toks = [f"token_id:{t}" for t in ids] if as_ids else [str(t) for t in ids]
                answer = solved(prompt) if b.solve_even and v % 2 == 0 else None
                choices.append({
                    "index": i,
                    "text": f"{prompt[-5:]}#{v}" if answer is None else f"so it is \\boxed{{{answer}}}",
                    "finish_reason": "stop",
                    "logprobs": {"tokens": toks, "token_logprobs": [-0.1 * (k + 1) for k in range(len(ids))],
                                 "top_logprobs": None, "text_offset": list(range(len(ids)))},
                })
            body = {"id": "cmpl-x", "object": "text_completion", "created": 0, "model": req.get("model"),
                    "choices": choices, "usage": {"prompt_tokens": len(prompt), "completion_tokens": 3 * n, "total_tokens": len(prompt) + 3 * n}}
            self._send(200, json.dumps(body).encode())

    return H


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # many clients connect at once (the default backlog is 5)
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client that gave up (time-out) is not news
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class OpenAIServer:
    def __init__(self, port: int = 0):
        self.behaviour = Behaviour()
        self.httpd = _Server(("127.0.0.1", port), _handler(self.behaviour))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


async def serve_fast(port: int, delay: float) -> None:
    """A lean asyncio HTTP/1.1 server for the judge benchmark: chat completions
    answered by ``judge_reply`` after ``delay`` seconds, keep-alive, no threads
    (a thread per connection would measure the server, not the client)."""
    import asyncio

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                req = json.loads(await reader.readexactly(length) or b"{}")
                await asyncio.sleep(delay)
                content = judge_reply(req.get("messages") or [{"content": ""}])
                body = json.dumps({"id": "chat-x", "object": "chat.completion", "created": 0, "model": req.get("model"),
                                   "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
                                   "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    print(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    import argparse
    import asyncio

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--delay", type=float, default=0.0, help="seconds before every answer")
    ap.add_argument("--threaded", action="store_true", help="the threaded test server (all behaviours) instead of the lean one")
    ap.add_argument("--served-model-name", help="threaded: the one model it serves (others: 404), as vLLM's --served-model-name")
    ap.add_argument("--root", help="threaded: the checkpoint it lists as the served model's root (vLLM: the model path)")
    ap.add_argument("--solve", action="store_true", help="threaded: even choices answer the prompt's chain sum right")
    ap.add_argument("--request-log", help="threaded: append a JSON line per completion request (path, model, root) to this file")
    ap.add_argument("--startup-seconds", type=float, default=0.0, help="wait this long before listening (loading a model)")
    args = ap.parse_args()
    time.sleep(args.startup_seconds)
    if args.threaded:
        server = OpenAIServer(port=args.port)
        server.behaviour.slow_seconds = args.delay
        if args.served_model_name:
            server.behaviour.models[args.served_model_name] = {"root": args.root or args.served_model_name, "parent": None}
        server.behaviour.request_log = args.request_log
        server.behaviour.solve_even = args.solve
        print(server.base_url, flush=True)
        server.httpd.serve_forever()
    else:
        asyncio.run(serve_fast(args.port, args.delay))
