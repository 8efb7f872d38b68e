"""What the commands print: rich tables of stage results, pass rates, judge summaries and eval before/after."""

from __future__ import annotations

from rich.table import Table

from flows.cli.app import console


def print_eval_table(s: dict) -> None:
    """pass@1 / pass@n by level, base policy vs the trained checkpoint."""
    tables = s.get("pass", {})
    if not tables:
        return
    n = s.get("n")
    table = Table(title=f"eval split, before/after training (pass@1 / pass@{n}, {n} samples per problem)")
    table.add_column("level")
    table.add_column("problems", justify="right")
    for label in tables:
        table.add_column(f"{label}  pass@1 / pass@{n}", justify="right")
    for level in next(iter(tables.values())):
        cells = [f"{t[level]['pass@1']:.3f} / {t[level][f'pass@{n}']:.3f}" if level in t else "-" for t in tables.values()]
        table.add_row(level, str(next(iter(tables.values()))[level]["problems"]), *cells)
    console.print(table)


def print_grade_summary(s: dict) -> None:
    table = Table(title=f"judge: {s.get('judge')}, {s.get('mode')} mode")
    table.add_column("measure")
    table.add_column("value", justify="right")
    req = s.get("judge_requests", {})
    rows = [
        ("traces graded / all", f"{s.get('graded')} / {s.get('traces')}"),
        ("parse rate", str(s.get("parse_rate"))),
        ("not graded, by reason", ", ".join(f"{k}: {v}" for k, v in s.get("not_graded_by_reason", {}).items()) or "-"),
        ("outcome score histogram", "  ".join(f"{k}: {v}" for k, v in s.get("outcome_histogram", {}).items()) or "-"),
        ("mean outcome score (right answer / wrong)", f"{s.get('mean_outcome_if_correct')} / {s.get('mean_outcome_if_wrong')}"),
        ("mean step score", str(s.get("mean_step_score"))),
        ("agreement of outcome >= 0.75 with a right answer", str(s.get("agreement_with_correctness"))),
        ("requests sent / cache hits / retries / format reminders",
         f"{req.get('requests', 0)} / {req.get('cache_hits', 0)} / {req.get('retries', 0)} / {req.get('reminders', 0)}"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def print_pass_table(title: str, table_data: dict) -> None:
    """A pass@k table by level: {level: {problems, n, all_fail, pass@1, ...}}."""
    if not table_data:
        return
    first = next(iter(table_data.values()))
    ks = [k for k in first if k.startswith("pass@") and k.split("@")[1] in ("1", "8", "64", str(first["n"]))]
    steps = "right_answer_and_steps" in first
    table = Table(title=title)
    for col in ["level", "problems", "samples", *ks, "all wrong"] + (["right steps"] if steps else []):
        table.add_column(col, justify="right" if col != "level" else "left")
    for level, row in table_data.items():
        cells = [level, str(row["problems"]), str(row["n"]), *[f"{row[k]:.3f}" for k in ks], str(row["all_fail"])]
        table.add_row(*cells, *([f"{row['right_answer_and_steps']:.3f}"] if steps else []))
    console.print(table)


def print_results(results: dict) -> None:
    from tasks.registry import REGISTRY, STAGES

    table = Table(title="stages", show_lines=False)
    table.add_column("stage", style="bold")
    table.add_column("status")
    table.add_column("result")
    table.add_column("output")
    for stage, r in results.items():
        status = {"computed": "[green]computed[/]", "reused": "[cyan]reused (no work)[/]", "cached": "[cyan]cached (no work)[/]"}[r["status"]]
        table.add_row(stage, status, REGISTRY[stage].describe(r.get("summary", {})), r["path"])
    console.print(table)
    if "rollouts" in results:
        print_pass_table("pass rates of the policy's rollouts, by level", results["rollouts"]["summary"].get("pass", {}))
    if "grade" in results:
        print_grade_summary(results["grade"]["summary"])
    if "grpo" in results:
        g = results["grpo"]["summary"]
        console.print(f"online GRPO round: {g.get('steps')} update steps on {g.get('rows')} samples {g.get('rows_by_kind')} "
                      f"-> {results['grpo']['path']}/checkpoint")
    if "eval" in results:
        print_eval_table(results["eval"]["summary"])
    for stage, r in results.items():
        if r["status"] != "computed":
            console.print(f"{stage}: output already in the store for this config and inputs — nothing was recomputed.")
    if set(results) >= set(STAGES):
        console.print("Every stage of the pipeline ran (none is still to come).")
