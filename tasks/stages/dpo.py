"""Stage `dpo`: offline DPO of the policy on the materialised `dpo` dataset,
with TRL's `DPOTrainer` (LoRA through peft as an option).

The dataset is read back *as files* (`datasets.load_dataset("parquet", ...)`),
exactly as another team would. A slice of the pairs (by problem, `heldout_fraction`)
is held out of training; on it the DPO loss and the chosen-minus-rejected
log-ratio (policy over reference) are measured before and after training.

Output: the trained checkpoint (directory `checkpoint/`, model + tokenizer)
as a stage output whose manifest records the base policy, the data
fingerprint, the config and the metrics. The `eval` stage measures it.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import Field

from tasks.core.faults import fault
from tasks.core.stage import Job, Stage
from tasks.core.store import StageOutput, read_manifest
from tasks.models.policy import check_policy, local_policy_dir, policy_id_for, precision, precision_settings
from tasks.models.token_text import prompt_ids, suffix_ids
from tasks.core import progress
from tasks.stages._launch import DistributedConfig, launch
from tasks.stages._lora import LoraSettings, lora_config

if TYPE_CHECKING:
    from tasks.registry import Config


class DPOTrainConfig(LoraSettings):
    """Offline DPO with TRL's DPOTrainer on the materialised `dpo` dataset."""

    beta: float = Field(0.1, gt=0)
    learning_rate: float = Field(1e-6, gt=0)
    max_steps: int = Field(200, gt=0)
    batch_size: int = Field(8, gt=0, description="pairs per device step")
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_length: int = Field(1024, gt=0, description="prompt + completion tokens")
    max_pairs: int | None = Field(None, gt=0, description="train on at most this many pairs (a seeded sample)")
    sft_weight: float = Field(0.0, ge=0, description="weight of an NLL term on the chosen completion (TRL loss_type sft; RPO); 0: plain DPO")
    heldout_fraction: float = Field(0.1, ge=0, lt=1, description="pairs held out (whole problems) to measure the DPO loss before/after")
    distributed: DistributedConfig | None = Field(
        None, description="train under a launcher as several processes (tasks/stages/_dpo_distributed.py): TRL's DPOTrainer on "
        "accelerate launch with a config from infra/accelerate/ (DDP, FSDP2, DeepSpeed ZeRO) or torchrun (DDP; gloo on CPU); "
        "batch_size is per process; default: in this process")
    seed: int = 0


STAGE = Stage(name="dpo", version="1", module=__name__, upstream=("materialize",), directories=("checkpoint",),
              section="train.dpo", settings_model=DPOTrainConfig, online=False)

log = logging.getLogger("guidedrl.dpo")


