"""The `guidedrl` command line.

    guidedrl quickstart [--workspace DIR]
    guidedrl run CONFIG [--stages a,b] [--workspace DIR] [--set key=value ...]
    guidedrl online CONFIG [--rounds N] [--workspace DIR] [--set key=value ...]
    guidedrl config show CONFIG [--set key=value ...]
    guidedrl datasets ls [--workspace DIR]
    guidedrl datasets show PATH [--rows N]
    guidedrl datasets publish PATH URL | pull URL PATH | diff A B
    guidedrl runs ls | runs show ID        guidedrl rerun ID --stage NAME [--downstream]
    guidedrl gc --keep N [--dry-run]
    guidedrl deploy CONFIG [--work-pool P] [--cron "0 2 * * *"]
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

PROJECT_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_CONFIG = PROJECT_ROOT / "configs" / "quickstart.yaml"

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    help="guidedrl: build guided RL training data (ExPO, LTE, ExpRL) for reasoning models, as Prefect flows.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect run configs.", no_args_is_help=True)
datasets_app = typer.Typer(help="List and inspect stage outputs (Parquet datasets with manifests).", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(datasets_app, name="datasets")

WorkspaceOpt = typer.Option(None, "--workspace", "-w", help="Workspace directory (store/ and runs/). Default: the config's `workspace`, else ./workspace.")


def _fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def _user_errors():
    from tasks.config import ConfigError
    from tasks.curate import SourceError
    from tasks.schemas import SchemaError

    from tasks.judge import JudgeError
    from tasks.share import ShareError

    return (ConfigError, SourceError, SchemaError, JudgeError, ShareError, FileNotFoundError, ValueError)


def _describe(result: dict) -> str:
    s = result.get("summary", {})
    if result["stage"] == "curate":
        reasons = ", ".join(f"{k}: {v}" for k, v in s.get("rejected_by_reason", {}).items())
        return f"{s.get('problems')} problems ({s.get('train')} train, {s.get('eval')} eval); {s.get('rejected')} rejected" + (f" ({reasons})" if reasons else "")
    if result["stage"] == "rollouts":
        return f"{s.get('samples')} samples of {s.get('problems')} problems; {s.get('all_fail_problems')} problems with every sample wrong"
    if result["stage"] == "filter":
        lo, hi = s.get("band", [None, None])
        return f"kept {s.get('kept')} of {s.get('rolled_out')} problems with pass rate in [{lo}, {hi}] {s.get('kept_by_level')}"
    if result["stage"] == "explain":
        return (f"ExPO explained {s.get('unlocked_problems')} of {s.get('stuck_problems')} stuck problems "
                f"({s.get('unlocked_fraction', 0):.1%}) with a verified explanation; {s.get('kept')} kept, "
                f"{s.get('kept_with_all_steps_right')} with every step right")
    if result["stage"] == "hint":
        return (f"LTE unlocked {s.get('unlocked_problems')} of {s.get('stuck_problems')} stuck problems "
                f"({s.get('unlocked_fraction', 0):.1%}) with a verified hinted sample; {s.get('kept')} kept, "
                f"{s.get('kept_with_all_steps_right')} with every step right")
    if result["stage"] == "rubric":
        if not s.get("enabled"):
            return "off (judge.rubric: false)"
        return f"{s.get('rubrics')} of {s.get('problems')} problems have a rubric ({s.get('items')} items, {s.get('backend')})"
    if result["stage"] == "grade":
        return (f"{s.get('graded')} of {s.get('traces')} traces graded by {s.get('judge')} ({s.get('mode')} mode), "
                f"parse rate {s.get('parse_rate')}")
    if result["stage"] == "materialize":
        g = s.get("grpo", {})
        return (f"dpo: {s.get('dpo', {}).get('pairs')} pairs {s.get('dpo', {}).get('by_kind')}; grpo: {g.get('rows')} rows in "
                f"{g.get('groups_kept')} groups ({g.get('uniform_groups_dropped')} uniform groups dropped, "
                f"{g.get('lte_replaced_samples')} samples replaced by LTE); sft: {s.get('sft', {}).get('rows')} rows")
    if result["stage"] == "dpo":
        b, a = s.get("heldout_before", {}), s.get("heldout_after", {})
        if not b.get("pairs"):
            return f"trained on {s.get('train_pairs')} pairs"
        return (f"trained on {s.get('train_pairs')} pairs; held-out DPO loss {b.get('loss'):.3f} -> {a.get('loss'):.3f}, "
                f"log-ratio margin {b.get('log_ratio_margin'):.2f} -> {a.get('log_ratio_margin'):.2f}")
    if result["stage"] == "grpo":
        k = s.get("rows_by_kind", {})
        return (f"{s.get('steps')} update steps over {s.get('rows')} samples ({k.get('plain')} plain, {k.get('guided')} guided, "
                f"{k.get('explain')} explanations, {k.get('masked')} masked); loss {s.get('first_loss', 0):.4f} -> {s.get('last_loss', 0):.4f}")
    if result["stage"] == "eval":
        return f"{s.get('problems')} eval problems x {s.get('n')} samples: see the before/after table"
    return json.dumps(s)[:120]


def _print_eval_table(s: dict) -> None:
    """pass@1 / pass@n by level, base policy vs the trained checkpoint."""
    tables = s.get("pass", {})
    if not tables:
        return
    n = s.get("n")
    table = Table(title=f"eval split, before/after training (pass@1 / pass@{n}, {n} samples per problem)")
    table.add_column("level")
    table.add_column("problems", justify="right")
    for label in tables:
        table.add_column(f"{label}  pass@1 / pass@{n}", justify="right")
    for level in next(iter(tables.values())):
        cells = [f"{t[level]['pass@1']:.3f} / {t[level][f'pass@{n}']:.3f}" if level in t else "-" for t in tables.values()]
        table.add_row(level, str(next(iter(tables.values()))[level]["problems"]), *cells)
    console.print(table)


def _print_grade_summary(s: dict) -> None:
    table = Table(title=f"judge: {s.get('judge')}, {s.get('mode')} mode")
    table.add_column("measure")
    table.add_column("value", justify="right")
    req = s.get("judge_requests", {})
    rows = [
        ("traces graded / all", f"{s.get('graded')} / {s.get('traces')}"),
        ("parse rate", str(s.get("parse_rate"))),
        ("not graded, by reason", ", ".join(f"{k}: {v}" for k, v in s.get("not_graded_by_reason", {}).items()) or "-"),
        ("outcome score histogram", "  ".join(f"{k}: {v}" for k, v in s.get("outcome_histogram", {}).items()) or "-"),
        ("mean outcome score (right answer / wrong)", f"{s.get('mean_outcome_if_correct')} / {s.get('mean_outcome_if_wrong')}"),
        ("mean step score", str(s.get("mean_step_score"))),
        ("agreement of outcome >= 0.75 with a right answer", str(s.get("agreement_with_correctness"))),
        ("requests sent / cache hits / retries / format reminders",
         f"{req.get('requests', 0)} / {req.get('cache_hits', 0)} / {req.get('retries', 0)} / {req.get('reminders', 0)}"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def _print_pass_table(title: str, table_data: dict) -> None:
    """A pass@k table by level: {level: {problems, n, all_fail, pass@1, ...}}."""
    if not table_data:
        return
    first = next(iter(table_data.values()))
    ks = [k for k in first if k.startswith("pass@") and k.split("@")[1] in ("1", "8", "64", str(first["n"]))]
    steps = "right_answer_and_steps" in first
    table = Table(title=title)
    for col in ["level", "problems", "samples", *ks, "all wrong"] + (["right steps"] if steps else []):
        table.add_column(col, justify="right" if col != "level" else "left")
    for level, row in table_data.items():
        cells = [level, str(row["problems"]), str(row["n"]), *[f"{row[k]:.3f}" for k in ks], str(row["all_fail"])]
        table.add_row(*cells, *([f"{row['right_answer_and_steps']:.3f}"] if steps else []))
    console.print(table)


def _print_results(results: dict, todo: list[str]) -> None:
    from tasks.config import STAGES as STAGES_ALL

    table = Table(title="stages", show_lines=False)
    table.add_column("stage", style="bold")
    table.add_column("status")
    table.add_column("result")
    table.add_column("output")
    for stage, r in results.items():
        status = {"computed": "[green]computed[/]", "reused": "[cyan]reused (no work)[/]", "cached": "[cyan]cached (no work)[/]"}[r["status"]]
        table.add_row(stage, status, _describe(r), r["path"])
    console.print(table)
    if "rollouts" in results:
        _print_pass_table("pass rates of the policy's rollouts, by level", results["rollouts"]["summary"].get("pass", {}))
    if "grade" in results:
        _print_grade_summary(results["grade"]["summary"])
    if "grpo" in results:
        g = results["grpo"]["summary"]
        console.print(f"online GRPO round: {g.get('steps')} update steps on {g.get('rows')} samples {g.get('rows_by_kind')} "
                      f"-> {results['grpo']['path']}/checkpoint")
    if "eval" in results:
        _print_eval_table(results["eval"]["summary"])
    for stage, r in results.items():
        if r["status"] != "computed":
            console.print(f"{stage}: output already in the store for this config and inputs — nothing was recomputed.")
    if todo:
        console.print(f"[yellow]Stages still to come (not built yet):[/] {', '.join(todo)}")
    elif set(results) >= set(STAGES_ALL):
        console.print("Every stage of the pipeline ran (none is still to come).")


def _execute(raw: dict, base_dir: Path, workspace: Optional[Path], stages: Optional[list[str]], command: str = "run",
             force: Optional[list[str]] = None, rerun_of: Optional[str] = None, present: Optional[list[str]] = None) -> None:
    """Run the pipeline flow with a run record; a failure ends in one line that names the stage and the fix.

    ``present``: the stages of the run being re-run (an optional upstream stage such as
    dpo for eval comes along when it ran); default: those whose output is in the store."""
    from flows.pipeline import pipeline, select_stages, stored_optional
    from tasks.config import parse_config
    from tasks.runs import RunRecord

    config = parse_config(raw, base_dir=base_dir)
    ws = config.workspace_dir(workspace)
    if present is None:
        present = stored_optional(stages, config, str(ws))
    to_run, todo = select_stages(stages, present)
    record = RunRecord.create(ws, command, raw, str(base_dir.resolve()), to_run, rerun_of=rerun_of)
    console.print(f"workspace: {ws}\nrun: {record.run_id} (record: {record.path})")
    try:
        with record.running():
            results = pipeline(raw_config=raw, base_dir=str(base_dir.resolve()), workspace=str(ws), stages=to_run,
                               force=force, run_record=str(record.path))
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        closed = RunRecord.open(record.path)
        stage = closed.data.get("failed_stage")
        hint = f" — after fixing the cause: guidedrl rerun {record.run_id} --stage {stage} --downstream --workspace {ws}" if stage else ""
        _fail(f"run {record.run_id} failed: {closed.data['error']}{hint}")
    _print_results(results, todo)
    console.print(f"run {record.run_id} completed; report: {record.dir / 'report.html'}")


def _dry_run(raw: dict, base_dir: Path, workspace: Optional[Path], stages: Optional[list[str]]) -> None:
    """Count what the judge stages would send; run nothing, send nothing."""
    from flows.pipeline import select_stages
    from flows.stages import STAGE_MODULES, stored_outputs
    from tasks.config import UPSTREAM, parse_config
    from tasks.store import Store

    config = parse_config(raw, base_dir=base_dir)
    ws = config.workspace_dir(workspace)
    to_run, _ = select_stages(stages)
    judged = [s for s in to_run if hasattr(STAGE_MODULES[s], "dry_run")]
    if not judged:
        console.print("dry run: none of these stages sends judge requests; nothing to count.")
        return
    for stage in judged:
        found, missing = stored_outputs(config, str(ws), list(UPSTREAM[stage]))
        note = ""
        if missing == "rubric":  # grading can be counted before the rubrics exist
            missing = None
            if config.judge.backend == "openai" and config.judge.rubric:
                note = " (counted before the rubrics exist: their items will make the prompts somewhat longer)"
        if missing:
            sends = "its own count is above" if missing in judged else "it sends no judge requests"
            console.print(f"[yellow]{stage}:[/] cannot count yet — it reads the output of `{missing}`, which has not run with this "
                          f"config in {ws}. Run `guidedrl run CONFIG --stages {missing}` first ({sends}).")
            continue
        p = STAGE_MODULES[stage].dry_run(config, Store(ws), found)
        if p["requests"] == 0:
            console.print(f"{stage}: 0 requests to send ({p.get('note') or str(p.get('cached', 0)) + ' answers cached'})")
            continue
        over = p.get("max_requests") is not None and p["requests"] > p["max_requests"]
        console.print(f"{stage}: would send {p['requests']} requests to {p['endpoint']} ({p['cached']} answers already cached), "
                      f"about {p['prompt_tokens']:,} prompt tokens and at most {p['max_completion_tokens']:,} completion tokens"
                      + (f" — [red]over judge.max_requests = {p['max_requests']}: the stage would refuse to start[/]" if over else "")
                      + f". Parse failures add one reminder request each{note}.")
    console.print("dry run: nothing was sent.")


def _parse_stages(stages: Optional[str]) -> Optional[list[str]]:
    return [s.strip() for s in stages.split(",") if s.strip()] if stages else None


@app.command()
def quickstart(workspace: Optional[Path] = typer.Option(Path("workspace"), "--workspace", "-w", help="Workspace directory.")):
    """Run the whole pipeline on the embedded defaults (tiny problems, no GPU, no network).

    Runs every stage that exists in this version and lists those still to come.
    """
    from tasks.config import read_yaml

    if not QUICKSTART_CONFIG.is_file():
        _fail(f"{QUICKSTART_CONFIG}: the embedded quickstart config is missing; run from a clone of the repository (pip install -e .)")
    try:
        _execute(read_yaml(QUICKSTART_CONFIG), PROJECT_ROOT, workspace, None)
    except _user_errors() as exc:
        _fail(str(exc))


@app.command()
def run(
    config: Path = typer.Argument(..., help="YAML config file (see configs/quickstart.yaml)."),
    stages: Optional[str] = typer.Option(None, "--stages", help="Comma-separated stages to run (default: all). Stages: curate, rollouts, filter, explain, hint, rubric, grade, materialize, dpo, grpo, eval."),
    workspace: Optional[Path] = WorkspaceOpt,
    set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set problems.eval_fraction=0.3 (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print how many judge requests (and roughly how many tokens) the rubric and grade stages would send; run and send nothing."),
):
    """Run the pipeline (a Prefect flow) on CONFIG. Finished stage outputs are reused."""
    from tasks.config import apply_overrides, read_yaml

    try:
        raw = apply_overrides(read_yaml(config), set_)
        (_dry_run if dry_run else _execute)(raw, Path.cwd(), workspace, _parse_stages(stages))
    except _user_errors() as exc:
        _fail(str(exc))


@app.command()
def deploy(
    config: Path = typer.Argument(..., help="The YAML config the scheduled runs use (read at each run, so edits take effect)."),
    work_pool: str = typer.Option("guidedrl", "--work-pool", help="Process work pool to create or use."),
    cron: str = typer.Option("0 2 * * *", "--cron", help="Schedule of the nightly data-generation deployment."),
    timezone: str = typer.Option("UTC", "--timezone"),
    workspace: Optional[Path] = WorkspaceOpt,
    stages: Optional[str] = typer.Option(None, "--stages", help="Stages of the data deployment (default: curate .. materialize)."),
):
    """Register the deployments (nightly data generation, on-demand training) on the Prefect server in PREFECT_API_URL.

    Then start a worker: prefect worker start --pool <work-pool>. Schedules need a real server
    (prefect server start, or Prefect Cloud); the temporary one of a plain `guidedrl run` does not run them."""
    from prefect.settings import PREFECT_API_URL

    from flows.deployments import register

    if not PREFECT_API_URL.value():
        _fail("no Prefect server configured: start one (prefect server start) and set PREFECT_API_URL, e.g. "
              "prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api — schedules do not run on a temporary server")
    try:
        names = register(config, work_pool, cron, str(workspace) if workspace else None, timezone, _parse_stages(stages))
    except _user_errors() as exc:
        _fail(str(exc))
    console.print(f"registered on {PREFECT_API_URL.value()}: {', '.join(names)} (work pool {work_pool}, nightly cron {cron!r} {timezone})")
    console.print(f"start a worker to run them: prefect worker start --pool {work_pool}")


runs_app = typer.Typer(help="Run records: what each run did, kept after its process is gone.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")


@runs_app.command("ls")
def runs_ls(workspace: Path = typer.Option(Path("workspace"), "--workspace", "-w", help="Workspace directory.")):
    """Runs of the workspace, newest first."""
    from tasks.runs import list_runs

    runs = list_runs(workspace)
    if not runs:
        console.print(f"no runs in {Path(workspace).resolve() / 'runs'}")
        return
    table = Table(title=f"runs in {Path(workspace).resolve() / 'runs'}")
    for col in ("run", "command", "status", "started", "stages", "error"):
        table.add_column(col)
    for r in runs:
        d = r.data
        done = sum(s.get("status") in ("computed", "reused", "cached") for s in d["stages"].values())
        table.add_row(r.run_id, d["command"] + (f" (rerun of {d['rerun_of']})" if d.get("rerun_of") else ""), d["status"],
                      d["started"], f"{done}/{len(d['stages'])}", d.get("error") or "")
    console.print(table)


@runs_app.command("show")
def runs_show(run_id: str = typer.Argument(..., help="A run id (guidedrl runs ls)."),
              workspace: Path = typer.Option(Path("workspace"), "--workspace", "-w", help="Workspace directory.")):
    """One run: each stage's status, time, output and error."""
    from tasks.runs import RunRecord

    try:
        r = RunRecord.load(workspace, run_id)
    except FileNotFoundError as exc:
        _fail(str(exc))
    d = r.data
    console.print(f"[bold]run {r.run_id}[/] — {d['command']}, {d['status']}; started {d['started']}, finished {d.get('finished')}")
    if d.get("rerun_of"):
        console.print(f"rerun of {d['rerun_of']}")
    if d.get("error"):
        console.print(f"[red]error:[/] {d['error']}")
    table = Table()
    for col in ("stage", "status", "seconds", "output", "error"):
        table.add_column(col)
    for name, s in d["stages"].items():
        table.add_row(name, s.get("status", ""), str(s.get("seconds", "")), s.get("path", ""), s.get("error", ""))
    console.print(table)
    report = r.dir / "report.html"
    if report.is_file():
        console.print(f"report: {report}")


