"""Comparing sampled rows across runs that cut the work differently."""

import pyarrow as pa
import pytest

#: float columns computed by forward passes over a batch: its padded width changes float32 rounding, nothing else
FLOAT_COLUMNS = {"behaviour_logprobs", "loss_logprobs", "explain_loglik", "explain_loglik_total", "explain_answer_gain"}


def assert_same_rows(got: pa.Table, want: pa.Table, atol: float = 1e-4) -> None:
    """Row for row: every column equal, the log-prob columns within ``atol``."""
    assert got.column_names == want.column_names and got.num_rows == want.num_rows
    for name in got.column_names:
        a, b = got.column(name).to_pylist(), want.column(name).to_pylist()
        if name not in FLOAT_COLUMNS:
            assert a == b, name
            continue
        for x, y in zip(a, b):
            assert (x is None) == (y is None), name
            if x is not None:
                assert list(x if isinstance(x, list) else [x]) == pytest.approx(list(y if isinstance(y, list) else [y]), abs=atol), name
