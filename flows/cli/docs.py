"""`guidedrl docs`: where the manual is, and how to read it as a site (MkDocs + Material)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import typer

from flows.cli.app import PROJECT_ROOT, app, console, fail


@app.command()
def docs(
    serve: bool = typer.Option(False, "--serve", help="Serve the site with live reload (`mkdocs serve`) until Ctrl-C."),
    addr: str = typer.Option("127.0.0.1:8000", "--addr", help="Address --serve listens on."),
    build: str = typer.Option(None, "--build", help="Build the site into this directory (`mkdocs build --strict`: a broken link fails)."),
):
    """Say where the documentation is and how to serve it; --serve serves it, --build DIR builds it.

    The site's pages are docs/*.md; its configuration and command-line references are generated from the code
    when it is built (docs/hooks.py). MkDocs and Material come with the `dev` and `docs` extras.
    """
    config = PROJECT_ROOT / "mkdocs.yml"
    if not config.is_file():
        fail(f"{config}: no mkdocs.yml; the docs come with a clone of the repository (pip install -e '.[docs]')")
    mkdocs = [sys.executable, "-m", "mkdocs"]
    if serve or build:
        if shutil.which("mkdocs") is None and subprocess.run(mkdocs + ["--version"], capture_output=True).returncode:
            fail("mkdocs is not installed: pip install -e '.[docs]'")
        cmd = mkdocs + (["serve", "-f", str(config), "-a", addr] if serve else ["build", "--strict", "-f", str(config), "-d", build])
        console.print(" ".join(cmd[1:]))
        raise typer.Exit(subprocess.run(cmd, cwd=PROJECT_ROOT).returncode)
    console.print(f"the manual: {PROJECT_ROOT / 'docs'} (start at index.md; getting-started.md explains the quickstart's output)\n"
                  f"as a site: guidedrl docs --serve  (or: cd {PROJECT_ROOT} && mkdocs serve), then open http://{addr}/\n"
                  "references generated from the code: reference/config.md and reference/cli.md of the built site")
