"""Run records (`runs ls`, `runs show`) and `gc` of store outputs no kept run uses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from flows.cli.app import JsonOpt, app, console, fail, runs_app
from flows.cli.render import print_alignment, print_run, print_runs
from flows.errors import user_errors
from tasks.core.owner import Lease


@runs_app.command("ls")
def runs_ls(workspace: Path = typer.Option(Path("workspace"), "--workspace", "-w", help="Workspace directory."),
            as_json: bool = JsonOpt):
    """Runs of the workspace, newest first (full ids at any terminal width)."""
    from tasks.report.runs import list_runs

    runs = list_runs(workspace)
    if as_json:
        print(json.dumps([r.summary() for r in runs], indent=1))
        return
    if not runs:
        console.print(f"no runs in {Path(workspace).resolve() / 'runs'}")
        return
    print_runs(runs, f"runs in {Path(workspace).resolve() / 'runs'}")


@runs_app.command("show")
def runs_show(run_id: str = typer.Argument(..., help="A run id (guidedrl runs ls), or a prefix of it that names one run."),
              workspace: Path = typer.Option(Path("workspace"), "--workspace", "-w", help="Workspace directory."),
              as_json: bool = JsonOpt):
    """One run: each stage's status, time, output and error."""
    from tasks.report.runs import RunRecord

    try:
        r = RunRecord.load(workspace, run_id)
    except user_errors() as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps({**r.data, "status": r.status,
                          "stages": {n: {**s, "status": r.stage_status(n)} for n, s in r.data["stages"].items()}}, indent=1, default=str))
        return
    print_run(r)
    report = r.dir / "report.html"
    if report.is_file():
        console.print(f"report: {report}")



@runs_app.command("check")
def runs_check(run_id: str = typer.Argument(..., help="A run id (guidedrl runs ls), or a prefix of it that names one run."),
               workspace: Path = typer.Option(Path("workspace"), "--workspace", "-w", help="Workspace directory."),
               tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="The policy's tokenizer directory (default: the "
                                                        "run config's policy.tokenizer, else policy.model)."),
               max_rows: Optional[int] = typer.Option(None, "--max-rows", help="Check at most this many rows of each dataset "
                                                      "(the reference positions decode every prefix of a completion)."),
               as_json: bool = JsonOpt):
    """Token–text alignment of a run's outputs: per dataset, rows whose text is not what their token ids say.

    Checks: text (decode(completion_token_ids) is the completion), prompt (the prompt's ids: one BOS where the template
    writes it, special tokens as their ids), answer (extracted after the reasoning block, no special token text),
    steps (each token's ExpRL step from character positions), sequence (the grpo update's ids are the sampler's prompt
    ids and the sampled ids), trl (DPO pairs as TRL tokenizes them). Exits 1 when a row fails."""
    from tasks.report.alignment import CHECKS, check_run, total_failures
    from tasks.report.runs import RunRecord

    try:
        r = RunRecord.load(workspace, run_id)
        path, reports = check_run(r, tokenizer, max_rows)
    except user_errors() + (FileNotFoundError,) as exc:
        fail(str(exc))
    failures = total_failures(reports)
    if as_json:
        print(json.dumps({"run_id": r.run_id, "tokenizer": str(path), "failures": failures,
                          "datasets": [x.as_dict() for x in reports]}, indent=1))
    else:
        print_alignment(r.run_id, path, reports, CHECKS)
    if failures:
        raise typer.Exit(1)


@app.command()
def gc(
    workspace: Path = typer.Option(Path("workspace"), "--workspace", "-w", help="Workspace directory."),
    keep: int = typer.Option(..., "--keep", help="Keep the outputs of this many newest runs (and of runs still going)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be removed; remove nothing."),
    lease_seconds: float = typer.Option(Lease.lease_seconds, "--lease-seconds", help="Another host's leftover untouched this long is a dead "
                                        "writer's (the workspace's store.lease_seconds; on this host a pid says so at once)."),
):
    """Remove stage outputs that no kept run refers to, and what crashed writers left behind.

    On a shared workspace: another host's temporaries go only once their lease has expired, a work directory only
    while no process on any host holds its output's lock.

    Kept besides: the outputs whose sampled rows the next night would reuse (for each problem of the kept runs'
    policies, the newest rollouts / explain / hint output holding its rows), so a nightly job's cost stays what changed."""
    from tasks.core import owner
    from tasks.report.runs import gc as gc_store

    owner.configure(lease_seconds=lease_seconds)
    out = gc_store(workspace, keep, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    reuse = out["outputs_kept_for_reuse"]
    console.print(f"kept {out['outputs_kept']} outputs of runs {', '.join(out['runs_kept']) or '(none)'}"
                  f"{f' (of them {len(reuse)} older ones that hold the newest rows of problems the next night reuses)' if reuse else ''}; {verb} "
                  f"{len(out['outputs_removed'])} outputs ({out['bytes_freed'] / 1e6:.1f} MB) and {len(out['leftovers_removed'])} leftovers")
    for p in out["outputs_removed"] + out["leftovers_removed"]:
        console.print(f"  {p}")


@app.command()
def frontier(run_ids: list[str] = typer.Argument(..., help="One run id (or a prefix naming one run), or several: nightly runs of the "
                                                 "same problem set, oldest first (their rounds are read in that order)."),
             workspace: Path = typer.Option(Path("workspace"), "--workspace", "-w", help="Workspace directory."),
             problems: int = typer.Option(20, "--problems", help="How many of the problems that left the stuck set to list."),
             as_json: bool = JsonOpt):
    """The frontier of a run (or of nightly runs): the stuck set by round, which problems left it and when, and which
    guidance (explain / hint / judge partial credit) first produced a verified sample for them.

    Built from the run's round outputs on first use and kept in the store as a `frontier` Parquet dataset
    (`guidedrl online` builds it when its last round ends)."""
    import polars as pl

    from flows.cli.render import print_frontier
    from tasks.report.frontier import STAGE, by_round, combine, record_frontier
    from tasks.report.html import write_report
    from tasks.report.runs import RunRecord

    try:
        records = [RunRecord.load(workspace, r) for r in run_ids]
        outputs = []
        for rec in records:
            if rec.status == "running":
                raise ValueError(f"run {rec.run_id} is still running: its frontier is built when it ends (or run this once it has)")
            had = rec.data["stages"].get(STAGE, {}).get("path")
            outputs.append(record_frontier(rec))
            if rec.data["stages"][STAGE]["path"] != had:  # the run's report gets the frontier's chart
                write_report(rec)
    except user_errors() as exc:
        fail(str(exc))
    tables = [o.read("frontier") for o in outputs]
    table = combine(tables) if len(tables) > 1 else tables[0]
    df = pl.from_arrow(table)
    rows = by_round(table)
    last = df.sort([c for c in ("night", "round") if c in df.columns]).group_by("problem_id", maintain_order=True).last()
    left = last.filter(pl.col("left_stuck_round").is_not_null()).sort([c for c in ("left_stuck_night", "left_stuck_round") if c in df.columns]
                                                                      + ["problem_id"]).to_dicts()
    if as_json:
        print(json.dumps({"runs": [r.run_id for r in records], "datasets": [str(o.path / "frontier") for o in outputs],
                          "by_round": rows, "left_stuck": left}, indent=1, default=str))
        return
    print_frontier(rows, left, [r.run_id for r in records], problems)
    for rec, o in zip(records, outputs):
        console.print(f"{STAGE} of run {rec.run_id}: {o.path / 'frontier'}")
