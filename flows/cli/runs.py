"""Run records (`runs ls`, `runs show`) and `gc` of store outputs no kept run uses."""

from __future__ import annotations

from pathlib import Path

import typer
from flows.cli.app import app, console, fail, runs_app
from flows.cli.render import print_run, print_runs


@runs_app.command("ls")
def runs_ls(workspace: Path = typer.Option(Path("workspace"), "--workspace", "-w", help="Workspace directory.")):
    """Runs of the workspace, newest first."""
    from tasks.report.runs import list_runs

    runs = list_runs(workspace)
    if not runs:
        console.print(f"no runs in {Path(workspace).resolve() / 'runs'}")
        return
    print_runs(runs, f"runs in {Path(workspace).resolve() / 'runs'}")


@runs_app.command("show")
def runs_show(run_id: str = typer.Argument(..., help="A run id (guidedrl runs ls)."),
              workspace: Path = typer.Option(Path("workspace"), "--workspace", "-w", help="Workspace directory.")):
    """One run: each stage's status, time, output and error."""
    from tasks.report.runs import RunRecord

    try:
        r = RunRecord.load(workspace, run_id)
    except FileNotFoundError as exc:
        fail(str(exc))
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
