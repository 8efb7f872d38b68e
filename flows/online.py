"""The `guidedrl online` flow: rounds of sample → guide → grade → update.

Each round is a Prefect subflow (the `guidedrl-run` flow) over the stages the
registry marks as online (rollouts → filter → explain, hint → rubric, grade →
materialize → grpo → eval; tasks/registry.py: `round_stages`) that the update
reads — a guidance stage whose output the config's update does not use is left
out (`select_stages(..., only_used=True)`: plain GRPO runs no guidance) —, with
`policy.model` set to the checkpoint the previous round's `grpo` stage wrote
(round 1 starts from the configured policy). Every round's datasets and
checkpoint are stage outputs in the store, keyed by what they are made of — so
a run killed in round k, started again, finds rounds 1..k−1 and the finished
stages of round k in the store and resumes where it stopped.

After the last round, the run's frontier — per problem and round: pass rate, in the
stuck set or not, what each guidance verified — goes into the store as a `frontier`
dataset (`guidedrl frontier RUN_ID` prints it).
"""

from __future__ import annotations

import copy
from pathlib import Path

from prefect import flow, get_run_logger, task

from flows.pipeline import pipeline
from tasks.core.config import PolicyConfig
from tasks.models import serving
from tasks.registry import parse_config, round_stages, select_stages


def round_config(raw_config: dict, policy: str | None, round_idx: int, served: dict | None = None) -> dict:
    """The run config of one round: the previous round's checkpoint as the policy,
    the configured (initial) policy as the KL reference (`train.grpo.reference_model`,
    used with `kl_reference: initial`), `prefix.round` set, and sampling seeds moved on (round 1 is exactly
    the configured run). A served policy (backend openai) keeps its server: ``served``
    (tasks/models/serving.follow) says which checkpoint it now serves, and under what name;
    with LoRA following, the round continues the previous round's adapter."""
    raw = copy.deepcopy(raw_config)
    if policy is not None:
        p = raw.setdefault("policy", {})
        initial = p.get("checkpoint") or p.get("model", PolicyConfig.model_fields["model"].default)
        grpo = raw.setdefault("train", {}).setdefault("grpo", {})
        grpo.setdefault("reference_model", initial)
        if p.get("backend") == "openai":
            p.pop("policy_id", None)  # the rows are named by the checkpoint the server now serves
            p.update(served or {"checkpoint": policy})
            if p.get("serve", {}).get("follow") == "lora":
                grpo["lora_adapter"] = str(Path(policy) / "adapter")
        else:
            p["model"] = policy
    if round_idx > 1:
        for section in ("rollouts", "explain", "hint", "prefix", "self_hint"):
            raw.setdefault(section, {})["seed"] = int(raw.get(section, {}).get("seed", 0)) + 1000 * (round_idx - 1)
        raw["prefix"]["round"] = round_idx  # the share of the reference a prefix shows falls by round (prefix.fractions)
    return raw


@task(name="follow-checkpoint", cache_policy=None)
def follow_checkpoint(raw: dict, base_dir: str, workspace: str, checkpoint: str) -> dict:
    """The served policy follows the round's checkpoint (tasks/models/serving.py) before the next round samples."""
    config = parse_config(raw, where="run config", base_dir=base_dir)
    return serving.follow(config.policy, Path(checkpoint), Path(workspace) / "logs", cwd=Path(base_dir))


@task(name="start-serving", cache_policy=None)
def start_serving(raw: dict, base_dir: str, workspace: str) -> None:
    """follow: restart — the server serves the initial checkpoint before round 1 (started by the command if not)."""
    from tasks.models.policy import checkpoint_dir

    config = parse_config(raw, where="run config", base_dir=base_dir)
    serving.start(config.policy, checkpoint_dir(config), Path(workspace) / "logs", cwd=Path(base_dir))


@task(name="frontier", cache_policy=None)
def frontier(run_record: str) -> str:
    """The run's frontier (tasks/report/frontier.py), written into the store and noted in the run record."""
    from tasks.report.frontier import record_frontier
    from tasks.report.runs import RunRecord

    return str(record_frontier(RunRecord.open(run_record)).path)


@flow(name="guidedrl-online")
def online(raw_config: dict, base_dir: str, workspace: str, rounds: int | None = None, run_record: str | None = None) -> list[dict]:
    config = parse_config(raw_config, where="run config", base_dir=base_dir)
    rounds = rounds or config.train.grpo.rounds
    stages = select_stages(round_stages(), config=config, only_used=True)  # the guidance the update reads, no more
    serving.check_following(config, rounds)
    policy: str | None = None
    served: dict | None = None
    history = []
    try:
        if config.policy.backend == "openai" and rounds > 1:
            start_serving(raw_config, base_dir, workspace)
        for r in range(1, rounds + 1):
            raw = round_config(raw_config, policy, r, served)
            results = pipeline.with_options(name="guidedrl-round", flow_run_name=f"round-{r}")(
                raw_config=raw, base_dir=base_dir, workspace=workspace, stages=stages, run_record=run_record,
                record_prefix=f"round-{r}/")
            policy = results["grpo"]["path"] + "/checkpoint"
            history.append({"round": r, "policy": policy, "results": results})
            get_run_logger().info("round %d/%d: checkpoint %s", r, rounds, policy)
            if r < rounds and config.policy.backend == "openai":
                served = follow_checkpoint(raw, base_dir, workspace, policy)
                get_run_logger().info("round %d/%d: the server now serves %s", r, rounds, served)
    finally:
        serving.stop_owned()
    if run_record:
        get_run_logger().info("frontier (stuck set by round, what got problems out): %s", frontier(run_record))
    return history
