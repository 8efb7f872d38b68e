"""The tiny policy: a character tokenizer and a small Llama trained from scratch on CPU.

It stands in for a real reasoning model in the quickstart and the tests. It is
trained on step-by-step chain sums (partial sums written out, final answer in
``\\boxed{}``) from reasoning-gym: the easy level (sums and differences of two
digits) almost always, the hard level (of two 2-digit numbers) rarely — a latent
ability that plain sampling seldom finds. Answer-given (explain) examples are
of the hard level half the time, so that the policy explains a shown answer
far more readily than it finds it, as ExPO assumes of real models. The hint
format of LTE is in the training mix too, so the later stages have a policy
that follows both.

Everything a run depends on is in ``TinyPolicyConfig``; the same config and seed
reproduce the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tasks.core.store import swap_in
from tasks.models.answers import chain_sum_reference
from tasks.models.prompts import chat, fill, hint_text, load_template
from tasks.models.tiny_tokenizers import build_tokenizer, taught_completion
from tasks.models.token_text import prompt_ids, suffix_ids
from tasks.core import progress

log = logging.getLogger("guidedrl.policy")



@dataclass
class TinyPolicyConfig:
    seed: int = 0
    # the tokenizer (tasks/models/tiny_tokenizers.py: char | gpt2-bpe | spm)
    tokenizer: str = "char"
    # model
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 384
    # data: reasoning-gym chain_sum levels
    easy: dict = field(default_factory=lambda: {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1})
    hard: dict = field(default_factory=lambda: {"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2})
    hard_fraction: float = 0.003  # how rarely the hard level is seen in plain and hint examples
    # how often explain (answer-given) examples are of the hard level: the policy
    # learns to reach an answer it is shown far more readily than to find it
    explain_hard_fraction: float = 0.5
    format_mix: dict = field(default_factory=lambda: {"plain": 0.7, "explain": 0.15, "hint": 0.15})
    templates: dict = field(default_factory=lambda: {"plain": "tiny_plain", "explain": "tiny_explain", "hint": "tiny_hint"})
    # the longest completion the family needs (rollouts and the bootstrap's pass@k use it)
    max_new_tokens: int = 48
    # training
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01


#: task families of the tiny policy, by name: overrides of TinyPolicyConfig's defaults (`guidedrl bootstrap --family`).
#: chain2 (the quickstart's policy, data/models/tiny-policy): easy = a digit plus or minus a digit, hard = the same with two-digit
#: numbers — one written step, which is also the answer, so a process judge has nothing to give partial credit for.
#: chain6 (the learning study's policy, data/models/tiny-chain6): easy = chains of 2-5 digits, hard = chains of 6 digits — five
#: partial sums per solution, each of the kind the easy level practises: the hard level is one term longer than anything
#: seen often (composition), not new arithmetic; wrong traces usually get some steps right, so process grades differ from the
#: outcome. With easy chains of at most 4 terms (the first chain6) the policy reached right 6-term answers only by guessing
#: (0 of its right answers stated the partial sums); with at most 5 it copies the six terms and gets the first four partial sums
#: right but stops one step early — and, shown the answer, writes the fifth and derives the chain 63% of the time (bootstrap.json).
FAMILIES: dict[str, dict] = {
    "chain2": {},
    "chain6": {
        "easy": {"min_terms": 2, "max_terms": 5, "min_digits": 1, "max_digits": 1},
        "hard": {"min_terms": 6, "max_terms": 6, "min_digits": 1, "max_digits": 1},
        "hard_fraction": 0.002,
        "max_new_tokens": 128,
    },
}


#: model sizes of the bootstrap (`guidedrl bootstrap --size`): tiny is the CPU quickstart's; 100m a from-scratch
#: ~100M-parameter model of the same family, for a GPU (12 layers of 768, ~99M parameters)
SIZES: dict[str, dict] = {
    "tiny": {},
    "100m": {"hidden_size": 768, "intermediate_size": 2560, "num_layers": 12, "num_heads": 12, "max_positions": 512,
             "lr": 6e-4, "warmup_steps": 100},
}


#: per tokenizer (`guidedrl bootstrap --tokenizer`): the checkpoint's directory under data/models/ and what the tiny size
#: changes. GPT-2's 50,257-token output layer is most of a model of this size: a narrower model keeps it cheap.
TOKENIZER_MODELS: dict[str, dict] = {
    "char": {"dir": "tiny-policy", "tiny": {}},
    "gpt2-bpe": {"dir": "tiny-gpt2bpe", "tiny": {"hidden_size": 64, "intermediate_size": 256}},
    "spm": {"dir": "tiny-spm", "tiny": {}},
}


def family_config(family: str, **overrides) -> TinyPolicyConfig:
    """The TinyPolicyConfig of a task family (FAMILIES), with ``overrides`` on top."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny-policy family {family!r}; families: {', '.join(FAMILIES)}")
    return TinyPolicyConfig(**{**FAMILIES[family], **overrides})


