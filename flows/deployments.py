"""Deployable flows and their registration (`guidedrl deploy`).

`data_generation` reads its config file *when it runs* (edits take effect on the
next scheduled run), runs the pipeline up to the training datasets with a run
record and report — the nightly job. `training` runs DPO, the online GRPO round
and eval on demand.

`register` creates (or updates) a process work pool and the two deployments
against the Prefect server in PREFECT_API_URL; the code is taken from this
checkout (`flow.from_source(<repo>, entrypoint)`), which a process worker on the
same machine or a shared file system runs. infra/prefect.yaml is the same
thing for `prefect deploy --all`.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: the nightly job: everything up to the training datasets (materialize brings what it reads along)
DATA_STAGES = ["materialize"]
#: on demand: the training stages and eval (their data stages come from the store)
TRAINING_STAGES = ["dpo", "grpo", "eval"]


def _run(config_path: str, base_dir: str | None, workspace: str | None, stages: list[str], command: str) -> dict:
    from flows.pipeline import pipeline
    from tasks.core.config import read_yaml
    from tasks.registry import parse_config, select_stages
    from tasks.report.runs import RunRecord

    path = Path(config_path).resolve()
    base = str(Path(base_dir or path.parent).resolve())
    raw = read_yaml(path)
    config = parse_config(raw, where=str(path), base_dir=Path(base))
    ws = config.workspace_dir(workspace)
    to_run = select_stages(stages, config=config)
    record = RunRecord.create(ws, command, raw, base, to_run)
    with record.running():
        results = pipeline(raw_config=raw, base_dir=base, workspace=str(ws), stages=to_run, run_record=str(record.path))
    get_run_logger().info("run %s completed; report %s", record.run_id, record.dir / "report.html")
    return {"run_id": record.run_id, "outputs": {s: r["path"] for s, r in results.items()}}


@flow(name="guidedrl-data")
def data_generation(config_path: str, base_dir: str | None = None, workspace: str | None = None, stages: list[str] | None = None) -> dict:
    """Nightly data generation: curation → rollouts → guidance → grading → training datasets."""
    return _run(config_path, base_dir, workspace, stages or DATA_STAGES, "deployment:data")


@flow(name="guidedrl-training")
def training(config_path: str, base_dir: str | None = None, workspace: str | None = None, stages: list[str] | None = None) -> dict:
    """DPO, an online GRPO round and eval on the latest datasets (their upstream stages come from the store)."""
    return _run(config_path, base_dir, workspace, stages or TRAINING_STAGES, "deployment:training")


def register(config_path: Path, work_pool: str, cron: str, workspace: str | None = None, timezone: str = "UTC",
             stages: list[str] | None = None, base_dir: Path | None = None) -> list[str]:
    """Create the work pool if needed and register both deployments; returns their names."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.exceptions import ObjectAlreadyExists

    async def ensure_pool():
        async with get_client() as client:
            try:
                await client.create_work_pool(WorkPoolCreate(name=work_pool, type="process"))
            except ObjectAlreadyExists:
                pass

    asyncio.run(ensure_pool())
    params = {"config_path": str(Path(config_path).resolve()), "base_dir": str(Path(base_dir or Path.cwd()).resolve()),
              "workspace": str(Path(workspace).resolve()) if workspace else None}
    names = []
    for fn, name, schedule in ((data_generation, "nightly-data", CronSchedule(cron=cron, timezone=timezone)),
                               (training, "training", None)):
        remote = fn.from_source(source=str(PROJECT_ROOT), entrypoint=f"flows/deployments.py:{fn.fn.__name__}")
        remote.deploy(name=name, work_pool_name=work_pool, parameters={**params, "stages": stages if fn is data_generation else None},
                      schedules=[schedule] if schedule else None, build=False, push=False, print_next_steps=False,
                      description=fn.__doc__, tags=["guidedrl"])
        names.append(f"{fn.name}/{name}")
    return names
