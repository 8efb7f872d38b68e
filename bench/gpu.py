"""GPU checks (issue 14, part 6): rollout and update throughput, MFU and peak memory, and the
quickstart on a GPU with a from-scratch ~100M-parameter policy.

    python bench/gpu.py                        # on a GPU: all of it (about 10 minutes on one H100/H200)
    python bench/gpu.py --quick --device cpu   # the same code paths on tiny models (the test suite runs this)

1. rollouts — tokens/s of `TransformersBackend.generate` (bucketing, seeding, behaviour
   log-probs) against raw `model.generate` over the same left-padded batches, in the
   policy's dtype (bf16 on a GPU), per model size (random init: throughput does not
   depend on the weights).
2. update — tokens/s of `tasks.stages.grpo.train_update` (bf16 autocast, micro-batches,
   gradient checkpointing, fused AdamW on CUDA) at the 0.5B and 1.5B shapes of Qwen2.5
   (as Llama blocks: no qkv bias), MFU = 6 N tokens/s over the device's dense bf16 peak
   (FLOPs of recomputation not counted, as MFU is usually reported), and peak GPU memory.
3. quickstart — `guidedrl bootstrap --size 100m --device cuda` then the quickstart
   config with `policy.device: cuda` and that model (skipped with --quick or on CPU).

Writes bench/results/gpu-<date>-<device>.md (and prints it). Needs no network: every
model is built here, every tokenizer too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Llama-architecture shapes (Qwen2.5's dimensions; tied embeddings)
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, vocab_size=2048),
    "100m": dict(hidden_size=768, intermediate_size=2560, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                 vocab_size=32000),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 vocab_size=151936),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 vocab_size=151936),
}

#: dense bf16 peak FLOP/s by device name (vendor data sheets, without sparsity)
PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
             "L40S": 362e12, "A10": 125e12, "L4": 121e12, "RTX 4090": 165e12}


def peak_flops(name: str) -> float | None:
    for key, value in PEAK_BF16.items():
        if key.lower() in name.lower():
            return value
    return None


def word_tokenizer(vocab_size: int):
    """A tokenizer whose tokens are the words t0 .. t{vocab_size-1} (t0 pads, t1 ends)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t2"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", eos_token="t1", unk_token="t2")


def build(size: str, device: str, dtype, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**SHAPES[size], max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
                      bos_token_id=None)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model, sum(p.numel() for p in model.parameters())


def memory_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # this process's peak RSS so far


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_rollouts(size: str, device: str, dtype_name: str, prompts: int, n: int, max_new: int, batch_size: int) -> dict:
    import random

    import torch

    from tasks.models.generation import SamplingParams
    from tasks.models.transformers_backend import TransformersBackend

    dtype = getattr(torch, dtype_name)
    model, params = build(size, device, dtype)
    model.eval()
    tok = word_tokenizer(SHAPES[size]["vocab_size"])
    rng = random.Random(0)
    texts = [" ".join(f"t{rng.randrange(3, SHAPES[size]['vocab_size'])}" for _ in range(rng.randint(32, 256))) for _ in range(prompts)]
    backend = TransformersBackend.from_objects(model, tok, f"random-{size}", batch_size=batch_size)
    sp = SamplingParams(n=n, temperature=1.0, max_new_tokens=max_new, seed=0)
    backend.generate(texts[:2], SamplingParams(n=1, max_new_tokens=4))  # warm-up (kernels, allocator)
    memory_reset(device)
    sync(device)
    t0 = time.perf_counter()
    out = backend.generate(texts, sp)
    sync(device)
    ours_s = time.perf_counter() - t0
    ours_tokens = sum(len(s.token_ids) for ss in out for s in ss)

    # raw generate over the same batches: the same jobs, sorted by prompt length, left-padded
    encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    jobs = sorted(((i, j) for i in range(len(texts)) for j in range(n)), key=lambda ij: (len(encoded[ij[0]]), ij))
    sync(device)
    t0, raw_tokens = time.perf_counter(), 0
    for b in range(0, len(jobs), batch_size):
        chunk = jobs[b:b + batch_size]
        width = max(len(encoded[i]) for i, _ in chunk)
        ids = torch.tensor([[0] * (width - len(encoded[i])) + encoded[i] for i, _ in chunk], device=device)
        mask = (torch.arange(width, device=device)[None, :] >= torch.tensor([width - len(encoded[i]) for i, _ in chunk], device=device)[:, None]).long()
        with torch.no_grad():
            seq = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=None,
                                 max_new_tokens=max_new, pad_token_id=0, eos_token_id=1)
        new = seq[:, width:]
        ended = (new == 1).cumsum(-1)
        raw_tokens += int(((ended == 0) | ((ended == 1) & (new == 1))).sum())
    sync(device)
    raw_s = time.perf_counter() - t0
    return {"size": size, "parameters": params, "sequences": len(jobs), "batch_size": batch_size,
            "ours_tokens_per_s": ours_tokens / ours_s, "raw_tokens_per_s": raw_tokens / raw_s,
            "ratio": (ours_tokens / ours_s) / (raw_tokens / raw_s), "peak_memory_gb": peak_memory_gb(device)}


