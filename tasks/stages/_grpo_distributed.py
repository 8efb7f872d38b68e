"""The grpo update as several processes on an existing engine (HF accelerate: DDP, FSDP2,
DeepSpeed ZeRO from an accelerate config; or torchrun for plain DDP, gloo on CPU).

``tasks.stages.grpo.launch`` (when `train.grpo.distributed` is set) writes a job spec and starts
the launcher as a subprocess on this module; ``worker`` is what every process runs:

- every rank computes the same seeded minibatches of the step (``GRPORows`` + ``minibatches``,
  streamed from the grpo Parquet files) and takes its share, rows ``rank::world`` of each step;
  every rank runs as many forward/backward passes as the busiest one (a rank short of rows adds
  weight-0 passes), as sharded engines need;
- each share's loss is normalised by the *whole step's* ``Totals`` and weighted by the number of
  processes, so the engine's gradient average is the gradient of the whole step — the same
  update as one process on the same rows (tests/test_distributed.py checks the parameters);
- gradients are reduced by the engine (``accelerator.backward``, ``no_sync`` between a share's
  micro-batches); nothing here communicates by hand except the logged loss (``accelerator.reduce``);
- the main process saves the checkpoint (``accelerator.get_state_dict``: whole under FSDP/ZeRO)
  and a metrics file; the stage stores them as it does a one-process update.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def worker(spec_path: str) -> None:
    """One process of the update (see the module doc)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    from tasks.stages._launch import METRICS
    from tasks.stages._grpo_data import needs_sampler_logprobs
    from tasks.stages._grpo_loop import mismatch_summary, old_policy
    from tasks.stages.grpo import GRPORows, GRPOTrainConfig, Totals, expo_beta_at, load_for_update, make_optimizer, micro_batches, minibatches, save_checkpoint, step_backward

    spec = json.loads(Path(spec_path).read_text())
    cfg = GRPOTrainConfig(**spec["cfg"])
    # buffers (rotary frequencies) are constants: no broadcast in each forward
    acc = Accelerator(cpu=spec["device"] == "cpu", mixed_precision="bf16" if spec["dtype"] == "bfloat16" else "no",
                      kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    torch.manual_seed(cfg.seed)
    tokenizer, model, ref = load_for_update(spec["base"], spec["reference"], cfg, str(acc.device))
    old_model, stats = old_policy(model, cfg), {}  # π_old: the starting policy, before the engine wraps it
    opt = make_optimizer(model, cfg)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
        if cfg.lora:
            model.enable_input_require_grads()
    model, opt = acc.prepare(model, opt)
    model.train()
    needs_behaviour = needs_sampler_logprobs(cfg)
    rows = GRPORows([Path(f) for f in spec["files"]], cfg.shuffle_buffer, spec.get("count"), needs_behaviour)
    total, batches = minibatches(rows, cfg.batch_size, cfg.epochs, cfg.seed, needs_behaviour)
    rank, world = acc.process_index, acc.num_processes
    losses = []
    for step, step_rows in enumerate(batches):
        mine = step_rows[rank::world]
        # every rank runs as many forward/backward passes as the busiest (sharded engines gather in each)
        parts = max(len(micro_batches(step_rows[r::world], tokenizer, cfg)) for r in range(world))
        loss = step_backward(model, tokenizer, mine, cfg, ref, expo_beta_at(cfg, step, total), str(acc.device), spec["dtype"],
                             totals=Totals.of_rows(step_rows, needs_behaviour), scale=world, backward=acc.backward,
                             no_sync=lambda: acc.no_sync(model), parts=parts, pad_row=step_rows[0], old_model=old_model, stats=stats)
        if cfg.max_grad_norm:
            acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        # each share is weighted by `world` (the engine averages): the step's loss is the shares' sum / world
        losses.append(acc.reduce(torch.tensor(loss / world, device=acc.device), reduction="sum").item())
    acc.wait_for_everyone()
    state = acc.get_state_dict(model)
    if acc.is_main_process:
        out = Path(spec["out"])
        save_checkpoint(acc.unwrap_model(model), tokenizer, out, cfg, state_dict=state)
        metrics = {"steps": len(losses), "rows": len(rows), "processes": world, "old_logprobs": cfg.old_logprobs}
        if old_model is not None:  # the main process's share of the rows
            metrics["mismatch"] = mismatch_summary(stats)
        if losses:
            metrics.update(first_loss=losses[0], last_loss=losses[-1], mean_loss=sum(losses) / len(losses))
        (out / METRICS).write_text(json.dumps(metrics))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    from tasks.stages._launch import rank

    with rank(sys.argv[1]):
        worker(sys.argv[1])
