"""A real local HTTP server that speaks the OpenAI Completions protocol, for tests.

It can be told to be slow, to fail (500 / 429) some requests, or to answer
garbage. Completions are deterministic: the prompt's length and the choice
index, with vLLM-style ``token_id:N`` tokens and log-probabilities.
"""

from __future__ import annotations

import json
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
        self.attempts: Counter = Counter()
        self.requests: list[dict] = []
        self.lock = threading.Lock()


def _handler(b: Behaviour):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def _send(self, code, body: bytes, ctype="application/json"):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            prompt = req.get("prompt", "")
            with b.lock:
                b.requests.append(req)
                b.attempts[prompt] += 1
                attempt = b.attempts[prompt]
            if b.slow_seconds:
                time.sleep(b.slow_seconds)
            if b.always_fail in prompt or attempt <= b.fail_first:
                return self._send(500, json.dumps({"error": {"message": "boom", "type": "server_error"}}).encode())
            if attempt <= b.fail_first + b.rate_limit_first:
                return self._send(429, json.dumps({"error": {"message": "slow down", "type": "rate_limit"}}).encode())
            if b.garbage in prompt:
                return self._send(200, b"<html>this is not json", "application/json")
            if not self.path.endswith("/completions"):
                return self._send(404, b'{"error": {"message": "not found"}}')
            n = int(req.get("n", 1))
            choices = []
            for i in range(n):
                ids = [len(prompt) % 50 + i, 7, 8][: max(1, min(3, int(req.get("max_tokens", 3))))]
                toks = [str(t) for t in ids] if b.no_token_ids else [f"token_id:{t}" for t in ids]
                choices.append({
                    "index": i,
                    "text": f"{prompt[-5:]}#{i}",
                    "finish_reason": "stop",
                    "logprobs": {"tokens": toks, "token_logprobs": [-0.1 * (k + 1) for k in range(len(ids))],
                                 "top_logprobs": None, "text_offset": list(range(len(ids)))},
                })
            body = {"id": "cmpl-x", "object": "text_completion", "created": 0, "model": req.get("model"),
                    "choices": choices, "usage": {"prompt_tokens": len(prompt), "completion_tokens": 3 * n, "total_tokens": len(prompt) + 3 * n}}
            self._send(200, json.dumps(body).encode())

    return H


class OpenAIServer:
    def __init__(self):
        self.behaviour = Behaviour()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.behaviour))
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
