"""`config show`: the resolved config, secrets masked, and the method preset's values in force."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flows.cli.app import MethodOpt, config_app, console, fail
from flows.cli.render import print_preset
from flows.errors import user_errors


@config_app.command("show")
def config_show(
    config: Path = typer.Argument(..., help="YAML config file."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key (repeatable)."),
    method: Optional[str] = MethodOpt,
):
    """Print the resolved config (defaults filled in, secrets masked); with --method, which preset values are in force."""
    import yaml

    from tasks.core.config import flatten, masked, read_run_config
    from tasks.registry import parse_config

    try:
        raw, preset = read_run_config(config, method, set_)
        cfg = parse_config(raw, where=str(config))
    except user_errors() as exc:
        fail(str(exc), 2)
    resolved = masked(cfg.model_dump(mode="json"))
    console.print(yaml.safe_dump(resolved, sort_keys=False), highlight=False, markup=False)
    if method:
        print_preset(method, preset, flatten(resolved))
