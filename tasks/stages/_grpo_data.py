"""The grpo update's rows: how they are read (streamed from the Parquet files a record batch at a
time, shuffled in a bounded buffer), which kind each is, how a step is cut into micro-batches and
how rows become padded tensors (``Batch``)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from tasks.core.schemas import trainable
from tasks.core.store import iter_batches
from tasks.models.token_text import prompt_ids


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, P + T), prompts left-padded, completions right-padded
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor  # (B, T)
    behaviour: torch.Tensor  # (B, T) π_old's log-probs: recomputed by the trainer (`old_logprobs`) or the sampler's (0 where unknown)
    advantages: torch.Tensor  # (B, T)
    kind: torch.Tensor  # (B,) 0 plain, 1 guided (shaped), 2 explanation (NLL), -1 masked
    temperature: torch.Tensor  # (B,) the sampling temperature log π_θ is computed at (1 for explanation rows: NLL)
    prompt_width: int
    sampler: torch.Tensor | None = None  # (B, T) the sampler's log-probs where π_old was recomputed (for the mismatch correction)
    sampler_known: torch.Tensor | None = None  # (B, T) 1 where both the sampler's and the recomputed log-prob are known


KIND_PLAIN, KIND_GUIDED, KIND_EXPLAIN, KIND_MASKED = 0, 1, 2, -1
KINDS = {"plain": KIND_PLAIN, "guided": KIND_GUIDED, "explain": KIND_EXPLAIN, "masked": KIND_MASKED}


def n_tokens(values) -> int:
    """The length of a per-token column's value (a list or a NumPy array; none: 0)."""
    return 0 if values is None else len(values)


def needs_sampler_logprobs(cfg) -> bool:
    """Whether the update's sample rows need the sampler's behaviour log-probs (`old_logprobs: sampler`): with
    `recompute` the trainer computes π_old itself."""
    return cfg.old_logprobs == "sampler"


def row_kind(row: dict, needs_behaviour: bool = True) -> int:
    """The row's kind in the update. A sample row needs behaviour log-probs when π_old is the sampler's
    (``needs_behaviour``: `old_logprobs: sampler`) and always when it is guided (LTE's behaviour is under the
    hinted prompt, which the trainer does not recompute: the hint stage gives it, from the server or a forward
    pass of the sampling checkpoint)."""
    if row["prompt_kind"] == "explain":
        return KIND_EXPLAIN
    if row.get("advantage") is None or not n_tokens(row["completion_token_ids"]):
        return KIND_MASKED
    if row.get("behaviour_logprobs") is None and (needs_behaviour or row["is_guided"]):
        return KIND_MASKED
    return KIND_GUIDED if row["is_guided"] else KIND_PLAIN


def make_batch(rows: list[dict], tokenizer, device: str = "cpu", needs_behaviour: bool = True) -> Batch:
    """The rows (per-token columns as lists or NumPy arrays) as padded tensors: prompts left-padded,
    completions right-padded; behaviour log-probs of the wrong length count as unknown (0); a row
    without token advantages of its completion's length gets its advantage on every position. A row
    with recomputed π_old (``old_logprobs``, set by the loop) uses them as its behaviour, and its sampler's
    log-probs go to ``sampler`` for the mismatch correction."""
    prompts = [prompt_ids(tokenizer, r["loss_prompt"]) for r in rows]
    comps = [r["completion_token_ids"] if r["completion_token_ids"] is not None else () for r in rows]
    pw, cw = max(len(p) for p in prompts), max(1, max(len(c) for c in comps))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = len(rows)
    ids, attn = np.full((n, pw + cw), pad, np.int64), np.zeros((n, pw + cw), np.int64)
    cmask, beh, adv = np.zeros((n, cw), np.float32), np.zeros((n, cw), np.float32), np.zeros((n, cw), np.float32)
    kinds, temps = np.zeros(n, np.int64), np.ones(n, np.float32)
    sampler, known = np.zeros((n, cw), np.float32), np.zeros((n, cw), np.float32)
    for i, (r, p, c) in enumerate(zip(rows, prompts, comps)):
        ids[i, pw - len(p):pw], ids[i, pw:pw + len(c)] = p, c
        attn[i, pw - len(p):pw + len(c)] = 1
        cmask[i, :len(c)] = 1.0
        b, old = r.get("behaviour_logprobs"), r.get("old_logprobs")
        if old is not None and len(old) == len(c):
            beh[i, :len(c)] = old
            if b is not None and len(b) == len(c):
                sampler[i, :len(c)], known[i, :len(c)] = b, 1.0
        elif b is not None and len(b) == len(c):
            beh[i, :len(c)] = b
        ta = r.get("token_advantages")
        if ta is not None and len(ta) == len(c):
            adv[i, :len(c)] = ta
        else:
            adv[i, :] = float(r.get("advantage") or 0.0)
        kinds[i] = row_kind(r, needs_behaviour)
        temps[i] = 1.0 if kinds[i] == KIND_EXPLAIN else float(r.get("temperature") or 1.0)
    t = lambda x: torch.from_numpy(x).to(device)  # noqa: E731
    return Batch(t(ids), t(attn), t(cmask), t(beh), t(adv), t(kinds), t(temps), pw, t(sampler), t(known))



READ_ROWS = 1024


def _row_arrays(column) -> list:
    """A list column of a record batch as one NumPy array per row (views of the values; null: None)."""
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    return [values[offsets[i]:offsets[i + 1]] if valid[i] else None for i in range(len(column))]