def bench_update(size: str, device: str, dtype_name: str, rows: int, prompt_len: int, completion_len: int, batch_size: int,
                 micro_batch_size: int, checkpointing: bool) -> dict:
    import random

    import torch

    from tasks.stages.grpo import GRPOTrainConfig, train_update

    memory_reset(device)
    model, params = build(size, device, torch.float32)  # float32 weights and optimizer state; bf16 autocast in the update
    tok = word_tokenizer(SHAPES[size]["vocab_size"])
    rng = random.Random(0)
    vocab = SHAPES[size]["vocab_size"]

    def row(k: int) -> dict:
        ids = [rng.randrange(3, vocab) for _ in range(completion_len)]
        return {"sample_id": f"s{k}", "loss_prompt": " ".join(f"t{rng.randrange(3, vocab)}" for _ in range(prompt_len)),
                "completion_token_ids": ids, "behaviour_logprobs": [-5.0] * len(ids), "loss_logprobs": None, "advantage": rng.uniform(-1, 1),
                "token_advantages": None, "prompt_kind": "plain", "is_guided": False, "temperature": 1.0}

    cuda = device.startswith("cuda")
    cfg = GRPOTrainConfig(learning_rate=1e-6, batch_size=batch_size, micro_batch_size=micro_batch_size,
                          gradient_checkpointing=checkpointing, optimizer="adamw_fused" if cuda else "adamw", kl=0.0, seed=0)
    train_update(model, tok, [row(-k - 1) for k in range(batch_size)], cfg, device=device, dtype=dtype_name)  # warm-up step
    data = [row(k) for k in range(rows)]
    sync(device)
    t0 = time.perf_counter()
    out = train_update(model, tok, data, cfg, device=device, dtype=dtype_name)
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = rows * (prompt_len + completion_len)
    result = {"size": size, "parameters": params, "steps": out["steps"], "rows": rows, "tokens_per_row": prompt_len + completion_len,
              "batch_size": batch_size, "micro_batch_size": micro_batch_size, "gradient_checkpointing": checkpointing,
              "tokens_per_s": tokens / seconds, "peak_memory_gb": peak_memory_gb(device)}
    if cuda:
        peak = peak_flops(torch.cuda.get_device_name(device))
        result["mfu"] = 6 * params * tokens / seconds / peak if peak else None
    del model
    return result