@app.command()
def rerun(
    run_id: str = typer.Argument(..., help="The run to take the config and inputs from (guidedrl runs ls)."),
    stage: str = typer.Option(..., "--stage", help="The stage to run again."),
    downstream: bool = typer.Option(False, "--downstream", help="Also run again the stages of that run that depend on it."),
    workspace: Path = typer.Option(Path("workspace"), "--workspace", "-w", help="Workspace directory."),
):
    """Run one stage of an earlier run again (and, with --downstream, what depends on it), reusing every other
    finished stage output. Works in a fresh process long after the run: everything comes from its run record."""
    from tasks.config import STAGES
    from tasks.runs import RunRecord, downstream_of

    try:
        r = RunRecord.load(workspace, run_id)
        requested = [s.split("/")[-1] for s in r.data["stages_requested"]]
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages are: {', '.join(STAGES)}")
        if stage not in requested:
            raise ValueError(f"run {run_id} did not run stage {stage!r}; it ran: {', '.join(requested)}")
        again = [stage] + (downstream_of(stage, requested) if downstream else [])
        console.print(f"rerun of {run_id}: running {', '.join(again)} again; other stages come from the store")
        _execute(r.data["config"], Path(r.data["base_dir"]), workspace, again, command="rerun",
                 force=again, rerun_of=run_id, present=requested)
    except _user_errors() as exc:
        _fail(str(exc))


