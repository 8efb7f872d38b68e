"""Group-wise work in bounded memory: datasets cut into chunks of whole problems.

A stage whose work is per problem (materialize: groups, advantages, DPO pairs, LTE
replacement) but whose inputs are too big to hold reads them here as **chunks**:
the problems in ``problem_id`` order cut into consecutive runs of at most
``max_rows`` rows of the main dataset (a problem is never split; a problem with
more rows than that is a chunk of its own), every input's rows routed to their
problem's chunk in one streaming pass (record batches), each chunk an Arrow IPC file
per input in a scratch directory. The stage then handles one chunk at a time, so
memory is bounded by the chunk, not by the dataset, and its output comes out in
``problem_id`` order whatever the inputs' order — the same rows, in the same order,
as working on all problems at once.

Rows of a dataset without a ``problem_id`` column are routed by a key that joins
them to the main dataset (grades by ``sample_id``). What is held whole is ids only:
the problem → chunk map and, for such joins, the key → chunk map.

A main dataset already in ``problem_id`` order (the rollouts stage writes its shards so)
is not copied: its chunks are consecutive row ranges, read front to back from its own
Parquet files (``Rows``) — routing it would write the whole dataset, token lists and all,
once more.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.core.store import StageOutput, data_files, iter_batches

#: rows read per record batch while routing
BATCH_ROWS = 2048


@dataclass
class Source:
    """One input of a chunked read: a dataset of a stage output, its columns, and how its rows find their problem."""

    output: StageOutput
    dataset: str
    columns: list[str] | None = None
    #: ``None``: the rows have ``problem_id``; else the column joining them to the main source (e.g. ``sample_id``)
    join_on: str | None = None


def _batches(source: Source) -> Iterator[pa.RecordBatch]:
    return iter_batches(data_files(source.output.dataset_path(source.dataset)), BATCH_ROWS, source.columns)


class InOrder:
    """A source's rows, read once front to back in record batches, served as consecutive row
    ranges (a range before the last one served starts the read again)."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self._batches: Iterator[pa.RecordBatch] | None = None
        self._held: list[pa.RecordBatch] = []  # read, not yet served in full; the first starts at row ``_at``
        self._at = self._end = 0

    def read(self, start: int, stop: int) -> pa.Table:
        if self._batches is None or start < self._at:
            self._batches, self._held, self._at, self._end = _batches(self.source), [], 0, 0
        while self._end < stop:
            batch = next(self._batches, None)
            if batch is None:
                raise ValueError(f"{self.source.output.path / self.source.dataset}: rows {start}..{stop} asked, "
                                 f"the dataset has {self._end}")
            self._held.append(batch)
            self._end += batch.num_rows
        while self._held and self._at + self._held[0].num_rows <= start:  # wholly before the range: done with
            self._at += self._held.pop(0).num_rows
        schema = self._held[0].schema if self._held else None
        return pa.Table.from_batches(self._held, schema).slice(start - self._at, stop - start)


@dataclass
class Rows:
    """One chunk of a source in ``problem_id`` order: its rows ``start`` to ``stop`` (``read_chunk``)."""

    reader: InOrder
    start: int
    stop: int


def read_chunk(chunk: Path | Rows) -> pa.Table:
    """One source's rows of one chunk: a file ``partition`` wrote (memory-mapped), or a row range of a source in order."""
    if isinstance(chunk, Rows):
        return chunk.reader.read(chunk.start, chunk.stop)
    return pa.ipc.open_file(pa.memory_map(str(chunk))).read_all()  # the table's buffers keep the mapping alive


def in_problem_order(source: Source) -> bool:
    """Whether the source's rows are in ``problem_id`` order (read: that column alone, a batch at a time)."""
    last = None
    for batch in iter_batches(data_files(source.output.dataset_path(source.dataset)), 65536, ["problem_id"]):
        ids = batch.column(0)
        if len(ids) == 0:
            continue
        if ids.null_count or (last is not None and ids[0].as_py() < last):
            return False
        if len(ids) > 1 and not pc.all(pc.greater_equal(ids.slice(1), ids.slice(0, len(ids) - 1))).as_py():
            return False
        last = ids[-1].as_py()
    return True