def tokenizer_corpus(cfg: TinyPolicyConfig, n: int = 4000) -> list[str]:
    """What the ``spm`` tokenizer is trained on: the training examples' prompts and completions (chain sums of both
    levels, the three prompt formats) and the Unicode problems of data/problems/unicode_math.jsonl."""
    stream = _examples(cfg, None, random.Random(cfg.seed + 1))
    texts = [t for _ in range(n) for t in next(stream)]
    unicode = Path(__file__).resolve().parents[2] / "data" / "problems" / "unicode_math.jsonl"
    if unicode.is_file():
        for line in unicode.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts += [row["question"], row.get("reference_solution") or row["answer"]]
    return texts


def build_model(cfg: TinyPolicyConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stops if len(stops := [tokenizer.eos_token_id] + extra_stops(tokenizer)) > 1 else stops[0],
        bos_token_id=tokenizer.bos_token_id,
    )
    return LlamaForCausalLM(config)


def extra_stops(tokenizer) -> list[int]:
    """Stop ids beyond the eos: GPT-2's ``<|endoftext|>`` where the chat template ends turns with ``<|im_end|>``."""
    return [i for i in [tokenizer.convert_tokens_to_ids("<|endoftext|>")] if i not in (None, tokenizer.unk_token_id, tokenizer.eos_token_id)]


def solution_text(expression: str) -> str:
    """The completion the tiny policy learns: partial sums, then the boxed answer."""
    lines = chain_sum_reference(expression).splitlines()
    answer = lines[-1].removeprefix("The answer is ").rstrip(".")
    return "\n".join(lines[:-1] + [f"\\boxed{{{answer}}}"])


def _examples(cfg: TinyPolicyConfig, tokenizer, rng: random.Random):
    """An endless stream of (prompt, completion) training pairs."""
    import reasoning_gym

    templates = {k: load_template(v) for k, v in cfg.templates.items()}
    gens = {
        level: reasoning_gym.create_dataset("chain_sum", size=100_000, seed=10_000 + cfg.seed * 7 + i, **conf)
        for i, (level, conf) in enumerate((("easy", cfg.easy), ("hard", cfg.hard)))
    }
    kinds, weights = zip(*cfg.format_mix.items())
    counters = {"easy": 0, "hard": 0}
    while True:
        kind = rng.choices(kinds, weights)[0]
        fraction = cfg.explain_hard_fraction if kind == "explain" else cfg.hard_fraction
        level = "hard" if rng.random() < fraction else "easy"
        entry = gens[level][counters[level] % 100_000]
        counters[level] += 1
        expr, answer = entry["metadata"]["expression"], entry["answer"]
        if kind == "plain":
            user = fill(templates["plain"], entry["question"])
        elif kind == "explain":
            user = fill(templates["explain"], entry["question"], answer=answer)
        else:
            wrong = sorted({str(int(answer) + d) for d in rng.sample([-10, -2, -1, 1, 2, 10, 11], rng.randint(1, 3))})
            user = fill(templates["hint"], entry["question"], hint=hint_text(wrong, rng.random() < 0.3))
        if tokenizer is None:  # the spm tokenizer's corpus: the texts, before any chat template
            yield user, taught_completion(cfg.tokenizer, solution_text(expr))
        else:
            yield chat(tokenizer, user), taught_completion(cfg.tokenizer, solution_text(expr)) + tokenizer.eos_token


def _batch(pairs, tokenizer):
    ids, labels = [], []
    for prompt, completion in pairs:
        # the completion's ids as they follow the prompt, as the policy will sample them (a SentencePiece completion's
        # first word carries its ``▁`` only in context)
        p, c = prompt_ids(tokenizer, prompt), suffix_ids(tokenizer, prompt, completion)
        ids.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    label_t = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
    attn = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    return input_ids, attn, label_t


def completion_loss(model, input_ids, attn, labels):
    """The mean next-token cross-entropy over the completion tokens (``labels`` not -100), with the output layer
    applied only where a label is: with GPT-2's 50,257-token vocabulary the logits of every prompt position would
    be most of a step's cost. Equal to ``model(..., labels=labels).loss``."""
    hidden = model.model(input_ids=input_ids, attention_mask=attn).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    logits = model.lm_head(hidden[keep]).float()
    return torch.nn.functional.cross_entropy(logits, target[keep])


