"""The grpo update on an existing distributed engine, on CPU: two torchrun processes (DDP over gloo)
give the parameters of one process on the same rows; accelerate launch runs the same worker; the
infra/accelerate configs load with accelerate's own reader."""

import copy
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks.core.schemas import to_table
from tasks.registry import parse_config
from tasks.stages.grpo import GRPORows, GRPOTrainConfig, train_update
from tests.test_update_scale import _rows

pytestmark = pytest.mark.slow  # end to end: torchrun and accelerate launch several processes

ROOT = Path(__file__).resolve().parents[1]


def _files(tmp_path, tok) -> list[Path]:
    rows = _rows(tok) + [dict(r, sample_id=r["sample_id"] + "b", advantage=None if r["advantage"] is None else -r["advantage"])
                         for r in _rows(tok)]
    files = [tmp_path / "part-00000.parquet", tmp_path / "part-00001.parquet"]
    pq.write_table(to_table(rows[:9], "grpo"), files[0])
    pq.write_table(to_table(rows[9:], "grpo"), files[1])
    return files


def _params(path) -> dict[str, torch.Tensor]:
    return dict(AutoModelForCausalLM.from_pretrained(path).named_parameters())


@pytest.mark.parametrize("micro", [None, 2])
def test_two_torchrun_processes_give_the_parameters_of_one(random_checkpoint, tmp_path, micro):
    from tasks.stages.grpo import launch_distributed as launch

    tok = AutoTokenizer.from_pretrained(random_checkpoint)
    files = _files(tmp_path, tok)
    # 16 rows (4 explanations), batches of 5: 4 steps, the last of one row (the second process pads); AdamW, clipping
    common = {"learning_rate": 0.02, "batch_size": 5, "expo_beta": 0.2, "loss_agg": "seq-mean-token-mean", "micro_batch_size": micro}
    one = copy.deepcopy(AutoModelForCausalLM.from_pretrained(random_checkpoint))
    torch.manual_seed(0)
    alone = train_update(one, tok, GRPORows(files, 4096), GRPOTrainConfig(**common))

    cfg = GRPOTrainConfig(**common, distributed={"launcher": "torchrun", "num_processes": 2})
    config = parse_config({"problems": {"sources": [{"file": "x.jsonl"}]}}, base_dir=tmp_path)
    out = tmp_path / "checkpoint"
    metrics = launch(config, cfg, Path(random_checkpoint), Path(random_checkpoint), files, out, "cpu", "float32")
    assert metrics["processes"] == 2 and metrics["steps"] == alone["steps"] == 4 and metrics["rows"] == alone["rows"]
    assert metrics["first_loss"] == pytest.approx(alone["first_loss"], abs=1e-5)
    two = _params(out)
    moved = 0.0
    for name, value in one.named_parameters():
        # AdamW divides by sqrt(v): a near-zero gradient carries float noise into a step of up to lr; 4 steps x lr 0.02 = 0.08
        torch.testing.assert_close(two[name], value.detach(), atol=5e-5, rtol=1e-4)
        moved = max(moved, (value.detach() - _params(random_checkpoint)[name]).abs().max().item()) if name.endswith("q_proj.weight") else moved
    assert moved > 1e-4  # the update did move the weights
    assert (out / "tokenizer.json").is_file() and not (out / "metrics.json").exists()


def test_accelerate_launch_runs_the_worker_and_a_failed_launch_says_why(random_checkpoint, tmp_path):
    from tasks.stages.grpo import launch_distributed as launch

    tok = AutoTokenizer.from_pretrained(random_checkpoint)
    files = _files(tmp_path, tok)
    config = parse_config({"problems": {"sources": [{"file": "x.jsonl"}]}}, base_dir=ROOT)
    cfg = GRPOTrainConfig(learning_rate=0.02, batch_size=8, distributed={"config_file": "infra/accelerate/cpu.yaml"})
    metrics = launch(config, cfg, Path(random_checkpoint), Path(random_checkpoint), files, tmp_path / "ckpt", "cpu", "float32")
    assert metrics["processes"] == 1 and metrics["steps"] == 2 and (tmp_path / "ckpt" / "model.safetensors").is_file()

    broken = GRPOTrainConfig(batch_size=8, distributed={"launcher": "torchrun", "num_processes": 2})
    with pytest.raises(RuntimeError, match=r"the distributed update failed \(exit [1-9]"):
        launch(config, broken, tmp_path / "no-such-model", tmp_path / "no-such-model", files, tmp_path / "ckpt2", "cpu", "float32")
    with pytest.raises(ValueError, match="needs config_file"):
        GRPOTrainConfig(distributed={"launcher": "accelerate"})