def load_pairs(dataset_dir: Path):
    """The dpo dataset as a Hugging Face dataset, read from its Parquet files."""
    from datasets import load_dataset

    files = sorted(str(p) for p in (Path(dataset_dir) / "data").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{dataset_dir}: no Parquet files under data/")
    return load_dataset("parquet", data_files=files, split="train")


def split_heldout(ds, fraction: float):
    """(train, held-out): whole problems go to one side, by a hash of problem_id."""
    def heldout(pid: str) -> bool:
        return int(hashlib.sha256(pid.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction

    flags = [heldout(p) for p in ds["problem_id"]]
    if fraction > 0 and not any(flags) and len(ds) > 1:
        flags[-1] = True
    held = ds.select([i for i, f in enumerate(flags) if f])
    return ds.select([i for i, f in enumerate(flags) if not f]), held


def _completion_logps(model, tokenizer, prompts: list[str], completions: list[str]) -> torch.Tensor:
    """Summed log-probability of each completion (+ EOS, as TRL trains it) given its prompt: the completion's ids as
    they follow the prompt (TRL tokenizes prompt + completion whole and cuts where they diverge)."""
    out = []
    for prompt, completion in zip(prompts, completions):
        p = prompt_ids(tokenizer, prompt)
        c = suffix_ids(tokenizer, prompt, completion + (tokenizer.eos_token or ""))
        ids = torch.tensor([p + c], device=model.device)  # wherever the trainer left the model
        logits = model(input_ids=ids).logits[0, len(p) - 1 : -1].float()
        out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(c, device=model.device)[:, None]).sum().cpu())
    return torch.stack(out)


@torch.no_grad()
def heldout_metrics(model, ref_model, tokenizer, pairs, beta: float) -> dict:
    """DPO loss and the mean chosen-minus-rejected log-ratio (policy over reference) on fixed pairs."""
    if len(pairs) == 0:
        return {"pairs": 0}
    model.eval()
    prompts, chosen, rejected = pairs["prompt"], pairs["chosen"], pairs["rejected"]
    pc, pr = _completion_logps(model, tokenizer, prompts, chosen), _completion_logps(model, tokenizer, prompts, rejected)
    rc, rr = _completion_logps(ref_model, tokenizer, prompts, chosen), _completion_logps(ref_model, tokenizer, prompts, rejected)
    margin = (pc - rc) - (pr - rr)
    return {"pairs": len(pairs), "loss": float(-torch.nn.functional.logsigmoid(beta * margin).mean()),
            "log_ratio_margin": float(margin.mean()), "chosen_logp": float(pc.mean()), "rejected_logp": float(pr.mean())}


def train(base_model: str | Path, dataset_dir: Path, out_dir: Path, cfg, device: str = "cpu", dtype: str = "float32") -> dict:
    """DPO with TRL from ``base_model`` on the pairs in ``dataset_dir``; the trained
    model and tokenizer go to ``out_dir``. Returns the metrics."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(cfg.seed)
    if read_manifest(dataset_dir).get("num_rows") == 0:
        raise ValueError(f"dpo: no training pairs in {dataset_dir}: the materialize stage found no chosen/rejected pairs "
                         "(no problem had both a verified positive sample and a wrong one); more rollouts or guidance samples are needed")
    pairs = load_pairs(dataset_dir).select_columns(["prompt", "chosen", "rejected", "problem_id"])
    train_ds, held = split_heldout(pairs, cfg.heldout_fraction)
    if len(train_ds) == 0:
        raise ValueError(f"dpo: no training pairs in {dataset_dir} (after holding out {len(held)}); "
                         "the materialize stage found no chosen/rejected pairs — more rollouts or guidance samples are needed")
    if cfg.max_pairs:
        train_ds = train_ds.shuffle(seed=cfg.seed).select(range(min(cfg.max_pairs, len(train_ds))))
    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    model = AutoModelForCausalLM.from_pretrained(str(base_model))
    ref = AutoModelForCausalLM.from_pretrained(str(base_model))
    before = heldout_metrics(model, ref, tokenizer, held, cfg.beta)
    peft_config = lora_config(cfg) if cfg.lora else None
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp, beta=cfg.beta, learning_rate=cfg.learning_rate, max_steps=cfg.max_steps,
            per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            lr_scheduler_type="constant", warmup_steps=0, logging_steps=max(1, cfg.max_steps // 10), save_strategy="no",
            report_to=[], seed=cfg.seed, max_length=cfg.max_length, use_cpu=device == "cpu",  # policy.device
            bf16=dtype == "bfloat16" and device != "cpu", fp16=False,  # policy.dtype: bf16 mixed precision on a GPU
            disable_tqdm=not progress.enabled(), dataloader_num_workers=0,
            # RPO: an NLL term on the chosen completion keeps its likelihood from falling with the rejected one
            loss_type=["sigmoid", "sft"] if cfg.sft_weight > 0 else ["sigmoid"],
            loss_weights=[1.0, cfg.sft_weight] if cfg.sft_weight > 0 else None,
        )
        trainer = DPOTrainer(model=model, ref_model=None if cfg.lora else ref, args=args, train_dataset=train_ds,
                             processing_class=tokenizer, peft_config=peft_config)
        trainer.remove_callback(PrinterCallback)  # metrics go to the log and the manifest, not raw dicts on stdout
        trainer.train()
        history = [h for h in trainer.state.log_history if "loss" in h]
        out_dir = Path(out_dir)
        several = trainer.accelerator.num_processes > 1
        if several:  # launched (train.dpo.distributed): the trainer gathers the model (FSDP, ZeRO) and the main process writes it
            trainer.save_model(str(out_dir / "adapter" if cfg.lora else out_dir))
            trainer.accelerator.wait_for_everyone()
            if not trainer.accelerator.is_main_process:
                return {}
            model = AutoModelForCausalLM.from_pretrained(str(base_model))
            if cfg.lora:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, str(out_dir / "adapter")).merge_and_unload()
            else:
                model = AutoModelForCausalLM.from_pretrained(str(out_dir))
        else:
            model = trainer.model
            if cfg.lora:
                model = model.merge_and_unload()
    after = heldout_metrics(model, ref, tokenizer, held, cfg.beta)
    if cfg.lora or not several:
        model.save_pretrained(out_dir)
    fault("checkpoint.save", STAGE.name)
    tokenizer.save_pretrained(out_dir)
    return {"train_pairs": len(train_ds), "heldout_before": before, "heldout_after": after,
            "train_log": [{k: round(v, 5) if isinstance(v, float) else v for k, v in h.items()} for h in history],
            **({"processes": trainer.accelerator.num_processes} if several else {})}


def preflight(config: Config) -> None:
    """Before any work: the policy can be loaded."""
    local_policy_dir(config, STAGE.name)
    check_policy(config)


def settings(config: Config) -> dict:
    return {**config.train.dpo.model_dump(mode="json"), **precision_settings(config)}


def inputs(config: Config, upstream: dict[str, StageOutput]) -> dict:
    return {"dpo": upstream["materialize"].fingerprints["dpo"], "policy": policy_id_for(config)}


#: the module every process of a distributed dpo runs (tasks/stages/_dpo_distributed.py)
DISTRIBUTED_WORKER = "tasks.stages._dpo_distributed"


def launch_distributed(config, cfg, base: Path, data: Path, out: Path, device: str, dtype: str) -> dict:
    """Train as the configured launcher's processes; the checkpoint lands in ``out``; the main process's metrics."""
    spec = {"base": str(base), "data": str(data), "cfg": cfg.model_dump(mode="json"), "device": device, "dtype": dtype}
    return launch(config, cfg.distributed, STAGE.name, DISTRIBUTED_WORKER, spec, out)


def compute(job: Job) -> StageOutput:
    config = job.config
    base = local_policy_dir(config, STAGE.name)
    cfg, data = config.train.dpo, job.upstream["materialize"].dataset_path("dpo")
    device, dtype = precision(config)
    with job.scratch() as work:
        if cfg.distributed:
            metrics = launch_distributed(config, cfg, base, data, work / "checkpoint", device, dtype)
        else:
            metrics = train(base, data, work / "checkpoint", cfg, device, dtype)
        summary = {"base_policy": job.inputs["policy"], "data": job.inputs["dpo"], **metrics}
        out = job.write({}, summary, directories={"checkpoint": work / "checkpoint"})
    b, a = metrics["heldout_before"], metrics["heldout_after"]
    log.info("dpo: %d steps on %d pairs; held-out DPO loss %s -> %s, log-ratio margin %s -> %s -> %s", config.train.dpo.max_steps,
             metrics["train_pairs"], b.get("loss"), a.get("loss"), b.get("log_ratio_margin"), a.get("log_ratio_margin"),
             out.path / "checkpoint")
    return out


def describe(s: dict) -> str:
    b, a = s.get("heldout_before", {}), s.get("heldout_after", {})
    if not b.get("pairs"):
        return f"trained on {s.get('train_pairs')} pairs"
    return (f"trained on {s.get('train_pairs')} pairs; held-out DPO loss {b.get('loss'):.3f} -> {a.get('loss'):.3f}, "
            f"log-ratio margin {b.get('log_ratio_margin'):.2f} -> {a.get('log_ratio_margin'):.2f}")


