"""MkDocs hooks: the reference pages generated from the code at build time (never written by hand), the
charts of bench/results/ the benchmark page shows, and each method page's preset table.

- ``reference/config.md``: ``flows.cli.reference.config_reference()`` (the pydantic models);
- ``reference/cli.md``: ``flows.cli.reference.cli_reference()`` (the typer app);
- ``bench/<name>.png``: the learning-study charts under bench/results/ that a page links;
- ``<!-- preset: M -->`` in a page: the preset M's values and sources (configs/presets/M.yaml);
- ``<!-- settings: S -->`` in a page: the keys of config section S (``judge``, ``train.grpo`` …).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_PRESET = re.compile(r"<!-- preset: ([\w-]+) -->")
_SETTINGS = re.compile(r"<!-- settings: ([\w.]+) -->")


def on_files(files, config):
    from flows.cli.reference import cli_reference, config_reference

    files.append(File.generated(config, "reference/config.md", content=config_reference()))
    files.append(File.generated(config, "reference/cli.md", content=cli_reference()))
    for png in sorted((ROOT / "bench" / "results").glob("learning-*.png")):
        files.append(File.generated(config, f"bench/{png.name}", abs_src_path=str(png)))
    return files


def on_page_markdown(markdown, page, config, files):
    from flows.cli.reference import preset_table, section_table

    markdown = _SETTINGS.sub(lambda m: section_table(m.group(1)), markdown)
    return _PRESET.sub(lambda m: preset_table(m.group(1)), markdown)
