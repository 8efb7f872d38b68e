"""Stage `grpo`: the policy update over a materialised `grpo` dataset.

Written here rather than taken from TRL's GRPOTrainer because the update must
train on *given*, partly off-policy samples: LTE's hinted samples (sampled
under another prompt, trained under the original one with a shaped ratio),
ExPO's explanations (an NLL term, no advantage), ExpRL's per-token advantages
and masked traces. GRPOTrainer samples its own completions and has none of
these corrections. On a plain on-policy group the two agree (tests/test_grpo.py
checks one SGD step of each against the other).

Loss pieces, each a small pure function over per-token tensors (B, T) with a
completion mask; log π_θ is computed at each row's sampling `temperature`
(logits / T, as verl does), so that before the first step the ratio of every
token is exactly 1:

- plain samples: the clipped GRPO surrogate on the token ratio
  r = π_θ / π_behaviour, −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A);
- LTE's guided samples: r = π_θ(token | original prompt) / π_behaviour(token |
  hinted prompt), shaped f(r) = r / (r + γ), unclipped: −f(r)·A;
- ExpRL: `token_advantages` replace the broadcast sequence advantage;
- optional KL to the reference policy (k3 estimator), weight `kl`, and an
  entropy bonus, weight `entropy` (LTE's dagger variant), on the samples;
- rows with a null advantage (a grade that did not parse) are masked out.

The sample rows' token losses are aggregated by `loss_agg` (verl's names:
token-mean, seq-mean-token-mean, seq-mean-token-sum-norm). ExPO's explanation
rows add their own term, β · mean over the batch's explanation rows of
−(1/|e|) Σ log π_θ(e_t | original prompt) at temperature 1: its weight does not
depend on the group size nor on how many sample rows share the batch.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Literal

import numpy as np
import torch
from pydantic import Field

from tasks.core.config import StrictModel
from tasks.core.faults import fault
from tasks.core.schemas import kind_counts, trainable
from tasks.core.stage import Job, Stage
from tasks.core.store import StageOutput, data_files, iter_batches
from tasks.models.policy import check_policy, local_policy_dir, policy_id_for, precision, precision_settings
from tasks.report import progress
from tasks.stages._launch import DistributedConfig, launch

if TYPE_CHECKING:
    from tasks.registry import Config


class GRPOTrainConfig(StrictModel):
    """The policy update over a `grpo` dataset, and the online rounds."""

    rounds: int = Field(1, gt=0, description="online rounds of rollouts -> guidance -> grading -> materialize -> update -> eval")
    learning_rate: float = Field(1e-6, gt=0)
    optimizer: Literal["adamw", "adamw_fused", "adamw_8bit", "sgd"] = Field(
        "adamw", description="adamw (torch), adamw_fused (torch's fused kernel, CUDA and recent CPUs), adamw_8bit "
        "(bitsandbytes' 8-bit AdamW: optimizer state in 8 bits; needs `pip install bitsandbytes` and a GPU), sgd")
    epochs: int = Field(1, gt=0, description="passes over each round's grpo dataset")
    batch_size: int = Field(16, gt=0, description="samples per update step")
    micro_batch_size: int | None = Field(
        None, gt=0, description="samples per forward/backward pass; the step's gradient is accumulated over its micro-batches "
        "and equals the one of the whole batch (every loss normaliser is the whole batch's); default: the whole batch at once")
    micro_batch_tokens: int | None = Field(
        None, gt=0, description="memory-aware micro-batches: at most this many padded tokens (rows x (longest prompt + longest "
        "completion)) per forward/backward pass, under micro_batch_size; a row longer than this goes alone. The step's gradient "
        "is unchanged (every normaliser is the step's). In one process, a micro-batch whose forward pass runs out of device "
        "memory is retried in halves, with a warning")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass (less memory, ~30% more time)")
    lora: bool = Field(False, description="train LoRA adapters (peft) on every linear layer and merge them into the saved "
                       "checkpoint (the adapter is saved beside it, in checkpoint/adapter/); with kl > 0 the reference is the "
                       "same model with its adapters switched off, when it is the policy being trained")
    lora_r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    lora_adapter: str | None = Field(
        None, description="continue this LoRA adapter (a previous round's checkpoint/adapter) on its own base model "
        "(base_model_name_or_path in its adapter_config.json) instead of adding a new adapter to policy.checkpoint: the saved "
        "adapter stays relative to the base a server holds (`guidedrl online` sets it with policy.serve.follow: lora)")
    distributed: DistributedConfig | None = Field(
        None, description="run the update as several processes on an existing engine (tasks/stages/_grpo_distributed.py): "
        "accelerate launch with a config from infra/accelerate/ (DDP, FSDP2, DeepSpeed ZeRO), or torchrun (DDP; gloo on CPU); "
        "default: in this process")
    clip_low: float = Field(0.2, ge=0, description="epsilon below 1 of the clipped ratio (PPO/GRPO 0.2; ExpRL 0.2)")
    clip_high: float = Field(0.28, ge=0, description="epsilon above 1, clip-higher (DAPO 0.28; ExpRL 0.28)")
    gamma: float = Field(0.1, gt=0, description="LTE's policy shaping f(r) = r / (r + gamma) on guided samples (LUFFY 0.1)")
    expo_beta: float = Field(0.04, ge=0, description="ExPO's weight of the explanation NLL term (ExPO 0.04; 0.5 was worse than GRPO)")
    expo_beta_schedule: Literal["constant", "linear"] = Field(
        "constant", description="constant: beta on every step; linear: beta decays linearly to 0 over the stage's update steps")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = Field(
        "token-mean", description="how token losses of the sample rows become one number (verl's loss_agg_mode): token-mean "
        "(verl's default, DAPO), seq-mean-token-mean (GRPO paper, TRL's loss_type=grpo), seq-mean-token-sum-norm (Dr. GRPO)")
    loss_scale_factor: int | None = Field(
        None, gt=0, description="seq-mean-token-sum-norm: the constant each sequence's token sum is divided by "
        "(Dr. GRPO: the generation budget); default: the batch's longest completion, as verl does")
    entropy: float = Field(0.0, ge=0, description="weight of an entropy bonus on the sample rows' tokens (LTE's dagger variant; 0: off)")
    kl: float = Field(0.0, ge=0, description="weight of the k3 KL to the reference policy (0: off, no reference loaded; ExpRL 0.001)")
    kl_reference: Literal["initial", "round"] = Field(
        "initial", description="initial: the policy the run started from (pi_0, as the papers); round: the round's starting policy")
    reference_model: str | None = Field(
        None, description="the initial policy's checkpoint for kl_reference: initial (guidedrl online sets it; default: policy.model)")
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    shuffle_buffer: int = Field(
        4096, gt=0, description="rows held to shuffle the grpo dataset as it streams from its Parquet files; a dataset of at most "
        "this many trainable rows is shuffled whole (bounds the update's data memory: ~36 bytes a token as Python lists)")


STAGE = Stage(name="grpo", version="2", module=__name__, upstream=("materialize",), directories=("checkpoint",),
              section="train.grpo", settings_model=GRPOTrainConfig, online=True)

log = logging.getLogger("guidedrl.grpo")


# --------------------------------------------------------------------------- loss pieces


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    """Per-token PPO/GRPO clipped surrogate loss, −min(r·A, clip(r)·A)."""
    ratio = torch.exp(logp - old_logp)
    return -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)


def shaped_surrogate(logp: torch.Tensor, behaviour_logp: torch.Tensor, adv: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-token LTE/LUFFY policy-shaping loss, −f(r)·A with f(r) = r/(r+γ), unclipped."""
    ratio = torch.exp(logp - behaviour_logp)
    return -(ratio / (ratio + gamma)) * adv