def quickstart_on_gpu(device: str, work: Path, size: str = "100m", steps: int | None = None) -> dict:
    """`guidedrl bootstrap --size 100m` on the GPU, then the quickstart config on it with policy.device."""
    guidedrl = [sys.executable, "-m", "flows.cli"]
    model = work / f"policy-{size}"
    env = {**os.environ, "GUIDEDRL_PROGRESS": "0"}
    t0 = time.perf_counter()
    boot = subprocess.run([*guidedrl, "bootstrap", "--size", size, "--device", device, "--out", str(model), "--eval-problems", "10",
                           "--eval-samples", "16", *(["--steps", str(steps)] if steps else [])], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    boot_s = time.perf_counter() - t0
    if boot.returncode:
        return {"ok": False, "step": "bootstrap", "tail": (boot.stdout + boot.stderr)[-1500:]}
    t0 = time.perf_counter()
    run = subprocess.run([*guidedrl, "run", "configs/quickstart.yaml", "--workspace", str(work / "ws"), "--set", f"policy.model={model}",
                          "--set", f"policy.device={device}"], cwd=ROOT, env=env, capture_output=True, text=True)
    info = json.loads((model / "bootstrap.json").read_text())
    return {"ok": run.returncode == 0, "step": "run", "bootstrap_seconds": round(boot_s, 1), "run_seconds": round(time.perf_counter() - t0, 1),
            "parameters": info.get("parameters"), "tail": (run.stdout + run.stderr)[-1500:]}


def report(device_name: str, args, rollouts: list[dict], updates: list[dict], quick: dict | None) -> str:
    lines = [f"# GPU checks — {device_name} — {dt.date.today().isoformat()}", "",
             f"`python bench/gpu.py {' '.join(sys.argv[1:])}` (torch {__import__('torch').__version__}, "
             f"transformers {__import__('transformers').__version__}); dtype {args.dtype}.", "",
             "## Rollouts: TransformersBackend.generate vs raw model.generate (same batches)", "",
             "| size | parameters | sequences | batch | ours tokens/s | raw tokens/s | ratio | peak memory (GB) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rollouts:
        lines.append(f"| {r['size']} | {r['parameters'] / 1e6:,.1f}M | {r['sequences']} | {r['batch_size']} | {r['ours_tokens_per_s']:,.0f} | "
                     f"{r['raw_tokens_per_s']:,.0f} | {r['ratio']:.2f} | {r['peak_memory_gb']:.1f} |")
    lines += ["", "## The GRPO update (train_update: bf16 autocast, micro-batches, checkpointing)", "",
              "| size | parameters | rows × tokens | batch / micro | checkpointing | tokens/s | MFU | peak memory (GB) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for u in updates:
        mfu = f"{u['mfu']:.1%}" if u.get("mfu") else "n/a"
        lines.append(f"| {u['size']} | {u['parameters'] / 1e6:,.1f}M | {u['rows']} × {u['tokens_per_row']} | {u['batch_size']} / "
                     f"{u['micro_batch_size']} | {u['gradient_checkpointing']} | {u['tokens_per_s']:,.0f} | {mfu} | {u['peak_memory_gb']:.1f} |")
    lines += ["", "MFU: 6 × parameters × tokens/s over the device's dense bf16 peak (recomputation not counted)."]
    if quick is not None:
        lines += ["", "## Quickstart with policy.device and a from-scratch 100M policy", "",
                  f"ok: {quick['ok']} (at {quick['step']}); bootstrap {quick.get('bootstrap_seconds')} s, run {quick.get('run_seconds')} s, "
                  f"{(quick.get('parameters') or 0) / 1e6:.0f}M parameters", "", "```", quick["tail"].strip(), "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--quick", action="store_true", help="tiny models and few rows: the code paths, not the speed")
    ap.add_argument("--rollout-sizes", default=None, help="comma-separated SHAPES (default: 100m,0.5b,1.5b; --quick: tiny)")
    ap.add_argument("--update-sizes", default=None, help="comma-separated SHAPES (default: 0.5b,1.5b; --quick: tiny)")
    ap.add_argument("--out", default=None, help="the results file (default: bench/results/gpu-<date>-<device>.md)")
    ap.add_argument("--no-quickstart", action="store_true", help="skip the quickstart on the GPU")
    args = ap.parse_args()

    import torch

    from tasks.models.policy import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    args.dtype = resolve_dtype("auto", device)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"
    q = args.quick
    rollout_sizes = (args.rollout_sizes or ("tiny" if q else "100m,0.5b,1.5b")).split(",")
    update_sizes = (args.update_sizes or ("tiny" if q else "0.5b,1.5b")).split(",")
    print(f"device: {name}; dtype {args.dtype}", flush=True)
    rollouts = []
    for size in rollout_sizes:
        rollouts.append(bench_rollouts(size, device, args.dtype, prompts=8 if q else 256, n=2 if q else 8, max_new=8 if q else 512,
                                       batch_size=8 if q else 256))
        print(json.dumps(rollouts[-1]), flush=True)
    updates = []
    for size in update_sizes:
        updates.append(bench_update(size, device, args.dtype, rows=8 if q else 256, prompt_len=16 if q else 256,
                                    completion_len=16 if q else 768, batch_size=4 if q else 64, micro_batch_size=2 if q else 8,
                                    checkpointing=True))
        print(json.dumps(updates[-1]), flush=True)
    quick = None
    if device.startswith("cuda") and not q and not args.no_quickstart:
        import tempfile

        with tempfile.TemporaryDirectory() as work:
            quick = quickstart_on_gpu(device, Path(work))
        print(json.dumps({k: v for k, v in quick.items() if k != "tail"}), flush=True)
    text = report(name, args, rollouts, updates, quick)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"gpu-{dt.date.today().isoformat()}-{slug}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
