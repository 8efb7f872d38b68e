"""Benchmark: the rollout stage's generation against a raw `model.generate` loop.

    python bench/rollouts.py [--model data/models/tiny-policy] [--problems 96] [--samples 8]

Both sides run in this process on the same batches (same prompts, same order,
same batch size), with log-probabilities on (`output_scores`); the rollout side
draws each row from its own seeded stream (tasks/models/sampling.py), the raw
loop from torch's global generator.
Prints tokens/s of each and their ratio (goal: >= 0.9), and the time of
answer checking and of writing the Parquet shard as a share of the whole stage
(goal: < 10%).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "data" / "models" / "tiny-policy"))
    ap.add_argument("--problems", type=int, default=96)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import reasoning_gym
    import torch

    from tasks.core.schemas import to_table
    from tasks.models.generation import SamplingParams
    from tasks.models.transformers_backend import TransformersBackend
    from tasks.models.prompts import chat, fill, load_template
    from tasks.stages.rollouts import sample_rows

    backend = TransformersBackend(args.model, batch_size=args.batch_size)
    tok, model = backend.tokenizer, backend.model
    data = reasoning_gym.create_dataset("chain_sum", size=args.problems, seed=99, min_terms=2, max_terms=3, min_digits=1, max_digits=2)
    problems = [{"problem_id": str(i), "answer": e["answer"], "question": e["question"], "level": "bench",
                 "metadata": json.dumps({"reasoning_gym": {"task": "chain_sum", "entry": e}})} for i, e in enumerate(data)]
    template = load_template("tiny_plain")
    prompts = [chat(tok, fill(template, p["question"])) for p in problems]
    params = SamplingParams(n=args.samples, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)

    # the same batches the backend builds: jobs sorted by prompt length, cut by batch size
    enc = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    jobs = sorted(((i, j) for i in range(len(prompts)) for j in range(params.n)), key=lambda ij: (len(enc[ij[0]]), ij))
    batches = [jobs[b : b + args.batch_size] for b in range(0, len(jobs), args.batch_size)]

    def raw_loop() -> tuple[int, float]:
        tokens, t0 = 0, time.perf_counter()
        for b, chunk in enumerate(batches):
            width = max(len(enc[i]) for i, _ in chunk)
            ids = torch.tensor([[tok.pad_token_id] * (width - len(enc[i])) + enc[i] for i, _ in chunk])
            mask = (ids != tok.pad_token_id).long()
            torch.manual_seed(params.seed * 1_000_003 + b * args.batch_size)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                     max_new_tokens=params.max_new_tokens, output_scores=True, return_dict_in_generate=True,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            new = out.sequences[:, width:]
            tokens += int((new != tok.pad_token_id).sum())
        return tokens, time.perf_counter() - t0

    def ours() -> tuple[int, float, list]:
        t0 = time.perf_counter()
        samples = backend.generate(prompts, params)
        return sum(len(s.token_ids) for ss in samples for s in ss), time.perf_counter() - t0, samples

    raw_loop()  # warm-up
    raw_t, our_t = [], []
    for _ in range(args.repeats):
        tokens_raw, t = raw_loop()
        raw_t.append(t)
        tokens_ours, t, samples = ours()
        our_t.append(t)
    raw_tps, our_tps = tokens_raw / min(raw_t), tokens_ours / min(our_t)

    t0 = time.perf_counter()
    rows = sample_rows(problems, samples, prompts, backend.policy_id, params.temperature)
    check_s = time.perf_counter() - t0
    to_table(rows[:1], "rollouts")  # pyarrow imports helpers on first use: once per process, not per shard
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        pq.write_table(to_table(rows, "rollouts"), Path(d) / "shard.parquet")
    write_s = time.perf_counter() - t0
    stage_s = min(our_t) + check_s + write_s

    print(f"prompts {len(prompts)} x {params.n} samples, batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    print(f"raw model.generate loop : {raw_tps:9.1f} tokens/s  ({tokens_raw} tokens, best of {args.repeats}: {min(raw_t):.2f}s)")
    print(f"rollout generation      : {our_tps:9.1f} tokens/s  ({tokens_ours} tokens, best of {args.repeats}: {min(our_t):.2f}s)")
    print(f"ratio generation / raw  : {our_tps / raw_tps:.3f}   (goal >= 0.9)")
    print(f"answer checking         : {check_s:.2f}s = {check_s / stage_s:.1%} of the stage")
    print(f"writing the shard       : {write_s:.2f}s = {write_s / stage_s:.1%} of the stage")
    print(f"checking + writing      : {(check_s + write_s) / stage_s:.1%} of the stage   (goal < 10%)")


if __name__ == "__main__":
    main()
