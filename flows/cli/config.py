"""`config show`: the resolved config, secrets masked."""

from __future__ import annotations

from pathlib import Path

import typer

from flows.cli.app import config_app, console, fail, user_errors


@config_app.command("show")
def config_show(
    config: Path = typer.Argument(..., help="YAML config file."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key (repeatable)."),
):
    """Print the resolved config (defaults filled in, secrets masked)."""
    import yaml

    from tasks.core.config import apply_overrides, masked, read_yaml
    from tasks.registry import parse_config

    try:
        raw = apply_overrides(read_yaml(config), set_)
        cfg = parse_config(raw, where=str(config))
    except user_errors() as exc:
        fail(str(exc), 2)
    console.print(yaml.safe_dump(masked(cfg.model_dump(mode="json")), sort_keys=False), highlight=False, markup=False)
