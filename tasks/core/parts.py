"""One Parquet part writer for stages that write a dataset as its rows come (curate, materialize): rows held until a
part is due — ``max_rows`` rows or ``max_bytes`` of Arrow data, whichever comes first — then written as
``<directory>/<name>-NNNNN.parquet`` and flushed to disk; the stage hands the part files to ``Store.write``, which links
them into the output. Rows come as Arrow tables (``add``) or one dict at a time (``add_row``, turned into a table with
``to_table`` when the part is written). (Exports write one file per split with a streaming writer instead: a trainer's
layout names its files.)"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pyarrow as pa

from tasks.core.store import write_parquet


class PartWriter:
    def __init__(self, directory: Path, name: str, *, max_rows: int | None = None, max_bytes: int | None = None,
                 to_table: Callable[[list[dict]], pa.Table] | None = None, at_least_one: bool = False):
        """``to_table``: how held dict rows become a table (needed for ``add_row``); ``at_least_one``: ``close`` leaves
        one part even when no row came (an empty table of ``to_table([])``'s schema)."""
        self.directory, self.name = Path(directory), name
        self.max_rows, self.max_bytes, self.to_table, self.at_least_one = max_rows, max_bytes, to_table, at_least_one
        self.tables: list[pa.Table] = []
        self.rows: list[dict] = []
        self.held_rows = self.held_bytes = 0
        self.count = 0  # rows added in all
        self.paths: list[Path] = []

    def add(self, table: pa.Table) -> None:
        """Hold a table's rows; with ``max_rows``, a table that passes the limit is cut where a part is due."""
        while self.max_rows and self.held_rows + table.num_rows > self.max_rows:
            room = self.max_rows - self.held_rows
            self.add(table.slice(0, room))
            table = table.slice(room)
        self.tables.append(table)
        self._added(table.num_rows, table.nbytes)

    def add_row(self, row: dict) -> None:
        self.rows.append(row)
        self._added(1, 0)

    def _added(self, rows: int, nbytes: int) -> None:
        self.count += rows
        self.held_rows += rows
        self.held_bytes += nbytes
        if (self.max_rows and self.held_rows >= self.max_rows) or (self.max_bytes and self.held_bytes >= self.max_bytes):
            self.flush()

    def flush(self) -> None:
        """Write what is held as the next part (nothing when nothing is held, unless no part exists and one must)."""
        if not self.tables and not self.rows and (self.paths or not self.at_least_one):
            return
        parts = self.tables + ([self.to_table(self.rows)] if self.rows or not self.tables else [])
        table = pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]
        path = self.directory / f"{self.name}-{len(self.paths):05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_parquet(table, path)
        self.paths.append(path)
        self.tables, self.rows, self.held_rows, self.held_bytes = [], [], 0, 0

    def close(self) -> list[Path]:
        self.flush()
        return self.paths
