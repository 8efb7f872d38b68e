"""Benchmark: tokens/s of guidedrl's GRPO update step (KL off) over a bare torch
forward/backward loop on the same batches, in one run.

    python bench/update.py [--model data/models/tiny-policy] [--rows 256] [--batch-size 32] [--repeats 3]

Rows: a GRPO dataset of plain, hinted (guided) and explanation samples of the
tiny policy's chain sums (completion tokens sampled by the policy). Ours:
`tasks.stages.grpo.train_update` (batching, the three loss pieces, clipping, AdamW).
Baseline: the same batches pre-built as tensors, the π_old forward pass (no
gradients, a frozen copy of the starting weights: what `old_logprobs: recompute`,
the default, makes the update do), `model(...)`, log-softmax of the completion
tokens, a summed loss, backward, clip and AdamW — the least an update must do.
Prints completion tokens/s of each and the ratio (goal >= 0.8); then, on its own
line, what the π_old recompute costs (ours with `old_logprobs: sampler`, which
takes the sampler's log-probs instead).
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "data" / "models" / "tiny-policy"))
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import reasoning_gym
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.models.generation import SamplingParams
    from tasks.models.transformers_backend import TransformersBackend
    from tasks.models.prompts import chat, fill, load_template
    from tasks.stages.grpo import GRPOTrainConfig, completion_logps, make_batch, train_update

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model)
    backend = TransformersBackend(args.model, batch_size=256)
    data = reasoning_gym.create_dataset("chain_sum", size=args.rows // 8, seed=3, min_terms=2, max_terms=2, min_digits=1, max_digits=2)
    prompts = [chat(tok, fill(load_template("tiny_plain"), e["question"])) for e in data]
    samples = backend.generate(prompts, SamplingParams(n=8, temperature=1.0, max_new_tokens=48, seed=0))
    rng = random.Random(0)
    rows = []
    for p, group in zip(prompts, samples):
        for s in group:
            kind = rng.choice(["plain"] * 6 + ["hint", "explain"])
            rows.append({"loss_prompt": p, "completion_token_ids": s.token_ids, "behaviour_logprobs": s.logprobs,
                         "prompt_kind": kind, "is_guided": kind != "plain", "advantage": rng.uniform(-1, 1),
                         "token_advantages": None})
    tokens = sum(len(r["completion_token_ids"]) for r in rows)
    cfg = GRPOTrainConfig(learning_rate=1e-5, batch_size=args.batch_size, epochs=1, kl=0.0, seed=0)

    def ours(c=cfg) -> float:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        train_update(model, tok, rows, c)
        return time.perf_counter() - t0

    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    batches = [make_batch([rows[i] for i in order[j : j + args.batch_size]], tok) for j in range(0, len(rows), args.batch_size)]

    def bare() -> float:
        model = copy.deepcopy(base)
        model.train()
        old = copy.deepcopy(base).eval()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
        t0 = time.perf_counter()
        for b in batches:
            with torch.no_grad():
                completion_logps(old, b)  # π_old, as the update recomputes it
            logp = completion_logps(model, b)
            loss = -(logp * b.completion_mask).sum() / b.completion_mask.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    bare()  # warm-up
    ours()
    t_ours = min(ours() for _ in range(args.repeats))
    t_bare = min(bare() for _ in range(args.repeats))
    sampler = cfg.model_copy(update={"old_logprobs": "sampler"})
    t_sampler = min(ours(sampler) for _ in range(args.repeats))
    print(f"{len(rows)} samples, {tokens} completion tokens, batches of {args.batch_size}, best of {args.repeats}")
    print(f"bare forward/backward loop: {tokens / t_bare:,.0f} tokens/s ({t_bare:.2f}s)")
    print(f"guidedrl update (KL off):   {tokens / t_ours:,.0f} tokens/s ({t_ours:.2f}s)")
    print(f"ratio ours/bare: {t_bare / t_ours:.3f}  (goal >= 0.8; both with the π_old forward pass)")
    print(f"the π_old recompute (old_logprobs: recompute, the default) costs {t_ours - t_sampler:.2f}s of ours "
          f"({(t_ours - t_sampler) / t_ours:.0%}): ours with the sampler's log-probs {tokens / t_sampler:,.0f} tokens/s ({t_sampler:.2f}s)")


if __name__ == "__main__":
    main()
