"""References generated from the code, never written by hand: the configuration (from the pydantic
models of tasks/registry.py: every key, its type, default, bounds, description and, where a method
preset sets it, the paper's value and source) and the command line (from the typer app: every
command, argument and option with its help). The docs site builds its reference pages from these
(docs/hooks.py); `guidedrl docs` says how to serve it.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo


@dataclass
class Key:
    """One configuration key: its dotted name (``[]`` for a list item), model field and owning model."""

    name: str
    field: FieldInfo
    model: type[BaseModel]

    @property
    def section(self) -> str:
        return self.name.split(".", 1)[0].removesuffix("[]")


def _models_in(annotation: Any) -> list[tuple[type[BaseModel], str]]:
    """The pydantic models an annotation holds, each with how its keys hang below (``""`` or ``"[]"``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, "")]
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        return [m for a in args for m in _models_in(a)]
    if origin is list and args:
        return [(m, "[]") for m, _ in _models_in(args[0])]
    return []


def config_keys(model: type[BaseModel] | None = None, prefix: str = "") -> Iterator[Key]:
    """Every key of the run config, sections and leaves, in the models' order."""
    if model is None:
        from tasks.registry import Config

        model = Config
    for name, f in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        yield Key(key, f, model)
        for inner, suffix in _models_in(f.annotation):
            yield from config_keys(inner, key + suffix)


def type_text(annotation: Any) -> str:
    """A type as a reader writes it in YAML terms: ``rule | openai``, ``int or null``, ``list of …``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" if isinstance(a, str) else str(a) for a in args)
    if origin in (Union, types.UnionType):
        kinds = [type_text(a) for a in args if a is not type(None)]
        return " or ".join(kinds) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {type_text(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping {type_text(args[0])} → {type_text(args[1])}" if args else "mapping"
    if origin is typing.Annotated:
        return type_text(args[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def bounds_text(f: FieldInfo) -> str:
    names = {"Gt": ">", "Ge": "≥", "Lt": "<", "Le": "≤", "MinLen": "at least {} items", "MaxLen": "at most {} items"}
    out = []
    for m in f.metadata:
        kind = type(m).__name__
        if kind in ("Gt", "Ge", "Lt", "Le"):
            out.append(f"{names[kind]} {getattr(m, kind.lower())}")
        elif kind in ("MinLen", "MaxLen"):
            out.append(names[kind].format(getattr(m, kind.lower().replace('len', '_length'))))
    return ", ".join(out)


def default_text(f: FieldInfo) -> str:
    if f.is_required():
        return "required"
    value = f.default_factory() if f.default_factory is not None else f.default
    if isinstance(value, BaseModel):
        return ""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`" if isinstance(value, str) and value else "`\"\"`" if isinstance(value, str) else f"`{value}`"


def preset_values() -> dict[str, list[tuple[str, Any, str]]]:
    """Dotted key → [(method, value, source)] of every preset in configs/presets/."""
    from tasks.core.config import PRESETS_DIR, flatten, read_yaml

    out: dict[str, list[tuple[str, Any, str]]] = {}
    for path in sorted(PRESETS_DIR.glob("*.yaml")):
        preset = read_yaml(path)
        sources = preset.get("sources") or {}
        for key, value in flatten(preset.get("settings") or {}).items():
            out.setdefault(key, []).append((path.stem, value, sources.get(key, "")))
    return out


def _cell(text: str) -> str:
    """Text for one Markdown table cell: one line, pipes escaped, angle brackets shown (not read as HTML)."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _row(k: Key, presets: dict, sources: bool) -> str:
    """One key as a table row: key | type (and bounds) | default | description (and the presets that set it)."""
    bounds = bounds_text(k.field)
    kind = type_text(k.field.annotation) + (f", {bounds}" if bounds else "")
    set_by = presets.get(k.name, [])
    note = "; ".join(f"**{m}** `{v}`" + (f" — {_cell(src)}" if sources and src else "") for m, v, src in set_by)
    desc = _cell(k.field.description or "") + (f"<br>Presets: {note}" if note else "")
    return f"| `{k.name}` | {kind} | {default_text(k.field)} | {desc} |"


_HEAD = ["| key | type | default | description |", "| --- | --- | --- | --- |"]