@dataclass
class GRPORows:
    """The trainable rows of a materialised grpo dataset, read from its Parquet files a record
    batch at a time (polars lazy scan, masked rows filtered out) and shuffled in a buffer of
    `shuffle_buffer` rows: memory is bounded by the buffer, not the dataset. A dataset of at
    most that many rows is read whole and shuffled exactly as a list of rows is (``minibatches``)."""

    files: list
    shuffle_buffer: int
    #: the trainable rows, where known (materialize records them): else counted with a query over the files
    count: int | None = None
    #: sample rows need the sampler's behaviour log-probs (`old_logprobs: sampler`); else only guided ones do
    needs_behaviour: bool = True

    def __post_init__(self):
        if self.count is None:
            import polars as pl

            lf = trainable(pl.scan_parquet([str(f) for f in self.files]), self.needs_behaviour)
            self.count = lf.select(pl.len()).collect().item()

    def __len__(self) -> int:
        return self.count

    #: the columns the update reads (``row_kind``, ``make_batch``) and the row's id: the rest (texts, loss-side
    #: log-probs, group and problem ids) is not read
    COLUMNS = ["sample_id", "loss_prompt", "completion_token_ids", "behaviour_logprobs", "advantage", "token_advantages", "temperature",
               "is_guided", "prompt_kind"]
    PER_TOKEN = ("completion_token_ids", "behaviour_logprobs", "token_advantages")

    def read(self, file_order: list | None = None) -> Iterator[dict]:
        """The trainable rows (``COLUMNS``), file after file (in ``file_order``), ``READ_ROWS`` at a time."""
        for batch in iter_batches(file_order or self.files, READ_ROWS, self.COLUMNS):
            rows = batch.select([c for c in self.COLUMNS if c not in self.PER_TOKEN]).to_pylist()
            for name in self.PER_TOKEN:  # per row a NumPy view of the batch's values, not a list of Python numbers
                for r, values in zip(rows, _row_arrays(batch.column(name))):
                    r[name] = values
            yield from (r for r in rows if row_kind(r, self.needs_behaviour) != KIND_MASKED)


def minibatches(rows: list[dict] | GRPORows, batch_size: int, epochs: int, seed: int, needs_behaviour: bool = True
                ) -> tuple[int, Iterator[list[dict]]]:
    """(number of minibatches, the minibatches) of `epochs` shuffled passes over the trainable rows
    (seeded; the last minibatch of a pass may be short). A list, or a ``GRPORows`` that fits its
    buffer: each pass is a permutation of all rows (``random.Random(seed).shuffle``). A bigger
    ``GRPORows``: each pass reads the files (in a seeded order) through a shuffle buffer."""
    rng = random.Random(seed)
    if isinstance(rows, GRPORows) and len(rows) <= rows.shuffle_buffer:
        rows = list(rows.read())
    if isinstance(rows, list):
        rows = [r for r in rows if row_kind(r, needs_behaviour) != KIND_MASKED]
        n = len(rows)
    else:
        n = len(rows)
    steps = epochs * -(-n // batch_size)

    def from_list() -> Iterator[list[dict]]:
        order = list(range(n))
        for _ in range(epochs):
            rng.shuffle(order)
            for i in range(0, n, batch_size):
                yield [rows[j] for j in order[i : i + batch_size]]

    def streamed() -> Iterator[list[dict]]:
        for _ in range(epochs):
            files = list(rows.files)
            rng.shuffle(files)
            buffer: list[dict] = []
            batch: list[dict] = []

            def emit(row):
                batch.append(row)
                if len(batch) == batch_size:
                    out = batch.copy()
                    batch.clear()
                    return out
                return None

            for row in rows.read(files):
                buffer.append(row)
                if len(buffer) > rows.shuffle_buffer:
                    j = rng.randrange(len(buffer))
                    buffer[j], buffer[-1] = buffer[-1], buffer[j]
                    if (out := emit(buffer.pop())) is not None:
                        yield out
            rng.shuffle(buffer)
            for row in buffer:
                if (out := emit(row)) is not None:
                    yield out
            if batch:
                yield batch

    return steps, (from_list() if isinstance(rows, list) else streamed())


def _row_lengths(row: dict, tokenizer) -> tuple[int, int]:
    return len(prompt_ids(tokenizer, row["loss_prompt"])), n_tokens(row["completion_token_ids"])


def batch_tokens(rows: list[dict], tokenizer) -> int:
    """Padded tokens of ``rows`` as one batch (``make_batch``): rows x (longest prompt + longest completion)."""
    lengths = [_row_lengths(r, tokenizer) for r in rows]
    return len(rows) * (max(p for p, _ in lengths) + max(1, max(c for _, c in lengths)))


def micro_batches(rows: list[dict], tokenizer, cfg) -> list[list[dict]]:
    """A step's rows, in order, as the forward/backward passes: `micro_batch_size` rows at most (default: all) and,
    with `micro_batch_tokens`, at most that many padded tokens (a longer row goes alone)."""
    size = cfg.micro_batch_size or max(1, len(rows))
    budget = getattr(cfg, "micro_batch_tokens", None)
    if not budget:
        return [rows[start:start + size] for start in range(0, len(rows), size)]
    out: list[list[dict]] = []
    chunk, pmax, cmax = [], 0, 1
    for row in rows:
        p, c = _row_lengths(row, tokenizer)
        wider = (len(chunk) + 1) * (max(pmax, p) + max(cmax, c))
        if chunk and (len(chunk) == size or wider > budget):
            out.append(chunk)
            chunk, pmax, cmax = [], 0, 1
        chunk.append(row)
        pmax, cmax = max(pmax, p), max(cmax, c)
    if chunk:
        out.append(chunk)
    return out

