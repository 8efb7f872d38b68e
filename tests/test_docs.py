"""Docs that cannot lie: the site builds with no broken link or missing page, every config in the docs is
a config `guidedrl config show` accepts, every `guidedrl …` command line in them parses (its command
exists and knows its options), and the generated configuration reference has every key the code knows."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli.reference import cli_command, cli_reference, config_keys, config_reference, type_text
from tasks.core.config import deep_merge, read_yaml
from tasks.registry import Config, parse_config

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"(?<!`)`(guidedrl [^`]+)`")


def _blocks(kind: str) -> list[tuple[str, str]]:
    return [(str(p.relative_to(ROOT)), m.group(2)) for p in PAGES for m in FENCE.finditer(p.read_text()) if m.group(1) == kind]


def _app():
    from flows.cli import app  # noqa: F401  (registers the commands)
    from flows.cli.app import app as typer_app

    return typer_app


def test_the_site_builds_strict(tmp_path):
    """`mkdocs build --strict`: a broken link, a missing page or a page outside the nav fails the build."""
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={"NO_MKDOCS_2_WARNING": "1", **__import__("os").environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    site = tmp_path / "site"
    config_page = (site / "reference" / "config" / "index.html").read_text()
    assert "judge.process_protocol" in config_page and "low_var_kl" in config_page  # generated at build time
    assert "guidedrl datasets export" in (site / "reference" / "cli" / "index.html").read_text()
    assert (site / "bench" / "learning-2026-12-02-easy5.png").is_file()
    # the method pages carry their preset tables, the stage pages their settings
    assert "clip ratio high 0.26" in (site / "methods" / "exprl" / "index.html").read_text()
    assert "judge.step_split" in (site / "stages" / "grade" / "index.html").read_text()


def test_every_config_in_the_docs_is_a_config_guidedrl_accepts(tmp_path):
    """A YAML block whose top-level keys are config sections is a config, or a fragment merged over the
    quickstart's; `guidedrl config show` must accept it (unknown keys, wrong values: refused)."""
    sections = set(Config.model_fields)
    base = read_yaml(ROOT / "configs" / "quickstart.yaml")
    runner, app, shown = CliRunner(), _app(), 0
    for where, text in _blocks("yaml"):
        data = yaml.safe_load(text)
        if not isinstance(data, dict) or not set(data) & sections:
            continue  # not a run config (a preset file, a deployment)
        assert set(data) <= sections, f"{where}: a config block with keys that are not config sections: {sorted(set(data) - sections)}"
        path = tmp_path / f"block{shown}.yaml"
        path.write_text(yaml.safe_dump(deep_merge(base, data)))
        r = runner.invoke(app, ["config", "show", str(path)])
        assert r.exit_code == 0, f"{where}: this config block is refused:\n{text}\n{r.output}"
        shown += 1
    assert shown >= 8  # the stage pages' blocks are found and checked


def _command_lines() -> list[tuple[str, str]]:
    out = []
    for p in PAGES:
        text = p.read_text()
        lines = [line for m in FENCE.finditer(text) for line in m.group(2).splitlines()] + INLINE.findall(text)
        for line in lines:
            line = re.sub(r"^\s*(\$ )?(\.venv/bin/)?", "", line)
            if not line.startswith("guidedrl "):
                continue
            line = re.split(r" {3,}|\s+#", line)[0]  # what follows in a column or after # is a comment
            for i, part in enumerate(line.split(" | ")):
                out.append((str(p.relative_to(ROOT)), part if i == 0 else f"guidedrl {part}"))
    return out


def test_every_guidedrl_command_line_in_the_docs_parses():
    """Each `guidedrl …` line names a command that exists (its --help works) and only options it knows."""
    root, runner, app = cli_command(), CliRunner(), _app()
    lines = _command_lines()
    assert len(lines) >= 40
    for where, line in lines:
        words = line.split()[1:]
        cmd, path = root, []
        while words and hasattr(cmd, "commands") and words[0] in cmd.commands:
            cmd = cmd.commands[words[0]]
            path.append(words.pop(0))
        if hasattr(cmd, "commands"):  # a group named alone (`guidedrl runs`) or prose
            assert not words or words[0].startswith(("-", "[", "COMMAND", "...")), f"{where}: {line!r}: no command {words[0]!r}"
        r = runner.invoke(app, [*path, "--help"])
        assert r.exit_code == 0, f"{where}: {line!r}: `guidedrl {' '.join(path)} --help` failed: {r.output}"
        known = {o for p in cmd.params for o in [*p.opts, *p.secondary_opts]} | {o for p in root.params for o in p.opts} | {"--help"}
        used = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", " ".join(words)))
        assert used <= known, f"{where}: {line!r}: `guidedrl {' '.join(path)}` has no option {sorted(used - known)}"


def _dumped_keys(obj, prefix="") -> set[str]:
    """The dotted keys of a config as pydantic dumps it (list items as ``[]``): enumerated apart from the reference's walker."""
    out = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = f"{prefix}.{k}" if prefix else k
            out.add(key)
            out |= _dumped_keys(v, key)
    elif isinstance(obj, list):
        for v in obj:
            out |= _dumped_keys(v, prefix + "[]")
    return out


def test_every_config_key_the_code_knows_is_in_the_generated_reference():
    raw = read_yaml(ROOT / "configs" / "quickstart.yaml")
    raw["problems"]["sources"].append({"file": "x.jsonl"})  # a source of each kind: their keys too
    keys = _dumped_keys(parse_config(raw, base_dir=ROOT).model_dump())
    free = [k.name for k in config_keys() if "mapping" in type_text(k.field.annotation)]  # their entries are the user's, not keys
    keys = {k for k in keys if not any(k.startswith(f + ".") for f in free)}
    reference = config_reference()
    missing = sorted(k for k in keys if f"`{k}`" not in reference)
    assert not missing, f"keys not in the configuration reference: {missing}"
    assert len(keys) > 150 and {k.name for k in config_keys()} >= keys
    # and the command-line reference has every command and option
    cli = cli_reference()
    root = cli_command()
    for name, sub in root.commands.items():
        commands = sub.commands.items() if hasattr(sub, "commands") else [(None, sub)]
        for sub_name, cmd in commands:
            assert f"`guidedrl {name}{' ' + sub_name if sub_name else ''}`" in cli
            for p in cmd.params:
                if p.param_type_name == "option":
                    assert f"`{p.opts[0]}`" in cli


@pytest.mark.parametrize("page", ["README.md"])
def test_the_readme_is_a_front_page(page):
    text = (ROOT / page).read_text()
    assert len(text.splitlines()) <= 200
    for target in re.findall(r"\]\((docs/[^)#]+)", text):  # its links into the docs point at pages that exist
        assert (ROOT / target).is_file(), target