@app.command()
def gc(
    workspace: Path = typer.Option(Path("workspace"), "--workspace", "-w", help="Workspace directory."),
    keep: int = typer.Option(..., "--keep", help="Keep the outputs of this many newest runs (and of runs still going)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be removed; remove nothing."),
):
    """Remove stage outputs that no kept run refers to, and what crashed writers left behind."""
    from tasks.runs import gc as gc_store

    out = gc_store(workspace, keep, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    console.print(f"kept {out['outputs_kept']} outputs of runs {', '.join(out['runs_kept']) or '(none)'}; {verb} "
                  f"{len(out['outputs_removed'])} outputs ({out['bytes_freed'] / 1e6:.1f} MB) and {len(out['leftovers_removed'])} leftovers")
    for p in out["outputs_removed"] + out["leftovers_removed"]:
        console.print(f"  {p}")


@app.command()
def online(
    config: Path = typer.Argument(..., help="YAML config file (see configs/quickstart.yaml)."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="Rounds of rollouts -> guidance -> grading -> materialize -> update -> eval (default: train.grpo.rounds)."),
    workspace: Optional[Path] = WorkspaceOpt,
    set_: list[str] = typer.Option([], "--set", help="Override a config key (repeatable)."),
):
    """Online GRPO with guidance: each round a Prefect subflow; the new checkpoint feeds the next round.

    A run that was killed resumes at the round (and the stage) where it stopped: finished stage outputs are reused.
    """
    from flows.online import online as online_flow
    from tasks.config import apply_overrides, parse_config, read_yaml
    from tasks.runs import RunRecord

    try:
        raw = apply_overrides(read_yaml(config), set_)
        cfg = parse_config(raw, base_dir=Path.cwd())
        ws = cfg.workspace_dir(workspace)
        record = RunRecord.create(ws, "online", raw, str(Path.cwd().resolve()), [])
        console.print(f"workspace: {ws}\nrun: {record.run_id} (record: {record.path})")
    except _user_errors() as exc:
        _fail(str(exc))
    try:
        with record.running():
            history = online_flow(raw_config=raw, base_dir=str(Path.cwd().resolve()), workspace=str(ws), rounds=rounds,
                                  run_record=str(record.path))
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        _fail(f"run {record.run_id} failed: {RunRecord.open(record.path).data['error']} — `guidedrl online` again resumes where it stopped")
    table = Table(title="online GRPO: eval split after each round (pass@1 / pass@n)")
    table.add_column("round")
    table.add_column("stages computed / reused")
    levels = sorted({lvl for h in history for lvl in h["results"]["eval"]["summary"]["pass"].get("grpo", {})})
    for lvl in levels:
        table.add_column(lvl, justify="right")
    for h in history:
        res = h["results"]
        n = res["eval"]["summary"]["n"]
        done = sum(r["status"] == "computed" for r in res.values())
        cells = []
        for lvl in levels:
            t = res["eval"]["summary"]["pass"].get("grpo", {}).get(lvl)
            cells.append(f"{t['pass@1']:.3f} / {t[f'pass@{n}']:.3f}" if t else "-")
        table.add_row(str(h["round"]), f"{done} / {len(res) - done}", *cells)
    console.print(table)
    console.print(f"last checkpoint: {history[-1]['policy']}\nrun {record.run_id} completed; report: {record.dir / 'report.html'}")


@app.command()
def bootstrap(
    out: Path = typer.Option(PROJECT_ROOT / "data" / "models" / "tiny-policy", "--out", help="Where to write the checkpoint."),
    seed: int = typer.Option(0, help="Seed: the same seed reproduces the checkpoint."),
    steps: Optional[int] = typer.Option(None, help="Training steps (default: TinyPolicyConfig.steps)."),
    hard_fraction: Optional[float] = typer.Option(None, help="How often the hard level appears in training."),
    eval_problems: int = typer.Option(40, help="Problems per level for the pass@k report."),
    eval_samples: int = typer.Option(64, help="Samples per problem for the pass@k report."),
):
    """Build the tiny CPU policy from scratch (character tokenizer + small Llama), train it and report pass@k."""
    from flows.bootstrap import bootstrap as bootstrap_flow

    cfg = {"seed": seed}
    if steps is not None:
        cfg["steps"] = steps
    if hard_fraction is not None:
        cfg["hard_fraction"] = hard_fraction
    info = bootstrap_flow(out_dir=str(out), cfg=cfg, problems_per_level=eval_problems, n=eval_samples)
    console.print(f"tiny policy written to {out} ({info['parameters'] / 1e6:.2f}M parameters, {info['train_seconds']:.0f}s of training)")
    _print_pass_table("plain prompt (the question alone)", info["eval"]["plain"])
    _print_pass_table("explain prompt (the answer given)", info["eval"]["explain"])


@config_app.command("show")
def config_show(
    config: Path = typer.Argument(..., help="YAML config file."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key (repeatable)."),
):
    """Print the resolved config (defaults filled in, secrets masked)."""
    import yaml

    from tasks.config import apply_overrides, masked, parse_config, read_yaml

    try:
        raw = apply_overrides(read_yaml(config), set_)
        cfg = parse_config(raw, where=str(config))
    except _user_errors() as exc:
        _fail(str(exc), 2)
    console.print(yaml.safe_dump(masked(cfg.model_dump(mode="json")), sort_keys=False), highlight=False, markup=False)


@datasets_app.command("ls")
def datasets_ls(workspace: Path = typer.Option(Path("workspace"), "--workspace", "-w", help="Workspace directory.")):
    """List finished stage outputs and their datasets in the workspace store."""
    from tasks.store import Store

    outputs = Store(workspace).outputs()
    if not outputs:
        console.print(f"no stage outputs in {Path(workspace).resolve() / 'store'}")
        return
    table = Table(title=f"datasets in {Path(workspace).resolve() / 'store'}")
    for col in ("stage", "key", "dataset", "kind", "rows", "created", "path"):
        table.add_column(col)
    for out in outputs:
        for name, d in out.manifest.get("datasets", {}).items():
            table.add_row(out.stage, out.key, name, d["kind"], str(d["num_rows"]), out.manifest.get("created", ""), str(out.path / name))
    console.print(table)


@datasets_app.command("publish")
def datasets_publish(
    path: Path = typer.Argument(..., help="A dataset directory (manifest.json, README.md, data/), e.g. <workspace>/store/materialize/<key>/dpo."),
    url: str = typer.Argument(..., help="Where to: a directory, file://, or an fsspec URL (s3://... with s3fs installed)."),
):
    """Copy a dataset to a shared location (verified first; the manifest is written last)."""
    from tasks.share import publish

    try:
        m = publish(path, url)
    except _user_errors() as exc:
        _fail(str(exc))
    console.print(f"published {path} ({m.get('kind')}, {m.get('num_rows')} rows, {m.get('fingerprint')}) to {url}")
    console.print(f'load it without guidedrl: datasets.load_dataset("parquet", data_files="{url.rstrip("/")}/data/*.parquet")')


@datasets_app.command("pull")
def datasets_pull(
    url: str = typer.Argument(..., help="A published dataset: directory, file:// or fsspec URL."),
    path: Path = typer.Argument(..., help="A new local directory to put it in."),
    force: bool = typer.Option(False, "--force", help="Replace PATH if it exists."),
):
    """Fetch a published dataset; refused unless its bytes match its manifest's fingerprint. Only Parquet and JSON are read."""
    from tasks.share import pull

    try:
        m = pull(url, path, force=force)
    except _user_errors() as exc:
        _fail(str(exc))
    console.print(f"pulled {url} into {path} ({m.get('kind')}, {m.get('num_rows')} rows, fingerprint verified)")


@datasets_app.command("diff")
def datasets_diff(a: Path = typer.Argument(..., help="A dataset directory."), b: Path = typer.Argument(..., help="Another one.")):
    """Rows, schema and per-column statistics of two datasets, side by side."""
    from tasks.share import describe

    try:
        da, db = describe(a), describe(b)
    except _user_errors() as exc:
        _fail(str(exc))
    table = Table(title=f"A = {a}\nB = {b}")
    for col in ("", "A", "B"):
        table.add_column(col)

    def row(label, va, vb):
        mark = "" if va == vb else "[yellow]"
        table.add_row(f"{mark}{label}", str(va), str(vb))

    row("kind", da["kind"], db["kind"])
    row("rows", da["rows"], db["rows"])
    row("fingerprint", da["fingerprint"], db["fingerprint"])
    for name in dict.fromkeys([*da["schema"], *db["schema"]]):
        row(f"{name}: type", da["schema"].get(name, "(missing)"), db["schema"].get(name, "(missing)"))
        sa, sb = da["stats"].get(name, {}), db["stats"].get(name, {})
        for stat in dict.fromkeys([*sa, *sb]):
            fa, fb = sa.get(stat), sb.get(stat)
            fmt = (lambda v: f"{v:.4g}" if isinstance(v, float) else str(v))
            row(f"{name}: {stat}", fmt(fa), fmt(fb))
    console.print(table)
    if da["summary"] != db["summary"]:
        console.print("summaries differ:")
        console.print_json(json.dumps({"A": da["summary"], "B": db["summary"]}, default=str))


@datasets_app.command("show")
def datasets_show(
    path: Path = typer.Argument(..., help="A dataset directory, or a stage output directory (shows each dataset)."),
    rows: int = typer.Option(5, "--rows", "-n", help="How many first rows to print."),
):
    """Schema, row count, manifest and first rows of a dataset."""
    import polars as pl

    from tasks.store import read_dataset, read_manifest

    try:
        manifest = read_manifest(path)
        if "datasets" in manifest:  # a stage output: show each dataset
            console.print(f"[bold]stage output[/] {path} (stage {manifest['stage']}, key {manifest['stage_key']})")
            console.print_json(json.dumps(manifest.get("summary", {})))
            for name in manifest["datasets"]:
                datasets_show(path / name, rows)
            return
        table = read_dataset(path, verify=True)
    except _user_errors() as exc:
        _fail(str(exc))
    console.rule(f"[bold]{manifest.get('name', path.name)}[/] ({manifest.get('kind')}) — {table.num_rows} rows")
    console.print(f"path: {Path(path).resolve()}")
    console.print(f"fingerprint: {manifest.get('fingerprint')} (verified)")
    console.print(f"stage: {manifest.get('stage')} key {manifest.get('stage_key')} version {manifest.get('stage_version')}; created {manifest.get('created')}; guidedrl {manifest.get('package_version')}")
    console.print("schema:")
    for field in table.schema:
        console.print(f"  {field.name}: {field.type}{'' if field.nullable else ' (not null)'}", highlight=False)
    console.print("summary:")
    console.print_json(json.dumps(manifest.get("summary", {})))
    console.print("inputs:")
    console.print_json(json.dumps(manifest.get("inputs", {})))
    with pl.Config(fmt_str_lengths=40, tbl_cols=12, tbl_width_chars=console.width):
        print(pl.from_arrow(table.slice(0, rows)))


def main() -> None:
    # our loggers ("guidedrl.*") go through Prefect's handlers: console and run logs
    extra = os.environ.get("PREFECT_LOGGING_EXTRA_LOGGERS", "")
    if "guidedrl" not in extra.split(","):
        os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] = ",".join(x for x in (extra, "guidedrl") if x)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    logging.getLogger("guidedrl").setLevel(logging.INFO)
    app()


if __name__ == "__main__":
    main()
    sys.exit(0)