def nll(logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token ExPO term: −β · log π_θ(token | original prompt)."""
    return -beta * logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π_θ ‖ π_ref) estimate, exp(ref − logp) − (ref − logp) − 1."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


#: loss aggregations by verl's `loss_agg_mode` name: (per-token loss (B, T), mask (B, T), scale) -> scalar
LOSS_AGG: dict[str, Callable[[torch.Tensor, torch.Tensor, int | None], torch.Tensor]] = {}


def register_loss_agg(name: str):
    def wrap(fn):
        LOSS_AGG[name] = fn
        return fn
    return wrap


def _live_sequences(mask: torch.Tensor) -> torch.Tensor:
    return (mask.sum(-1) > 0).float()


@dataclass(frozen=True)
class Totals:
    """The normalisers of one update step's loss, counted over the whole step's rows. A part of
    the step (a micro-batch, a rank's share) divided by these adds up, over the parts, to the
    loss of the whole step: gradient accumulation and data parallelism change nothing."""

    tokens: float  # completion tokens of the sample rows
    sequences: float  # sample rows with tokens
    explanations: float  # explanation rows with tokens
    width: int  # the longest completion: seq-mean-token-sum-norm's default L

    @classmethod
    def of_rows(cls, rows: list[dict]) -> "Totals":
        lengths = [(row_kind(r), n_tokens(r["completion_token_ids"])) for r in rows]
        samples = [n for k, n in lengths if k in (KIND_PLAIN, KIND_GUIDED) and n]
        return cls(float(sum(samples)), float(len(samples)), float(sum(1 for k, n in lengths if k == KIND_EXPLAIN and n)),
                   max(1, max((n for _, n in lengths), default=1)))

    @classmethod
    def of_mask(cls, samples: torch.Tensor, explanations: torch.Tensor) -> "Totals":
        return cls(float(samples.sum()), float(_live_sequences(samples).sum()), float(_live_sequences(explanations).sum()),
                   samples.shape[-1])


@register_loss_agg("token-mean")
def token_mean(per_token: torch.Tensor, mask: torch.Tensor, scale: int | None = None, totals: Totals | None = None) -> torch.Tensor:
    """Σ_i Σ_t ℓ_it / Σ_i |o_i|: every token of the batch weighs the same (verl's default, DAPO)."""
    tokens = totals.tokens if totals else float(mask.sum())
    return (per_token * mask).sum() / max(tokens, 1.0)


@register_loss_agg("seq-mean-token-mean")
def seq_mean_token_mean(per_token: torch.Tensor, mask: torch.Tensor, scale: int | None = None, totals: Totals | None = None,
                        sequences: float | None = None) -> torch.Tensor:
    """(1/N) Σ_i (1/|o_i|) Σ_t ℓ_it over the N sequences with tokens: the GRPO paper's (TRL's loss_type=grpo)."""
    live = _live_sequences(mask)
    per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    n = sequences if sequences is not None else totals.sequences if totals else float(live.sum())
    return (per_seq * live).sum() / max(n, 1.0)


@register_loss_agg("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(per_token: torch.Tensor, mask: torch.Tensor, scale: int | None = None, totals: Totals | None = None) -> torch.Tensor:
    """(1/N) Σ_i (1/L) Σ_t ℓ_it with a constant L (Dr. GRPO; default: the batch's padded completion width, as verl)."""
    live = _live_sequences(mask)
    per_seq = (per_token * mask).sum(-1) / float(scale or (totals.width if totals else mask.shape[-1]))
    n = totals.sequences if totals else float(live.sum())
    return (per_seq * live).sum() / max(n, 1.0)


def expo_term(logp: torch.Tensor, mask: torch.Tensor, beta: float, totals: Totals | None = None) -> torch.Tensor:
    """ExPO: β · mean over explanation rows of each row's per-token NLL (``mask``: the explanation rows' tokens)."""
    return seq_mean_token_mean(nll(logp, beta), mask, sequences=totals.explanations if totals else None)


def expo_beta_at(cfg, step: int, steps: int) -> float:
    """ExPO's β on update step ``step`` of ``steps``: constant, or decaying linearly to 0."""
    if cfg.expo_beta_schedule == "linear" and steps > 1:
        return cfg.expo_beta * (1.0 - step / (steps - 1))
    return cfg.expo_beta


# --------------------------------------------------------------------------- batches


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, P + T), prompts left-padded, completions right-padded
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor  # (B, T)
    behaviour: torch.Tensor  # (B, T) behaviour log-probs (0 where unknown)
    advantages: torch.Tensor  # (B, T)
    kind: torch.Tensor  # (B,) 0 plain, 1 guided (shaped), 2 explanation (NLL), -1 masked
    temperature: torch.Tensor  # (B,) the sampling temperature log π_θ is computed at (1 for explanation rows: NLL)
    prompt_width: int


KIND_PLAIN, KIND_GUIDED, KIND_EXPLAIN, KIND_MASKED = 0, 1, 2, -1
KINDS = {"plain": KIND_PLAIN, "guided": KIND_GUIDED, "explain": KIND_EXPLAIN, "masked": KIND_MASKED}


def n_tokens(values) -> int:
    """The length of a per-token column's value (a list or a NumPy array; none: 0)."""
    return 0 if values is None else len(values)


def row_kind(row: dict) -> int:
    if row["prompt_kind"] == "explain":
        return KIND_EXPLAIN
    if row.get("advantage") is None or row.get("behaviour_logprobs") is None or not n_tokens(row["completion_token_ids"]):
        return KIND_MASKED
    return KIND_GUIDED if row["is_guided"] else KIND_PLAIN


def make_batch(rows: list[dict], tokenizer, device: str = "cpu") -> Batch:
    """The rows (per-token columns as lists or NumPy arrays) as padded tensors: prompts left-padded,
    completions right-padded; behaviour log-probs of the wrong length count as unknown (0); a row
    without token advantages of its completion's length gets its advantage on every position."""
    prompts = [tokenizer(r["loss_prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    comps = [r["completion_token_ids"] if r["completion_token_ids"] is not None else () for r in rows]
    pw, cw = max(len(p) for p in prompts), max(1, max(len(c) for c in comps))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = len(rows)
    ids, attn = np.full((n, pw + cw), pad, np.int64), np.zeros((n, pw + cw), np.int64)
    cmask, beh, adv = np.zeros((n, cw), np.float32), np.zeros((n, cw), np.float32), np.zeros((n, cw), np.float32)
    kinds, temps = np.zeros(n, np.int64), np.ones(n, np.float32)
    for i, (r, p, c) in enumerate(zip(rows, prompts, comps)):
        ids[i, pw - len(p):pw], ids[i, pw:pw + len(c)] = p, c
        attn[i, pw - len(p):pw + len(c)] = 1
        cmask[i, :len(c)] = 1.0
        b = r.get("behaviour_logprobs")
        if b is not None and len(b) == len(c):
            beh[i, :len(c)] = b
        ta = r.get("token_advantages")
        if ta is not None and len(ta) == len(c):
            adv[i, :len(c)] = ta
        else:
            adv[i, :] = float(r.get("advantage") or 0.0)
        kinds[i] = row_kind(r)
        temps[i] = 1.0 if kinds[i] == KIND_EXPLAIN else float(r.get("temperature") or 1.0)
    t = lambda x: torch.from_numpy(x).to(device)  # noqa: E731
    return Batch(t(ids), t(attn), t(cmask), t(beh), t(adv), t(kinds), t(temps), pw)


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
    explanations = mask * (kind == KIND_EXPLAIN).float()
    beta = cfg.expo_beta if expo_beta is None else expo_beta
    return (LOSS_AGG[cfg.loss_agg](per_token, samples, cfg.loss_scale_factor, totals=totals)
            + expo_term(logp, explanations, beta, totals=totals))


# --------------------------------------------------------------------------- the rows, streamed

#: rows read from the Parquet files at a time
READ_ROWS = 1024


def _row_arrays(column) -> list:
    """A list column of a record batch as one NumPy array per row (views of the values; null: None)."""
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    return [values[offsets[i]:offsets[i + 1]] if valid[i] else None for i in range(len(column))]


@dataclass
class GRPORows:
    """The trainable rows of a materialised grpo dataset, read from its Parquet files a record
    batch at a time (polars lazy scan, masked rows filtered out) and shuffled in a buffer of
    `shuffle_buffer` rows: memory is bounded by the buffer, not the dataset. A dataset of at
    most that many rows is read whole and shuffled exactly as a list of rows is (``minibatches``)."""

    files: list
    shuffle_buffer: int
    #: the trainable rows, where known (materialize records them): else counted with a query over the files
    count: int | None = None

    def __post_init__(self):
        if self.count is None:
            import polars as pl

            self.count = trainable(pl.scan_parquet([str(f) for f in self.files])).select(pl.len()).collect().item()

    def __len__(self) -> int:
        return self.count

    #: the columns the update reads (``row_kind``, ``make_batch``) and the row's id: the rest (texts, loss-side
    #: log-probs, group and problem ids) is not read
    COLUMNS = ["sample_id", "loss_prompt", "completion_token_ids", "behaviour_logprobs", "advantage", "token_advantages", "temperature",
               "is_guided", "prompt_kind"]
    PER_TOKEN = ("completion_token_ids", "behaviour_logprobs", "token_advantages")

    def read(self, file_order: list | None = None) -> Iterator[dict]:
        """The trainable rows (``COLUMNS``), file after file (in ``file_order``), ``READ_ROWS`` at a time."""
        for batch in iter_batches(file_order or self.files, READ_ROWS, self.COLUMNS):
            rows = batch.select([c for c in self.COLUMNS if c not in self.PER_TOKEN]).to_pylist()
            for name in self.PER_TOKEN:  # per row a NumPy view of the batch's values, not a list of Python numbers
                for r, values in zip(rows, _row_arrays(batch.column(name))):
                    r[name] = values
            yield from (r for r in rows if row_kind(r) != KIND_MASKED)


def minibatches(rows: list[dict] | GRPORows, batch_size: int, epochs: int, seed: int) -> tuple[int, Iterator[list[dict]]]:
    """(number of minibatches, the minibatches) of `epochs` shuffled passes over the trainable rows
    (seeded; the last minibatch of a pass may be short). A list, or a ``GRPORows`` that fits its
    buffer: each pass is a permutation of all rows (``random.Random(seed).shuffle``). A bigger
    ``GRPORows``: each pass reads the files (in a seeded order) through a shuffle buffer."""
    rng = random.Random(seed)
    if isinstance(rows, GRPORows) and len(rows) <= rows.shuffle_buffer:
        rows = list(rows.read())
    if isinstance(rows, list):
        rows = [r for r in rows if row_kind(r) != KIND_MASKED]
        n = len(rows)
    else:
        n = len(rows)
    steps = epochs * -(-n // batch_size)

    def from_list() -> Iterator[list[dict]]:
        order = list(range(n))
        for _ in range(epochs):
            rng.shuffle(order)
            for i in range(0, n, batch_size):
                yield [rows[j] for j in order[i : i + batch_size]]

    def streamed() -> Iterator[list[dict]]:
        for _ in range(epochs):
            files = list(rows.files)
            rng.shuffle(files)
            buffer: list[dict] = []
            batch: list[dict] = []

            def emit(row):
                batch.append(row)
                if len(batch) == batch_size:
                    out = batch.copy()
                    batch.clear()
                    return out
                return None

            for row in rows.read(files):
                buffer.append(row)
                if len(buffer) > rows.shuffle_buffer:
                    j = rng.randrange(len(buffer))
                    buffer[j], buffer[-1] = buffer[-1], buffer[j]
                    if (out := emit(buffer.pop())) is not None:
                        yield out
            rng.shuffle(buffer)
            for row in buffer:
                if (out := emit(row)) is not None:
                    yield out
            if batch:
                yield batch

    return steps, (from_list() if isinstance(rows, list) else streamed())


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
                  no_sync: Callable | None = None, parts: int = 0, pad_row: dict | None = None) -> float:
    """Backward of one update step's loss over ``rows`` in micro-batches of `micro_batch_size`
    (gradients accumulate; each part is normalised by the whole step's ``totals``, so the
    gradient is that of the step taken at once); returns the loss. ``totals``/``scale``: the
    normalisers and weight of a larger step this is a share of (a data-parallel rank's);
    ``backward``/``no_sync``: the engine's (accelerate's), no gradient sync before the last part;
    ``parts``/``pad_row``: at least this many forward/backward passes, the missing ones on
    ``pad_row`` with weight 0 (every rank of a sharded engine must run as many as the others)."""
    import contextlib

    totals = totals or Totals.of_rows(rows)
    chunks = [(chunk, scale) for chunk in micro_batches(rows, tokenizer, cfg)]
    chunks += [([pad_row], 0.0)] * (parts - len(chunks))
    alone = no_sync is None and not parts  # one process: a micro-batch may be split without the other ranks knowing
    loss, k = 0.0, 0
    while k < len(chunks):
        chunk, weight = chunks[k]
        batch = make_batch(chunk, tokenizer, device)
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


def _row_lengths(row: dict, tokenizer) -> tuple[int, int]:
    return len(tokenizer(row["loss_prompt"], add_special_tokens=False)["input_ids"]), n_tokens(row["completion_token_ids"])


def batch_tokens(rows: list[dict], tokenizer) -> int:
    """Padded tokens of ``rows`` as one batch (``make_batch``): rows x (longest prompt + longest completion)."""
    lengths = [_row_lengths(r, tokenizer) for r in rows]
    return len(rows) * (max(p for p, _ in lengths) + max(1, max(c for _, c in lengths)))


def micro_batches(rows: list[dict], tokenizer, cfg) -> list[list[dict]]:
    """A step's rows, in order, as the forward/backward passes: `micro_batch_size` rows at most (default: all) and,
    with `micro_batch_tokens`, at most that many padded tokens (a longer row goes alone)."""
    size = cfg.micro_batch_size or max(1, len(rows))
    budget = getattr(cfg, "micro_batch_tokens", None)
    if not budget:
        return [rows[start:start + size] for start in range(0, len(rows), size)]
    out: list[list[dict]] = []
    chunk, pmax, cmax = [], 0, 1
    for row in rows:
        p, c = _row_lengths(row, tokenizer)
        wider = (len(chunk) + 1) * (max(pmax, p) + max(cmax, c))
        if chunk and (len(chunk) == size or wider > budget):
            out.append(chunk)
            chunk, pmax, cmax = [], 0, 1
        chunk.append(row)
        pmax, cmax = max(pmax, p), max(cmax, c)
    if chunk:
        out.append(chunk)
    return out


def train_update(model, tokenizer, rows: list[dict] | GRPORows, cfg, ref_model=None, device: str = "cpu", dtype: str = "float32") -> dict:
    """`cfg.epochs` passes over the rows in shuffled minibatches (``minibatches``); AdamW (or SGD).
    With ``dtype`` bfloat16 the forward passes run under bfloat16 autocast; weights and optimizer stay float32."""
    total, batches = minibatches(rows, cfg.batch_size, cfg.epochs, cfg.seed)
    if not total:
        return {"steps": 0, "rows": 0, "losses": []}
    n = len(rows) if isinstance(rows, GRPORows) else sum(row_kind(r) != KIND_MASKED for r in rows)
    opt = make_optimizer(model, cfg)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()  # transformers 5's name for gradient checkpointing
        if getattr(cfg, "lora", False):  # frozen embeddings: the checkpointed blocks need inputs that carry a gradient
            model.enable_input_require_grads()
    model.train()
    losses, steps = [], 0
    for step, rows_of_step in enumerate(progress.track(batches, f"grpo: updating on {n} samples", total=total)):
        loss = step_backward(model, tokenizer, rows_of_step, cfg, ref_model, expo_beta_at(cfg, step, total), device, dtype)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss)
        steps += 1
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_disable()
    model.eval()
    return {"steps": steps, "rows": n, "first_loss": losses[0], "last_loss": losses[-1],
            "mean_loss": sum(losses) / len(losses)}


# --------------------------------------------------------------------------- the stage


def with_lora(model, cfg):
    """The model with LoRA adapters (peft) on every linear layer; only they are trained."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))


def adapters_off(model) -> Callable:
    """The KL's reference log-probs from a LoRA model with its adapters switched off: the base
    policy without a second copy of it in memory."""
    def ref(batch):
        with model.disable_adapter():
            return completion_logps(model, batch)
    return ref


def reference_dir(config: Config):
    """The KL's reference policy: the run's initial policy (kl_reference: initial; `reference_model`,
    which `guidedrl online` sets, else policy.model) or the round's starting policy."""
    gc = config.train.grpo
    if gc.kl_reference == "initial" and gc.reference_model:
        return config.resolve(gc.reference_model)
    return local_policy_dir(config, STAGE.name)


def preflight(config: Config) -> None:
    """Before any work: the policy can be loaded."""
    local_policy_dir(config, STAGE.name)
    check_policy(config)
    gc = config.train.grpo
    if gc.lora_adapter and not gc.lora:
        raise ValueError("train.grpo.lora_adapter continues a LoRA adapter: set train.grpo.lora: true")
    if gc.lora_adapter:
        lora_base(gc.lora_adapter)


def settings(config: Config) -> dict:
    return {**config.train.grpo.model_dump(mode="json", exclude={"rounds"}), **precision_settings(config)}


def inputs(config: Config, upstream: dict[str, StageOutput]) -> dict:
    return {"grpo": upstream["materialize"].fingerprints["grpo"], "policy": policy_id_for(config)}


# --------------------------------------------------------------------------- the update as several processes

#: the module every process of a distributed update runs (tasks/stages/_grpo_distributed.py)
DISTRIBUTED_WORKER = "tasks.stages._grpo_distributed"


def launch_distributed(config, cfg, base: Path, reference: Path, files: list[Path], out: Path, device: str, dtype: str,
                       count: int | None = None) -> dict:
    """Run the update as the configured launcher's processes (``count``: the files' trainable rows, where known);
    the checkpoint lands in ``out``. Returns the metrics the main process wrote."""
    spec = {"base": str(base), "reference": str(reference), "files": [str(f) for f in files], "cfg": cfg.model_dump(mode="json"),
            "device": device, "dtype": dtype, "count": count}
    return launch(config, cfg.distributed, STAGE.name, DISTRIBUTED_WORKER, spec, out)


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
    fault("checkpoint.save", STAGE.name)
    tokenizer.save_pretrained(out)


def trainable_count(by_kind: dict[str, int]) -> int:
    """The rows the update trains on (every kind but masked)."""
    return sum(n for kind, n in by_kind.items() if kind != "masked")


def compute(job: Job) -> StageOutput:
    config = job.config
    base = local_policy_dir(config, STAGE.name)
    gc = config.train.grpo
    if config.rollouts.top_p < 1.0:
        raise ValueError(f"grpo: rollouts.top_p is {config.rollouts.top_p}: the sampler's behaviour log-probs are of the "
                         "truncated distribution, which the update cannot score; set rollouts.top_p: 1.0 for training rollouts")
    device, dtype = precision(config)
    data = job.upstream["materialize"]
    files = data_files(data.dataset_path("grpo"))
    # the rows by kind as materialize counted them when it wrote them (the output's fingerprint binds its
    # summary to these files); an output without them (written before) is counted here
    by_kind = data.summary.get("grpo", {}).get("rows_by_kind") or kind_counts(data.scan("grpo"))
    with job.scratch() as work:
        if gc.distributed:
            metrics = launch_distributed(config, gc, base, reference_dir(config), files, work / "checkpoint", device, dtype,
                                         count=trainable_count(by_kind))
        else:
            torch.manual_seed(gc.seed)
            tokenizer, model, ref = load_for_update(base, reference_dir(config), gc, device)
            rows = GRPORows(files, gc.shuffle_buffer, trainable_count(by_kind))
            metrics = train_update(model, tokenizer, rows, gc, ref, device=device, dtype=dtype)
            save_checkpoint(model, tokenizer, work / "checkpoint", gc)
        summary = {"base_policy": job.inputs["policy"], "data": job.inputs["grpo"], **metrics, "rows_by_kind": by_kind}
        out = job.write({}, summary, directories={"checkpoint": work / "checkpoint"})
    log.info("grpo: %d steps over %d samples %s, loss %s -> %s%s -> %s", metrics["steps"], metrics["rows"],
             summary["rows_by_kind"], metrics.get("first_loss"), metrics.get("last_loss"),
             f" ({metrics['processes']} processes, {gc.distributed.launcher})" if gc.distributed else "", out.path / "checkpoint")
    return out


def describe(s: dict) -> str:
    k = s.get("rows_by_kind", {})
    return (f"{s.get('steps')} update steps over {s.get('rows')} samples ({k.get('plain')} plain, {k.get('guided')} guided, "
            f"{k.get('explain')} explanations, {k.get('masked')} masked); loss {s.get('first_loss', 0):.4f} -> {s.get('last_loss', 0):.4f}")


