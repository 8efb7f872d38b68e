"""The command-line application: the typer apps, the console and the error line every command ends with."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

PROJECT_ROOT = Path(__file__).resolve().parents[2]
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
runs_app = typer.Typer(help="Run records: what each run did, kept after its process is gone.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(datasets_app, name="datasets")
app.add_typer(runs_app, name="runs")

JsonOpt = typer.Option(False, "--json", help="Print JSON for scripts instead of a table.")
MethodOpt = typer.Option(None, "--method", help="Set a method's published hyperparameters over the config: grpo, expo, lte, "
                         "exprl (ExpRL-Process as its authors' main script), exprl-outcome, prefix (reference prefixes: QuestA, "
                         "POPE, BREAD) or self-hint (NuRL, SAGE) (configs/presets/<method>.yaml; --set still wins). `guidedrl config show CONFIG --method M` lists them with their sources.")
WorkspaceOpt = typer.Option(None, "--workspace", "-w", help="Workspace directory (store/ and runs/). Default: the config's `workspace`, else ./workspace.")


def fail(message: str, code: int = 1) -> None:
    """End the command with one `error:` line (and, with --debug, the traceback of the error being handled)."""
    import sys

    from flows.errors import debug

    if debug() and sys.exc_info()[1] is not None:
        err_console.print_exception()
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show the Python traceback of every error (also GUIDEDRL_DEBUG=1); "
                                        "by default the user's errors (bad input, config, judge) are one `error:` line.")) -> None:
    import os

    from flows.errors import DEBUG_ENV

    if debug:
        os.environ[DEBUG_ENV] = "1"


def parse_stages(stages: Optional[str]) -> Optional[list[str]]:
    return [s.strip() for s in stages.split(",") if s.strip()] if stages else None
