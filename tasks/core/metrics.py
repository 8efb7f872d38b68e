"""Pass-rate metrics shared by the rollout summary, the filter, the bootstrap
report and (later) the eval stage."""

from __future__ import annotations

from collections import defaultdict
from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def ks_for(n: int) -> list[int]:
    """1, then powers of two up to n, and n itself."""
    ks, k = [1], 2
    while k <= n:
        ks.append(k)
        k *= 2
    if n not in ks:
        ks.append(n)
    return ks


def pass_table(groups: dict[str, tuple[str | None, list[bool]]]) -> dict[str, dict]:
    """Per level: problems, samples per problem, pass@k for k in ks_for(n), all-fail count.

    ``groups`` maps problem_id -> (level, [correct per sample]).
    """
    by_level: dict[str, list[list[bool]]] = defaultdict(list)
    for level, results in groups.values():
        by_level[str(level)].append(results)
        by_level["all"].append(results)
    table = {}
    for level, rows in sorted(by_level.items()):
        n = min(len(r) for r in rows)
        entry = {"problems": len(rows), "n": n, "all_fail": sum(not any(r) for r in rows)}
        for k in ks_for(n):
            entry[f"pass@{k}"] = round(sum(pass_at_k(len(r), sum(r), k) for r in rows) / len(rows), 4)
        table[level] = entry
    return table