@pytest.mark.parametrize("name,kind,processes", [("ddp", "MULTI_GPU", 8), ("fsdp2", "FSDP", 8), ("deepspeed-zero2", "DEEPSPEED", 8),
                                                 ("cpu", "NO", 1)])
def test_infra_accelerate_configs_load_with_accelerates_reader(name, kind, processes):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "infra" / "accelerate" / f"{name}.yaml"))
    assert cfg.distributed_type.name == kind and cfg.num_processes == processes


def test_dpo_under_a_launcher_trains_on_trls_own_distributed_path(tmp_path):
    """train.dpo.distributed: TRL's DPOTrainer in the launched processes. One accelerate process trains exactly as
    in this process; two torchrun processes (DDP over gloo) train, and the main process alone writes the gathered
    checkpoint and the held-out metrics."""
    from tasks.stages import dpo
    from tasks.stages.dpo import DPOTrainConfig
    from tests.test_training import TINY, _dpo_dir

    data = _dpo_dir(tmp_path, n=16)
    config = parse_config({"problems": {"sources": [{"file": "x.jsonl"}]}}, base_dir=ROOT)
    common = {"learning_rate": 5e-4, "max_steps": 2, "batch_size": 4, "max_length": 128, "heldout_fraction": 0.25}
    alone = dpo.train(TINY, data, tmp_path / "alone", DPOTrainConfig(**common))
    acc = DPOTrainConfig(**common, distributed={"config_file": "infra/accelerate/cpu.yaml"})
    m1 = dpo.launch_distributed(config, acc, TINY, data, tmp_path / "acc", "cpu", "float32")
    assert m1["processes"] == 1 and m1["train_pairs"] == alone["train_pairs"]
    assert m1["heldout_after"]["loss"] == pytest.approx(alone["heldout_after"]["loss"], abs=1e-6)
    same = _params(tmp_path / "alone")
    for name, value in _params(tmp_path / "acc").items():
        torch.testing.assert_close(value, same[name], atol=1e-6, rtol=1e-6)

    two = DPOTrainConfig(**{**common, "batch_size": 2}, distributed={"launcher": "torchrun", "num_processes": 2})
    m2 = dpo.launch_distributed(config, two, TINY, data, tmp_path / "ddp", "cpu", "float32")
    assert m2["processes"] == 2 and m2["heldout_after"]["pairs"] == alone["heldout_after"]["pairs"]
    assert m2["heldout_after"]["log_ratio_margin"] > m2["heldout_before"]["log_ratio_margin"]  # it learned the preference
    base = _params(TINY)
    assert max((v - base[n]).abs().max().item() for n, v in _params(tmp_path / "ddp").items()) > 1e-4
    assert (tmp_path / "ddp" / "tokenizer.json").is_file() and not (tmp_path / "ddp" / "metrics.json").exists()

    lora = DPOTrainConfig(**{**common, "batch_size": 2, "learning_rate": 2e-3}, lora=True, lora_r=4, lora_alpha=8,
                          distributed={"launcher": "torchrun", "num_processes": 2})
    m3 = dpo.launch_distributed(config, lora, TINY, data, tmp_path / "lora", "cpu", "float32")
    assert m3["processes"] == 2 and m3["heldout_after"]["log_ratio_margin"] > m3["heldout_before"]["log_ratio_margin"]
    merged = _params(tmp_path / "lora")  # the gathered adapter, merged by the main process; the adapter kept beside it
    assert not any("lora" in n for n in merged) and (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file()
    assert max((v - base[n]).abs().max().item() for n, v in merged.items()) > 1e-5


def test_a_hung_launch_ends_after_its_timeout_naming_the_rank_and_leaves_no_process(tmp_path):
    """train.<stage>.distributed.timeout_seconds: torchrun (its own rendezvous: --standalone) runs two ranks; rank 1
    never finishes. After the timeout the launch's whole process group is stopped and the stage fails in one line
    naming rank 1."""
    import time

    import psutil

    from tasks.stages._launch import DistributedConfig, launch

    config = parse_config({"problems": {"sources": [{"file": "x.jsonl"}]}}, base_dir=ROOT)
    dc = DistributedConfig(launcher="torchrun", num_processes=2, timeout_seconds=20)
    started, seen = time.monotonic(), set()
    with pytest.raises(RuntimeError, match=r"dpo: the distributed update did not finish in 20 s "
                                           r"\(train.dpo.distributed.timeout_seconds\): rank 1 did not finish") as err:
        launch(config, dc, "dpo", "tests.hang_worker", {}, tmp_path / "out")
    took = time.monotonic() - started
    assert 20 <= took < 60, took
    left = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path / "dpo-spec.json") in " ".join(p.info["cmdline"] or [])]
    assert left == [], left  # no rank, no launcher left
    assert str(tmp_path / "dpo-launch.log") in str(err.value)
