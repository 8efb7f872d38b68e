"""Run records (`runs ls`, `runs show`) and `gc` of store outputs no kept run uses."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from flows.cli.app import JsonOpt, app, console, fail, runs_app
from flows.cli.render import print_run, print_runs
from flows.errors import user_errors


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



@app.command()
def gc(
    workspace: Path = typer.Option(Path("workspace"), "--workspace", "-w", help="Workspace directory."),
    keep: int = typer.Option(..., "--keep", help="Keep the outputs of this many newest runs (and of runs still going)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be removed; remove nothing."),
):
    """Remove stage outputs that no kept run refers to, and what crashed writers left behind."""
    from tasks.report.runs import gc as gc_store

    out = gc_store(workspace, keep, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    console.print(f"kept {out['outputs_kept']} outputs of runs {', '.join(out['runs_kept']) or '(none)'}; {verb} "
                  f"{len(out['outputs_removed'])} outputs ({out['bytes_freed'] / 1e6:.1f} MB) and {len(out['leftovers_removed'])} leftovers")
    for p in out["outputs_removed"] + out["leftovers_removed"]:
        console.print(f"  {p}")