def config_reference() -> str:
    """The configuration reference (Markdown): one table per section, then the presets by method."""
    from tasks.core.config import PRESETS_DIR

    presets = preset_values()
    lines = ["---", "hide:", "  - navigation", "---", "", "# Configuration reference", "",
             "Generated from the code (`flows/cli/reference.py` reads the pydantic models of `tasks/registry.py`) when the "
             "site is built: every key of a run config, its type and bounds, default and description. Where a method preset "
             "(`--method`) sets a key, its description ends with each preset's value and source. `guidedrl config show "
             "CONFIG [--method M]` prints a config resolved.", ""]
    section = None
    for key in config_keys():
        if key.section != section:
            section = key.section
            lines += ["", f"## `{section}`", ""]
            inner = _models_in(key.field.annotation)
            doc = (inner[0][0].__doc__ or "").strip() if inner else ""
            if doc and not doc.startswith(inner[0][0].__name__ + "("):
                lines += [_cell(doc), ""]
            lines += _HEAD
            if inner:
                continue
        lines.append(_row(key, presets, sources=True))
    lines += ["", "## Presets by method", "",
              "`guidedrl run CONFIG --method M` sets these over CONFIG (`--set` still wins); each value with its source.", ""]
    for path in sorted(PRESETS_DIR.glob("*.yaml")):
        lines += [f"### `{path.stem}`", "", preset_table(path.stem), ""]
    return "\n".join(lines) + "\n"


def section_table(section: str) -> str:
    """The keys of one config section (``judge``, ``train.grpo`` …) as a Markdown table."""
    presets = preset_values()
    keys = [k for k in config_keys() if (k.name + ".").startswith(section + ".") and not _models_in(k.field.annotation)]
    if not keys:
        raise ValueError(f"no config section {section!r}")
    return "\n".join(_HEAD + [_row(k, presets, sources=False) for k in keys])


def preset_table(method: str) -> str:
    """One preset (configs/presets/<method>.yaml) as Markdown: its comment, then each value with its source."""
    from tasks.core.config import PRESETS_DIR

    path = PRESETS_DIR / f"{method}.yaml"
    head = [line.removeprefix("#").strip() for line in path.read_text().splitlines() if line.startswith("#")]
    lines = [_cell(" ".join(head)), "", "| key | value | source |", "| --- | --- | --- |"]
    for key, value, source in sorted((k, v, src) for k, vs in preset_values().items() for m, v, src in vs if m == method):
        lines.append(f"| `{key}` | `{value}` | {_cell(source)} |")
    return "\n".join(lines)


def _is_group(cmd) -> bool:
    return hasattr(cmd, "commands")  # typer carries its own click: duck-typed, not isinstance(click.Group)


def _commands(cmd, path: list[str]) -> Iterator[tuple[list[str], Any]]:
    yield path, cmd
    if _is_group(cmd):
        for name in sorted(cmd.commands):
            yield from _commands(cmd.commands[name], path + [name])


def cli_command():
    """The `guidedrl` command as click sees it (every command registered)."""
    import typer.main

    from flows.cli import app  # noqa: F401  (registers every command)
    from flows.cli.app import app as typer_app

    return typer.main.get_command(typer_app)


def _relative(value: Any) -> Any:
    """A default path inside the repository, as the repository-relative path (the same on every machine)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if isinstance(value, Path) and value.is_absolute() and value.is_relative_to(root):
        return value.relative_to(root)
    return value


def cli_reference() -> str:
    """The command-line reference (Markdown): every command, its arguments and options with their help."""
    root = cli_command()
    lines = ["---", "hide:", "  - navigation", "---", "", "# Command-line reference", "",
             "Generated from the code (`flows/cli/reference.py` walks the typer app) when the site is built. Every command "
             "also answers `--help`.", ""]
    for path, cmd in _commands(root, ["guidedrl"]):
        if _is_group(cmd) and len(path) > 1:
            lines += [f"## `{' '.join(path)}`", "", _cell(cmd.help or ""), ""]
            continue
        ctx = cmd.context_class(cmd, info_name=" ".join(path))
        usage = " ".join(cmd.collect_usage_pieces(ctx))
        title = "## `guidedrl` (options of every command)" if len(path) == 1 else f"{'##' if len(path) == 2 else '###'} `{' '.join(path)}`"
        lines += [title, "", "```", f"{' '.join(path)} {usage}", "```", "", (cmd.help or "").strip(), ""]
        params = [p for p in cmd.params if not getattr(p, "hidden", False)]
        if params:
            lines += ["| argument / option | type | default | help |", "| --- | --- | --- | --- |"]
            for p in params:
                names = (", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts]) if p.param_type_name == "option"
                         else f"`{(p.metavar or p.name).upper()}`")
                default = "" if p.required or p.default in (None, False, (), []) else f"`{_relative(p.default)}`"
                td = getattr(p, "type_descriptor", None)
                kind = "flag" if getattr(p, "is_flag", False) else type_text(td.annotation) if td is not None else ""
                lines.append(f"| {names} | {kind}{' (required)' if p.required else ''} | {default} | {_cell(getattr(p, 'help', '') or '')} |")
            lines.append("")
    return "\n".join(lines) + "\n"