def chunk_map(main: Source, max_rows: int) -> pl.DataFrame:
    """``problem_id`` → ``chunk`` (0, 1, ...) and its rows (``len``): the main source's problems in order, cut into
    consecutive runs of at most ``max_rows`` rows (a bigger problem alone)."""
    counts = (main.output.scan(main.dataset).group_by("problem_id").len()
              .sort("problem_id").collect(engine="streaming"))
    chunks, chunk, rows = [], 0, 0
    for n in counts["len"]:
        if rows and rows + n > max_rows:
            chunk, rows = chunk + 1, 0
        chunks.append(chunk)
        rows += n
    return counts.with_columns(pl.Series("chunk", chunks, dtype=pl.Int32))


def partition(main: Source, others: dict[str, Source], max_rows: int, work: Path) -> list[dict[str, Path]]:
    """Every source's rows routed to their problem's chunk (one pass over each, in record
    batches) and written under ``work``: one ``{name: Arrow IPC file}`` per chunk (``read_chunk``), in
    ``problem_id`` order (``main`` under the name ``"main"``; a ``Rows`` range of its own files
    instead when it is in ``problem_id`` order already). Within a chunk each source
    keeps its rows' original relative order. Rows whose problem is not in ``main`` are left out."""
    work.mkdir(parents=True, exist_ok=True)
    chunks = chunk_map(main, max_rows)
    n_chunks = int(chunks["chunk"].max()) + 1 if chunks.height else 0
    paths: list[dict[str, Path | Rows]] = [{} for _ in range(n_chunks)]
    sources = {"main": main, **others}
    if n_chunks and in_problem_order(main):
        reader, start = InOrder(main), 0
        for chunk, rows in enumerate(chunks.group_by("chunk", maintain_order=True).agg(pl.col("len").sum())["len"]):
            paths[chunk]["main"] = Rows(reader, start, start + rows)
            start += rows
        del sources["main"]
    keys: dict[str, pl.DataFrame] = {}
    for name, src in others.items():
        if src.join_on and src.join_on not in keys:
            keys[src.join_on] = (main.output.scan(main.dataset).select(src.join_on, "problem_id")
                                 .join(chunks.lazy(), on="problem_id").select(src.join_on, "chunk").collect(engine="streaming"))
    for name, src in sources.items():
        mapping = keys[src.join_on] if src.join_on else chunks
        on = src.join_on or "problem_id"
        # each row's chunk from its key alone, for all rows in file order: one join (ids only); per record
        # batch a join against the whole map would make the routing quadratic in the rows
        chunk_of_rows = (src.output.scan(src.dataset).select(on).join(mapping.lazy(), on=on, how="left", maintain_order="left")
                         .select("chunk").collect()["chunk"])
        writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
        schema, at = None, 0
        try:
            for batch in _batches(src):
                schema = schema or batch.schema
                chunk_of = chunk_of_rows.slice(at, batch.num_rows)
                at += batch.num_rows
                for chunk in chunk_of.drop_nulls().unique().sort():
                    if chunk not in writers:
                        paths[chunk][name] = work / f"{name}-{chunk:05d}.arrow"
                        # scratch files, read once: Arrow IPC (no encoding: writing Parquet was most of the routing's time)
                        writers[chunk] = pa.ipc.new_file(paths[chunk][name], schema)
                    # the rows themselves stay in Arrow (one copy: the filter)
                    writers[chunk].write_batch(batch.filter((chunk_of == chunk).fill_null(False).to_arrow()))
        finally:
            for w in writers.values():
                w.close()
        if at != len(chunk_of_rows):
            raise ValueError(f"{src.output.path / src.dataset}: {on} is not unique in {main.output.path / main.dataset}; "
                             f"its rows cannot be routed to one problem each")
        for chunk in range(n_chunks):  # a chunk without rows of this source still gets its (empty) file
            if name not in paths[chunk]:
                schema = schema or pq.read_schema(data_files(src.output.dataset_path(src.dataset))[0])
                if src.columns:
                    schema = pa.schema([schema.field(c) for c in src.columns])
                paths[chunk][name] = work / f"{name}-{chunk:05d}.arrow"
                with pa.ipc.new_file(paths[chunk][name], schema):
                    pass
    return paths
