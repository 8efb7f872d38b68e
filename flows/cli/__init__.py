"""The `guidedrl` command line (one module per command group; tables in render.py).

    guidedrl quickstart [--workspace DIR]
    guidedrl run CONFIG [--stages a,b] [--workspace DIR] [--set key=value ...]
    guidedrl online CONFIG [--rounds N] [--workspace DIR] [--set key=value ...]
    guidedrl config show CONFIG [--set key=value ...]
    guidedrl datasets ls [--workspace DIR]
    guidedrl datasets show PATH [--rows N]
    guidedrl datasets publish PATH URL | pull URL PATH | diff A B
    guidedrl datasets export PATH --to verl|trl|openrlhf|hf DEST [--guidance PATH]
    guidedrl runs ls | runs show ID        guidedrl rerun ID --stage NAME [--downstream]
    guidedrl frontier ID [ID ...] [--json]
    guidedrl gc --keep N [--dry-run]
    guidedrl deploy CONFIG [--work-pool P] [--cron "0 2 * * *"]
    guidedrl docs [--serve] [--build DIR]
"""

from __future__ import annotations

import logging
import os

from flows.cli import config, datasets, docs, run, runs  # noqa: F401  (each registers its commands on the app)
from flows.cli.app import app
from flows.errors import quiet_library_warnings


def main() -> None:
    # our loggers ("guidedrl.*") go through Prefect's handlers: console and run logs
    extra = os.environ.get("PREFECT_LOGGING_EXTRA_LOGGERS", "")
    if "guidedrl" not in extra.split(","):
        os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] = ",".join(x for x in (extra, "guidedrl") if x)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    logging.getLogger("guidedrl").setLevel(logging.INFO)
    quiet_library_warnings()
    app()
