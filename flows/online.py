"""The `guidedrl online` flow: rounds of sample → guide → grade → update.

Each round is a Prefect subflow (the `guidedrl-run` flow) over the stages the
registry marks as online (rollouts → filter → explain, hint → rubric, grade →
materialize → grpo → eval; tasks/registry.py: `round_stages`), with
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

from prefect import flow, get_run_logger, task

from flows.pipeline import pipeline
from tasks.core.config import PolicyConfig
from tasks.registry import parse_config, round_stages


def round_config(raw_config: dict, policy: str | None, round_idx: int) -> dict:
    """The run config of one round: the previous round's checkpoint as the policy,
    the configured (initial) policy as the KL reference (`train.grpo.reference_model`,
    used with `kl_reference: initial`), and sampling seeds moved on (round 1 is exactly
    the configured run)."""
    raw = copy.deepcopy(raw_config)
    if policy is not None:
        initial = raw.get("policy", {}).get("model", PolicyConfig.model_fields["model"].default)
        grpo = raw.setdefault("train", {}).setdefault("grpo", {})
        grpo.setdefault("reference_model", initial)
        raw.setdefault("policy", {})["model"] = policy
    if round_idx > 1:
        for section in ("rollouts", "explain", "hint"):
            raw.setdefault(section, {})["seed"] = int(raw.get(section, {}).get("seed", 0)) + 1000 * (round_idx - 1)
    return raw


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
    policy: str | None = None
    history = []
    for r in range(1, rounds + 1):
        raw = round_config(raw_config, policy, r)
        results = pipeline.with_options(name="guidedrl-round", flow_run_name=f"round-{r}")(
            raw_config=raw, base_dir=base_dir, workspace=workspace, stages=round_stages(), run_record=run_record,
            record_prefix=f"round-{r}/")
        policy = results["grpo"]["path"] + "/checkpoint"
        history.append({"round": r, "policy": policy, "results": results})
        get_run_logger().info("round %d/%d: checkpoint %s", r, rounds, policy)
    if run_record:
        get_run_logger().info("frontier (stuck set by round, what got problems out): %s", frontier(run_record))
    return history