def train_tiny_policy(cfg: TinyPolicyConfig, out_dir: Path, device: str = "cpu") -> dict:
    """Build and train the tiny policy (on ``device``; bfloat16 autocast on a GPU); save model + tokenizer to ``out_dir``."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tokenizer = build_tokenizer(cfg.tokenizer, tokenizer_corpus(cfg) if cfg.tokenizer == "spm" else None)
    model = build_model(cfg, tokenizer).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
    n_params = sum(p.numel() for p in model.parameters())
    log.info("tiny policy: %.2fM parameters, %d steps of batch %d", n_params / 1e6, cfg.steps, cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / cfg.warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))),
    )
    stream = _examples(cfg, tokenizer, rng)
    model.train()
    start, losses = time.time(), []
    for step in progress.track(range(cfg.steps), "bootstrap: training the tiny policy"):
        input_ids, attn, labels = (t.to(device) for t in _batch([next(stream) for _ in range(cfg.batch_size)], tokenizer))
        with autocast:
            loss = completion_loss(model, input_ids, attn, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            log.info("step %d/%d loss %.4f (%.0fs)", step + 1, cfg.steps, sum(losses[-100:]) / 100, time.time() - start)
    model.eval().to("cpu")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")  # a killed run leaves no half checkpoint
    # a server that samples with the model's own generation config (`transformers serve`) samples as the in-process
    # backend does: from the whole distribution (no top-k), at the request's temperature
    model.generation_config.do_sample, model.generation_config.top_k = True, 0
    model.generation_config.eos_token_id = model.config.eos_token_id  # a list where the template has two stops
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = {"config": asdict(cfg), "parameters": n_params, "final_loss": sum(losses[-50:]) / min(50, len(losses)),
            "train_seconds": round(time.time() - start, 1)}
    (tmp / "bootstrap.json").write_text(json.dumps(info, indent=2) + "\n")
    swap_in(tmp, out_dir)
    return info


def evaluate_policy(backend, levels: dict[str, dict], problems_per_level: int = 40, n: int = 64, seed: int = 777,
                    temperature: float = 1.0, max_new_tokens: int = 48, template: str = "tiny_plain") -> dict:
    """pass@k by level of a policy on fresh chain sums (seeds unseen in training).

    Also measures, on each level, how often the answer-conditioned (explain)
    prompt ends with the right answer: ExPO's premise is that this is easier
    than solving. ``{kind}_with_derivation`` counts a right answer only when
    the sample also states every partial sum of the reference solution (the
    rule judge's checkpoints, as ``eval.check_derivation``): a lucky guess or a
    copied answer does not count.
    """
    import reasoning_gym

    from tasks.models.answers import check
    from tasks.models.generation import SamplingParams
    from tasks.models.judge import RuleJudge, derivation_right
    from tasks.core.metrics import pass_table

    judge = RuleJudge("outcome")
    report = {}
    for kind, tmpl in (("plain", template), ("explain", template.replace("plain", "explain"))):
        t = load_template(tmpl)
        groups, derived = {}, {}
        for li, (level, conf) in enumerate(levels.items()):
            data = reasoning_gym.create_dataset("chain_sum", size=problems_per_level, seed=seed + li, **conf)
            entries = [data[i] for i in range(len(data))]
            problems = [{"problem_id": f"{level}-{i}", "answer": e["answer"], "question": e["question"],
                         "reference_solution": chain_sum_reference(e["metadata"]["expression"]),
                         "metadata": json.dumps({"reasoning_gym": {"task": "chain_sum", "entry": e}})} for i, e in enumerate(entries)]
            prompts = [chat(backend.tokenizer, fill(t, e["question"], answer=e["answer"])) for e in entries]
            k = n if kind == "plain" else min(n, 8)
            out = backend.generate(prompts, SamplingParams(n=k, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed))
            for p, samples in zip(problems, out):
                verdicts = [check(s.text, p)[1] for s in samples]
                groups[p["problem_id"]] = (level, verdicts)
                derived[p["problem_id"]] = (level, [derivation_right(judge, p, s.text, ok) for s, ok in zip(samples, verdicts)])
        report[kind] = {lvl: v for lvl, v in pass_table(groups).items() if lvl != "all"}
        report[f"{kind}_with_derivation"] = {lvl: v for lvl, v in pass_table(derived).items() if lvl != "all"}
    return report
