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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import polars as pl
import pyarrow as pa
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


def read_chunk(path: Path) -> pa.Table:
    """One source's rows of one chunk (a file ``partition`` wrote), memory-mapped."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()  # the table's buffers keep the mapping alive


def chunk_map(main: Source, max_rows: int) -> pl.DataFrame:
    """``problem_id`` → ``chunk`` (0, 1, ...): the main source's problems in order, cut into
    consecutive runs of at most ``max_rows`` rows (a bigger problem alone)."""
    counts = (main.output.scan(main.dataset).group_by("problem_id").len()
              .sort("problem_id").collect(engine="streaming"))
    chunks, chunk, rows = [], 0, 0
    for n in counts["len"]:
        if rows and rows + n > max_rows:
            chunk, rows = chunk + 1, 0
        chunks.append(chunk)
        rows += n
    return counts.select("problem_id").with_columns(pl.Series("chunk", chunks, dtype=pl.Int32))


def partition(main: Source, others: dict[str, Source], max_rows: int, work: Path) -> list[dict[str, Path]]:
    """Every source's rows routed to their problem's chunk (one pass over each, in record
    batches) and written under ``work``: one ``{name: Arrow IPC file}`` per chunk (``read_chunk``), in
    ``problem_id`` order (``main`` under the name ``"main"``). Within a chunk each source
    keeps its rows' original relative order. Rows whose problem is not in ``main`` are left out."""
    work.mkdir(parents=True, exist_ok=True)
    chunks = chunk_map(main, max_rows)
    n_chunks = int(chunks["chunk"].max()) + 1 if chunks.height else 0
    keys: dict[str, pl.DataFrame] = {}
    for name, src in others.items():
        if src.join_on and src.join_on not in keys:
            keys[src.join_on] = (main.output.scan(main.dataset).select(src.join_on, "problem_id")
                                 .join(chunks.lazy(), on="problem_id").select(src.join_on, "chunk").collect(engine="streaming"))
    paths = [{} for _ in range(n_chunks)]
    for name, src in {"main": main, **others}.items():
        mapping = keys[src.join_on] if src.join_on else chunks
        on = src.join_on or "problem_id"
        writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
        schema = None
        try:
            for batch in _batches(src):
                schema = schema or batch.schema
                # each row's chunk from its key alone; the rows themselves stay in Arrow (one copy: the filter)
                chunk_of = (pl.DataFrame({on: pl.from_arrow(batch.column(on))})
                            .join(mapping, on=on, how="left", maintain_order="left")["chunk"])
                for chunk in chunk_of.drop_nulls().unique().sort():
                    if chunk not in writers:
                        paths[chunk][name] = work / f"{name}-{chunk:05d}.arrow"
                        # scratch files, read once: Arrow IPC (no encoding: writing Parquet was most of the routing's time)
                        writers[chunk] = pa.ipc.new_file(paths[chunk][name], schema)
                    writers[chunk].write_batch(batch.filter((chunk_of == chunk).fill_null(False).to_arrow()))
        finally:
            for w in writers.values():
                w.close()
        for chunk in range(n_chunks):  # a chunk without rows of this source still gets its (empty) file
            if name not in paths[chunk]:
                schema = schema or pq.read_schema(data_files(src.output.dataset_path(src.dataset))[0])
                if src.columns:
                    schema = pa.schema([schema.field(c) for c in src.columns])
                paths[chunk][name] = work / f"{name}-{chunk:05d}.arrow"
                with pa.ipc.new_file(paths[chunk][name], schema):
                    pass
    return paths
