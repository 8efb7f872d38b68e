"""Benchmark: the LLM judge's throughput against a slow OpenAI-compatible server.

    python bench/judge.py [--traces 2560] [--concurrency 64] [--delay 0.5]

Starts the lean asyncio OpenAI-compatible server of tests/openai_server.py in
its own process, answering every request after a fixed delay (it grades from
the request like the test server), and grades N traces
with guidedrl's judge (process mode, empty request cache, real `openai` client
over HTTP). The ideal rate is concurrency / delay requests per second; the
benchmark prints the achieved rate over the ideal, measured in the same run
(goal: >= 0.9 at concurrency 64), and then the same traces again, which must all
come from the disk cache.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", type=int, default=2560, help="traces to grade (2560 = 20 s of ideal time, start-up amortised)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--delay", type=float, default=0.5, help="server-side seconds per answer")
    args = ap.parse_args()

    from tasks.core.config import BaseConfig
    from tasks.models import judge
    from tasks.models.answers import chain_sum_reference

    server = subprocess.Popen([sys.executable, "-m", "tests.openai_server", "--delay", str(args.delay)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        base_url = server.stdout.readline().strip()
        traces = []
        for i in range(args.traces):
            expr = f"{10 + i % 90} + {i % 7} - {i % 5}"
            ref = chain_sum_reference(expr)
            completion = "\n".join(ref.splitlines()[:-1]) + f"\n\\boxed{{{eval(expr)}}}"
            traces.append(judge.Trace(f"s{i}", f"p{i}", f"What is {expr}? (#{i})", ref, completion, True))
        prompts = judge.judge_prompts(BaseConfig())  # the built-in templates, as a run's default config names them
        with tempfile.TemporaryDirectory() as tmp:
            def run():
                client = judge.JudgeClient("bench-judge", base_url, "OPENAI_API_KEY", judge.RequestCache(Path(tmp)),
                                           concurrency=args.concurrency, timeout=30.0, max_retries=2)
                j = judge.LLMJudge(client, prompts, "process")
                t0, c0 = time.perf_counter(), time.process_time()
                rows = j.grade(traces)
                seconds = time.perf_counter() - t0
                client.stats["cpu_ms_per_request"] = round(1000 * (time.process_time() - c0) / max(1, len(traces)), 2)
                return seconds, rows, client.stats

            seconds, rows, stats = run()
            ok = sum(r["parse_ok"] for r in rows)
            ideal = args.concurrency / args.delay
            achieved = stats["requests"] / seconds
            print(f"graded {ok}/{len(rows)} traces: {stats['requests']} requests in {seconds:.2f}s, "
                  f"{stats['retries']} retries, {stats['failed']} failed; client CPU {stats['cpu_ms_per_request']} ms per trace")
            print(f"achieved {achieved:.1f} requests/s; ideal {args.concurrency} / {args.delay}s = {ideal:.1f} requests/s")
            print(f"ratio achieved/ideal: {achieved / ideal:.3f}  (goal >= 0.9)")
            seconds2, rows2, stats2 = run()
            print(f"re-run: {stats2['cache_hits']} cache hits, {stats2['requests']} requests, {seconds2:.2f}s")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
