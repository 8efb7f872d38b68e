"""The grpo update's loop: log π_θ of the completions, one batch's loss, a step's backward pass over its
micro-batches (π_old recomputed first when `old_logprobs: recompute`), the epochs of steps, and the
models it loads and saves (LoRA, the KL's reference, the π_old model)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tasks.core.faults import fault
from tasks.core import progress
from tasks.stages._grpo_data import (KIND_EXPLAIN, KIND_GUIDED, KIND_MASKED, KIND_PLAIN, Batch, GRPORows, batch_tokens, make_batch,
                                     micro_batches, minibatches, needs_sampler_logprobs, row_kind)
from tasks.stages._grpo_losses import LOSS_AGG, Totals, clipped_surrogate, expo_beta_at, expo_term, kl_k3, mismatch, rollout_weights, shaped_surrogate

log = logging.getLogger("guidedrl.grpo")


def completion_logps(model, batch: Batch, with_entropy: bool = False):
    """(B, T) log π_θ of each completion token under its loss prompt, at the row's temperature (logits / T);
    with ``with_entropy`` also the (B, T) entropy of π_θ at each position."""
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits
    logits = logits[:, batch.prompt_width - 1 : -1].float() / batch.temperature[:, None, None]
    targets = batch.input_ids[:, batch.prompt_width :]
    logprobs = torch.log_softmax(logits, -1)
    logp = logprobs.gather(-1, targets[..., None]).squeeze(-1)
    if not with_entropy:
        return logp
    return logp, -(logprobs.exp() * logprobs).sum(-1)


def update_loss(model, batch: Batch, cfg, ref_model=None, expo_beta: float | None = None, totals: Totals | None = None) -> torch.Tensor:
    """The loss of one batch: the sample rows' surrogate (+ KL) aggregated by `loss_agg`,
    plus ExPO's term over the explanation rows (see module doc). With ``totals`` (the whole
    step's normalisers) ``batch`` is a part of the step and this is its share of the step's loss.
    ``ref_model`` may be a callable giving the reference log-probs of a batch (LoRA: the
    policy with its adapters off)."""
    if cfg.entropy > 0:
        logp, entropy = completion_logps(model, batch, with_entropy=True)
    else:
        logp, entropy = completion_logps(model, batch), None
    mask = batch.completion_mask
    kind = batch.kind[:, None]
    plain = clipped_surrogate(logp, batch.behaviour, batch.advantages, cfg.clip_low, cfg.clip_high)
    guided = shaped_surrogate(logp, batch.behaviour, batch.advantages, cfg.gamma)
    per_token = torch.where(kind == KIND_PLAIN, plain, torch.where(kind == KIND_GUIDED, guided, torch.zeros_like(logp)))
    if cfg.kl > 0 and ref_model is not None:
        with torch.no_grad():
            ref = ref_model(batch) if callable(ref_model) and not isinstance(ref_model, torch.nn.Module) else completion_logps(ref_model, batch)
        per_token = per_token + cfg.kl * kl_k3(logp, ref)
    if entropy is not None:  # the bonus: higher entropy, lower loss
        per_token = per_token - cfg.entropy * entropy
    samples = mask * ((kind == KIND_PLAIN) | (kind == KIND_GUIDED)).float()
    correction = cfg.rollout_correction
    if correction != "none" and batch.sampler_known is not None:  # the training–inference mismatch (π_old recomputed)
        weight, keep = rollout_weights(batch.behaviour, batch.sampler, batch.sampler_known, correction, cfg.rollout_is_threshold)
        per_token, samples = per_token * weight, samples * keep
    explanations = mask * (kind == KIND_EXPLAIN).float()
    beta = cfg.expo_beta if expo_beta is None else expo_beta
    return (LOSS_AGG[cfg.loss_agg](per_token, samples, cfg.loss_scale_factor, totals=totals)
            + expo_term(logp, explanations, beta, totals=totals, form=cfg.expo_nll))



def recompute_old(old_model, tokenizer, rows: list[dict], cfg, device: str, dtype: str, stats: dict | None = None) -> None:
    """π_old as verl computes it (`old_logprobs: recompute`): a forward pass of the sampling checkpoint
    (``old_model``) over prompt + completion at each row's sampling temperature, set as the row's
    ``old_logprobs`` (once per row: a row that has them keeps them). Plain sample rows only: a guided row's
    behaviour is under the hinted prompt, which the hint stage scored. Where the sampler's log-probs are
    known, the mismatch goes into ``stats`` (``mismatch``) and, for `token-mask`, the row's tokens left out
    (``masked_tokens``) so the step's normalisers leave them out too."""
    todo = [r for r in rows if "old_logprobs" not in r and row_kind(r, False) == KIND_PLAIN]
    correction, cap = cfg.rollout_correction, cfg.rollout_is_threshold
    chunks = micro_batches(todo, tokenizer, cfg)
    while chunks:
        chunk = chunks.pop(0)
        batch = make_batch(chunk, tokenizer, device, needs_behaviour=False)
        try:
            with torch.no_grad(), torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                old = completion_logps(old_model, batch).float()
        except torch.OutOfMemoryError as exc:  # no gradient here: halves give the same numbers
            if len(chunk) == 1:
                raise out_of_memory("π_old", chunk) from exc
            del batch
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
            chunks[:0] = [chunk[:len(chunk) // 2], chunk[len(chunk) // 2:]]
            continue
        sampler = batch.behaviour.float()  # the sampler's own numbers (0 where it gave none)
        known = torch.zeros_like(old)
        for i, r in enumerate(chunk):
            n = len(r["completion_token_ids"])
            r["old_logprobs"] = old[i, :n].cpu().numpy().astype(np.float32)
            b = r.get("behaviour_logprobs")
            if b is not None and len(b) == n:
                known[i, :n] = 1.0
        if stats is not None:
            for k, v in mismatch(old, sampler, known, cap, correction).items():
                stats[k] = max(stats.get(k, 0.0), v) if k == "abs_max" else stats.get(k, 0) + v
        if correction == "token-mask":
            _, keep = rollout_weights(old, sampler, known, correction, cap)
            for i, r in enumerate(chunk):
                r["masked_tokens"] = int(len(r["completion_token_ids"]) - keep[i, :len(r["completion_token_ids"])].sum())


def mismatch_summary(stats: dict) -> dict:
    """The grpo summary's sampler–trainer mismatch: mean and max |Δ log p| over the tokens whose sampler log-prob
    is known, and the share of them the cap touched."""
    n = stats.get("tokens", 0)
    return {"tokens": int(n), "mean_abs_logp_diff": round(stats["abs_sum"] / n, 6) if n else None,
            "max_abs_logp_diff": round(stats["abs_max"], 6) if n else None, "capped_share": round(stats["capped"] / n, 6) if n else None}


def make_optimizer(model, cfg):
    """The configured optimizer over the trainable parameters (LoRA: the adapters only)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate)
    kwargs = {"lr": cfg.learning_rate, "weight_decay": 0.0, "betas": (0.9, 0.99)}
    if cfg.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("grpo: train.grpo.optimizer adamw_8bit needs bitsandbytes (pip install bitsandbytes, on a GPU "
                             "machine); or use adamw / adamw_fused") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, fused=cfg.optimizer == "adamw_fused" or None, **kwargs)


def step_backward(model, tokenizer, rows: list[dict], cfg, ref_model, expo_beta: float, device: str, dtype: str,
                  totals: Totals | None = None, scale: float = 1.0, backward: Callable | None = None,
                  no_sync: Callable | None = None, parts: int = 0, pad_row: dict | None = None, old_model=None,
                  stats: dict | None = None) -> float:
    """Backward of one update step's loss over ``rows`` in micro-batches of `micro_batch_size`
    (gradients accumulate; each part is normalised by the whole step's ``totals``, so the
    gradient is that of the step taken at once); returns the loss. ``totals``/``scale``: the
    normalisers and weight of a larger step this is a share of (a data-parallel rank's);
    ``backward``/``no_sync``: the engine's (accelerate's), no gradient sync before the last part;
    ``parts``/``pad_row``: at least this many forward/backward passes, the missing ones on
    ``pad_row`` with weight 0 (every rank of a sharded engine must run as many as the others);
    ``old_model``: the sampling checkpoint, whose log-probs become π_old first (``recompute_old``;
    the sampler–trainer mismatch is added to ``stats``)."""
    import contextlib

    needs_behaviour = needs_sampler_logprobs(cfg)
    if old_model is not None:
        recompute_old(old_model, tokenizer, rows, cfg, device, dtype, stats)
    totals = totals or Totals.of_rows(rows, needs_behaviour)
    chunks = [(chunk, scale) for chunk in micro_batches(rows, tokenizer, cfg)]
    chunks += [([pad_row], 0.0)] * (parts - len(chunks))
    alone = no_sync is None and not parts  # one process: a micro-batch may be split without the other ranks knowing
    loss, k = 0.0, 0
    while k < len(chunks):
        chunk, weight = chunks[k]
        batch = make_batch(chunk, tokenizer, device, needs_behaviour)
        with no_sync() if no_sync and k < len(chunks) - 1 else contextlib.nullcontext():
            try:
                with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                    part = update_loss(model, batch, cfg, ref_model, expo_beta, totals=totals) * weight
            except torch.OutOfMemoryError as exc:  # in the forward pass: no gradient touched yet, the halves give the same sum
                if not alone or len(chunk) == 1:
                    raise out_of_memory("forward", chunk) from exc
                del batch
                if torch.device(device).type == "cuda":
                    torch.cuda.empty_cache()
                half = len(chunk) // 2
                log.warning("grpo: out of device memory in the forward pass of %d rows (%d tokens padded); retrying as %d + %d "
                            "(train.grpo.micro_batch_size / micro_batch_tokens lower avoid it)", len(chunk),
                            int(batch_tokens(chunk, tokenizer)), half, len(chunk) - half)
                chunks[k:k + 1] = [(chunk[:half], weight), (chunk[half:], weight)]
                continue
            try:
                (backward or torch.Tensor.backward)(part)
            except torch.OutOfMemoryError as exc:  # gradients partly accumulated: no retry can take the same step
                raise out_of_memory("backward", chunk) from exc
        loss += float(part.detach())
        k += 1
    return loss


def out_of_memory(where: str, chunk: list[dict]) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(f"grpo: out of device memory in the {where} pass of {len(chunk)} rows; lower "
                                  "train.grpo.micro_batch_size or micro_batch_tokens, or set gradient_checkpointing: true")



def old_policy(model, cfg):
    """The sampling checkpoint π_old is recomputed with (`old_logprobs: recompute`): a frozen copy of the policy
    as the update starts (one more copy of the weights, no gradients or optimizer state); None for `sampler`."""
    import copy

    if cfg.old_logprobs != "recompute":
        return None
    old = copy.deepcopy(model).eval()
    for p in old.parameters():
        p.requires_grad_(False)
    return old


def train_update(model, tokenizer, rows: list[dict] | GRPORows, cfg, ref_model=None, device: str = "cpu", dtype: str = "float32") -> dict:
    """`cfg.epochs` passes over the rows in shuffled minibatches (``minibatches``); AdamW (or SGD).
    With ``dtype`` bfloat16 the forward passes run under bfloat16 autocast; weights and optimizer stay float32.
    With `old_logprobs: recompute` π_old is the starting policy's forward pass (``recompute_old``)."""
    needs_behaviour = needs_sampler_logprobs(cfg)
    if isinstance(rows, list):  # recomputed π_old is kept on the rows for later epochs: never on the caller's dicts
        rows = [dict(r) for r in rows]
    total, batches = minibatches(rows, cfg.batch_size, cfg.epochs, cfg.seed, needs_behaviour)
    if not total:
        return {"steps": 0, "rows": 0, "losses": []}
    n = len(rows) if isinstance(rows, GRPORows) else sum(row_kind(r, needs_behaviour) != KIND_MASKED for r in rows)
    old_model, stats = old_policy(model, cfg), {}
    opt = make_optimizer(model, cfg)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()  # transformers 5's name for gradient checkpointing
        if getattr(cfg, "lora", False):  # frozen embeddings: the checkpointed blocks need inputs that carry a gradient
            model.enable_input_require_grads()
    model.train()
    losses, steps = [], 0
    for step, rows_of_step in enumerate(progress.track(batches, f"grpo: updating on {n} samples", total=total)):
        loss = step_backward(model, tokenizer, rows_of_step, cfg, ref_model, expo_beta_at(cfg, step, total), device, dtype,
                             old_model=old_model, stats=stats)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss)
        steps += 1
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_disable()
    model.eval()
    out = {"steps": steps, "rows": n, "first_loss": losses[0], "last_loss": losses[-1], "mean_loss": sum(losses) / len(losses),
           "old_logprobs": cfg.old_logprobs}
    if old_model is not None:
        out["mismatch"] = mismatch_summary(stats)
    return out



def with_lora(model, cfg):
    """The model with LoRA adapters (peft) on every linear layer; only they are trained."""
    from peft import get_peft_model

    from tasks.stages._lora import lora_config

    return get_peft_model(model, lora_config(cfg))


def adapters_off(model) -> Callable:
    """The KL's reference log-probs from a LoRA model with its adapters switched off: the base
    policy without a second copy of it in memory."""
    def ref(batch):
        with model.disable_adapter():
            return completion_logps(model, batch)
    return ref



def lora_base(adapter) -> Path:
    """The base model a LoRA adapter was trained on (its adapter_config.json)."""
    cfg_file = Path(adapter) / "adapter_config.json"
    if not cfg_file.is_file():
        raise ValueError(f"train.grpo.lora_adapter: {adapter} is not a LoRA adapter directory (no adapter_config.json)")
    base = Path(json.loads(cfg_file.read_text()).get("base_model_name_or_path") or "")
    if not (base / "config.json").is_file():
        raise ValueError(f"train.grpo.lora_adapter: {cfg_file} names base model {str(base)!r}, which is not a local model directory")
    return base


def load_for_update(base, reference, cfg, device: str):
    """(tokenizer, policy, reference) for the update: LoRA adapters when `lora`; a reference only
    when `kl > 0` — the policy with adapters off when it is the policy being trained, else loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    ref = None
    if cfg.lora and cfg.lora_adapter:  # the same adapter, on the base it was trained for
        from peft import PeftModel

        base = lora_base(cfg.lora_adapter)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)).to(device), str(cfg.lora_adapter),
                                          is_trainable=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(base)).to(device)
        if cfg.lora:
            model = with_lora(model, cfg)
    if cfg.lora and cfg.kl > 0 and Path(reference).resolve() == Path(base).resolve():
        ref = adapters_off(model)
    if cfg.kl > 0 and ref is None:  # memory for a reference model only when the KL needs one
        ref = AutoModelForCausalLM.from_pretrained(str(reference)).to(device).eval()
    return tokenizer, model, ref


def save_checkpoint(model, tokenizer, out, cfg, state_dict=None) -> None:
    """The trained policy as a transformers checkpoint; with LoRA the adapter alone in ``out/adapter``
    (for a server that loads LoRA adapters) and the merged model in ``out``."""
    if cfg.lora:
        model.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
        state_dict = None
    model.save_pretrained(out, state_dict=state_dict)
    fault("checkpoint.save", "grpo")
    tokenizer.save_pretrained(out)

