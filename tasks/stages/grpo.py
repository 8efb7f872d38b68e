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

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

from tasks.core.schemas import kind_counts
from tasks.core.stage import Job, Stage
from tasks.core.store import StageOutput, data_files
from tasks.models.policy import check_policy, local_policy_dir, policy_id_for, precision, precision_settings
from tasks.stages._grpo_data import (KIND_EXPLAIN, KIND_GUIDED, KIND_MASKED, KIND_PLAIN, KINDS, READ_ROWS, Batch, GRPORows,  # noqa: F401
                                     batch_tokens, make_batch, micro_batches, minibatches, n_tokens, needs_sampler_logprobs, row_kind)
from tasks.stages._grpo_losses import (LOSS_AGG, Totals, clipped_surrogate, expo_beta_at, expo_term, kl_k3, nll,  # noqa: F401
                                       register_loss_agg, rollout_weights, seq_mean_token_mean, seq_mean_token_sum_norm,
                                       shaped_surrogate, token_mean)
from tasks.stages._grpo_loop import (adapters_off, completion_logps, load_for_update, lora_base, make_optimizer,  # noqa: F401
                                     out_of_memory, save_checkpoint, step_backward, train_update, update_loss, with_lora)
from tasks.stages._launch import DistributedConfig, launch
from tasks.stages._lora import LoraSettings

if TYPE_CHECKING:
    from tasks.registry import Config


class GRPOTrainConfig(LoraSettings):
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
    expo_nll: Literal["token-mean", "sequence"] = Field(
        "token-mean", description="ExPO's term per explanation: sequence — the NLL of the whole explanation with its answer, "
        "summed over its tokens (ExPO's β · log π(c̃, a* | q); the expo preset), averaged over the step's explanation rows; "
        "token-mean — its per-token mean (then β acts as the paper's β divided by the explanation's length)")
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
    old_logprobs: Literal["recompute", "sampler"] = Field(
        "recompute", description="π_old of the ratio: recompute (verl's default): a forward pass of the sampling checkpoint over "
        "prompt + completion at the row's sampling temperature before its first step (one frozen copy of the weights), so any "
        "server trains, text-only ones too; sampler: the sampler's own log-probs (rows without them are masked)")
    rollout_correction: Literal["none", "token-truncate", "token-mask"] = Field(
        "none", description="where both the sampler's and the recomputed log-probs exist, the training–inference mismatch "
        "correction (verl, slime, ms-swift): token-truncate weights each token's loss by min(π_old / π_sampler, C) (truncated "
        "importance sampling); token-mask leaves tokens whose ratio is outside [1/C, C] out of the loss and its denominator")
    rollout_is_threshold: float = Field(2.0, gt=1, description="C of rollout_correction (verl's rollout_is_threshold, 2.0)")
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    shuffle_buffer: int = Field(
        4096, gt=0, description="rows held to shuffle the grpo dataset as it streams from its Parquet files; a dataset of at most "
        "this many trainable rows is shuffled whole (bounds the update's data memory: ~36 bytes a token as Python lists)")


STAGE = Stage(name="grpo", version="2", module=__name__, upstream=("materialize",), directories=("checkpoint",),
              section="train.grpo", settings_model=GRPOTrainConfig, online=True)

log = logging.getLogger("guidedrl.grpo")


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
    if gc.distributed and gc.rollout_correction == "token-mask":
        raise ValueError("train.grpo.rollout_correction: token-mask under train.grpo.distributed is not supported yet (each rank "
                         "would need every rank's masked tokens for the step's denominator); use token-truncate")


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
    needs_behaviour = needs_sampler_logprobs(gc)
    by_kind = (data.summary.get("grpo", {}).get("rows_by_kind") if needs_behaviour else None) or kind_counts(data.scan("grpo"), needs_behaviour)
    with job.scratch() as work:
        if gc.distributed:
            metrics = launch_distributed(config, gc, base, reference_dir(config), files, work / "checkpoint", device, dtype,
                                         count=trainable_count(by_kind))
        else:
            torch.manual_seed(gc.seed)
            tokenizer, model, ref = load_for_update(base, reference_dir(config), gc, device)
            rows = GRPORows(files, gc.shuffle_buffer, trainable_count(by_kind), needs_behaviour)
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
    m = s.get("mismatch") or {}
    seen = (f"; π_old recomputed, sampler–trainer |Δ log p| mean {m['mean_abs_logp_diff']:.2g} max {m['max_abs_logp_diff']:.2g} over "
            f"{m['tokens']} tokens ({m['capped_share']:.1%} capped)" if m.get("tokens") else
            "; π_old recomputed (the sampler gave no log-probs)" if s.get("old_logprobs") == "recompute" else "")
    return (f"{s.get('steps')} update steps over {s.get('rows')} samples ({k.get('plain')} plain, {k.get('guided')} guided, "
            f"{k.get('explain')} explanations, {k.get('masked')} masked); loss {s.get('first_loss', 0):.4f} -> "
            f"{s.get('last_loss', 0):.4f}{seen}")


