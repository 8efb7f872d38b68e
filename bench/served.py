"""Rollout generation through the openai backend against a real server (`transformers serve` with the tiny
policy, started here) vs a bare async client sending the same requests to the same server at the same
concurrency: the limit a client can reach. Prints completion tokens/s of both, the ratio (goal >= 0.9),
and where the rest of our time goes (re-tokenizing text-only answers, checking answers).

    python bench/served.py [--problems 32] [--samples 8] [--concurrency 4] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.real_servers import TransformersServe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()

    import reasoning_gym
    from openai import AsyncOpenAI
    from transformers import AutoTokenizer

    from tasks.models.answers import check
    from tasks.models.generation import SamplingParams
    from tasks.models.openai_backend import OpenAIBackend
    from tasks.models.prompts import chat, fill, load_template
    from tasks.models.served import probe

    tiny = ROOT / "data" / "models" / "tiny-policy"
    tok = AutoTokenizer.from_pretrained(tiny)
    data = reasoning_gym.create_dataset("chain_sum", size=args.problems, seed=0, min_terms=2, max_terms=2, min_digits=1, max_digits=1)
    template = load_template("tiny_plain")
    problems = [{"question": d["question"], "answer": str(d["answer"]), "problem_id": str(i)} for i, d in enumerate(data)]
    prompts = [chat(tok, fill(template, p["question"])) for p in problems]
    params = SamplingParams(n=args.samples, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)

    with TransformersServe(tiny) as server:
        caps = probe(server.url, server.model)
        backend = OpenAIBackend(server.model, base_url=server.url, concurrency=args.concurrency, capabilities=caps)
        backend.tokenizer = tok

        async def bare() -> list[str]:  # the same requests, nothing else: text back
            sem = asyncio.Semaphore(args.concurrency)
            async with AsyncOpenAI(base_url=server.url, api_key="EMPTY") as client:
                async def one(p, j):
                    async with sem:
                        r = await client.completions.create(model=server.model, prompt=p, max_tokens=args.max_new_tokens,
                                                            temperature=1.0, top_p=1.0, seed=j)
                        return r.choices[0].text
                return await asyncio.gather(*(one(p, j) for p in prompts for j in range(args.samples)))

        backend.generate(prompts[:2], SamplingParams(n=1, max_new_tokens=4))  # warm the server
        t0 = time.perf_counter()
        texts = asyncio.run(bare())
        bare_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        samples = backend.generate(prompts, params)
        ours_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for p, group in zip(problems, samples):
            for s in group:
                check(s.text, p)
        check_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for s in (s for g in samples for s in g):
            backend.retokenize(s.text, s.finish_reason)
        tok_s = time.perf_counter() - t0

    bare_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    our_tokens = sum(len(tok(s.text, add_special_tokens=False)["input_ids"]) for g in samples for s in g)  # as counted for the bare client
    ours_rate, bare_rate = our_tokens / ours_s, bare_tokens / bare_s
    print(f"server: transformers serve (tiny policy, CPU); {len(prompts)} prompts x {args.samples} samples, concurrency {args.concurrency}")
    print(f"what it gave: {', '.join(caps.gave())}; guidedrl computed: {', '.join(caps.computed())}")
    print(f"bare async client : {bare_tokens:6d} completion tokens in {bare_s:6.2f} s = {bare_rate:8.1f} tokens/s")
    print(f"openai backend    : {our_tokens:6d} completion tokens in {ours_s:6.2f} s = {ours_rate:8.1f} tokens/s")
    print(f"ratio (goal >= 0.9): {ours_rate / bare_rate:.2f}")
    print(f"beside generation: re-tokenizing {tok_s:.3f} s (inside the backend's time), checking answers {check_s:.3f} s "
          f"(the stage's, after it)")


if __name__ == "__main__":
    main()
