"""What the commands print: rich tables of stage results, pass rates, judge summaries and eval before/after."""

from __future__ import annotations

from pathlib import Path

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
    table = Table(title=title)
    for col in ["level", "problems", "samples", *ks, "all wrong", "errors"]:
        table.add_column(col, justify="right" if col != "level" else "left")
    for level, row in table_data.items():
        # errors: failed generations, left out of pass@k (never counted as wrong answers)
        cells = [level, str(row["problems"]), str(row["n"]), *[f"{row[k]:.3f}" for k in ks], str(row["all_fail"]), str(row.get("errors", 0))]
        table.add_row(*cells)
    console.print(table)


def print_results(results: dict, left_out: dict[str, str] | None = None) -> None:
    """The stages of a run: one line each in a table that fits the terminal (stage, status, the result cut to the
    width left), then each stage's output path whole on a line of its own (what a user copies), and the full result
    lines under it — at 80 columns, or in a log file, as on a wide terminal. ``left_out``: the stages the run left out,
    and why."""
    from tasks.registry import REGISTRY, STAGES

    status_of = {"computed": "computed", "reused": "reused (no work)", "cached": "cached (no work)"}
    table = Table(title="stages", show_lines=False)
    table.add_column("stage", style="bold", no_wrap=True, min_width=max(map(len, results), default=5))
    table.add_column("status", no_wrap=True, min_width=max((len(status_of[r["status"]]) for r in results.values()), default=6))
    table.add_column("result", no_wrap=True, overflow="ellipsis", ratio=1)
    lines = {stage: REGISTRY[stage].describe(r.get("summary", {})) for stage, r in results.items()}
    for stage, r in results.items():
        status = status_of[r["status"]]
        table.add_row(stage, f"[green]{status}[/]" if r["status"] == "computed" else f"[cyan]{status}[/]", lines[stage])
    console.print(table)
    for stage, r in results.items():
        console.print(f"[bold]{stage}[/] -> {copyable_path(r['path'])}", soft_wrap=True, highlight=False)
        console.print(f"  {lines[stage]}", soft_wrap=True, highlight=False, markup=False)
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
    elif left_out and set(results) | set(left_out) >= set(STAGES):
        console.print(f"Every stage of the pipeline ran but {', '.join(x for x in STAGES if x in left_out)}, which no update of this run reads "
                      "(left out: see above; none is still to come).")


def print_runs(runs: list, title: str) -> None:
    """`runs ls`: one row per run record, newest first."""
    table = Table(title=title)
    # the id is what a user copies into `runs show` and `rerun`: never cut, never wrapped; the other columns give way
    table.add_column("run", no_wrap=True, min_width=max(len(r.run_id) for r in runs))
    for col in ("command", "status", "started", "stages", "error"):
        table.add_column(col, overflow="fold")
    for r in (rec.summary() for rec in runs):
        table.add_row(r["run_id"], r["command"] + (f" (rerun of {r['rerun_of']})" if r["rerun_of"] else ""), r["status"],
                      r["started"], f"{r['stages_done']}/{r['stages']}", r["error"] or "")
    console.print(table)


def print_run(record) -> None:
    """`runs show`: the run's command and status, then each stage's status, time, output and error."""
    d = record.data
    console.print(f"[bold]run {record.run_id}[/] — {d['command']}, {record.status}; started {d['started']}, finished {d.get('finished')}")
    if record.status == "interrupted":
        console.print(f"[yellow]interrupted:[/] its process ({d.get('pid')}) is gone without finishing (killed, or the machine went down); "
                      "running the same command again resumes it: finished stage outputs and shards are reused")
    if record.status == "stale":
        console.print(f"[yellow]stale:[/] recorded as running on host {d.get('host')} (pid {d.get('pid')}), whose heartbeat "
                      f"({record.heartbeat_path}) is older than store.lease_seconds: that host died or lost the workspace; running "
                      "the same command again resumes it")
    if d.get("rerun_of"):
        console.print(f"rerun of {d['rerun_of']}")
    if d.get("error"):
        console.print(f"[red]error:[/] {d['error']}")
    table = Table()
    paths = {name: copyable_path(s["path"]) if s.get("path") else "" for name, s in d["stages"].items()}
    for col in ("stage", "status", "seconds"):
        table.add_column(col)
    table.add_column("output", no_wrap=True, min_width=max(map(len, paths.values()), default=6))
    table.add_column("error", overflow="fold")
    for name, s in d["stages"].items():
        table.add_row(name, record.stage_status(name), str(s.get("seconds", "")), paths[name], s.get("error", ""))
    console.print(table)
    for stage, why in (d.get("left_out") or {}).items():
        console.print(f"left out: {stage} — {why}", soft_wrap=True)


def dataset_entries(outputs: list) -> list[dict]:
    """`datasets ls`: one entry per dataset of every finished stage output (the table's rows, and its --json)."""
    return [{"stage": o.stage, "key": o.key, "dataset": name, "kind": d["kind"], "rows": d["num_rows"],
             "created": o.manifest.get("created"), "path": str(o.path / name)}
            for o in outputs for name, d in o.manifest.get("datasets", {}).items()]


def copyable_path(path: str) -> str:
    """A path as a user copies it: relative to the current directory when it lies under it, else absolute."""
    p = Path(path).resolve()
    return str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p)


def print_datasets(entries: list[dict], title: str) -> None:
    """`datasets ls`: every dataset of every finished stage output. The path is what `datasets show` and `publish`
    take: never cut, never wrapped (it holds the output's key; --json gives the key apart); the other columns give way."""
    table = Table(title=title)
    paths = [copyable_path(e["path"]) for e in entries]
    table.add_column("path (stage/key/dataset)", no_wrap=True, min_width=max(map(len, paths)))
    table.add_column("kind", overflow="fold")
    table.add_column("rows", no_wrap=True, justify="right")
    table.add_column("created", no_wrap=True)
    for e, path in zip(entries, paths):
        created = (e["created"] or "")[:16].replace("T", " ")  # to the minute; --json has it whole
        table.add_row(path, "" if e["kind"] == e["dataset"] else e["kind"], str(e["rows"]), created)
    console.print(table)


def print_published(entries: list[dict], title: str) -> None:
    """`datasets ls URL`: the datasets published under a shared location."""
    table = Table(title=title)
    columns = ("name", "kind", "rows", "fingerprint", "created", "published", "run")
    for col in columns:
        table.add_column(col, overflow="fold")
    for e in entries:
        table.add_row(*("" if e[c] is None else str(e[c]) for c in columns))
    console.print(table)


def print_diff(a, b, da: dict, db: dict) -> None:
    """`datasets diff`: kind, rows, fingerprint, and per column its type and statistics, A beside B (differences marked)."""
    table = Table(title=f"A = {a}\nB = {b}")
    for col in ("", "A", "B"):
        table.add_column(col)

    def row(label, va, vb):
        mark = "" if va == vb else "[yellow]"
        table.add_row(f"{mark}{label}", str(va), str(vb))

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    row("kind", da["kind"], db["kind"])
    row("rows", da["rows"], db["rows"])
    row("fingerprint", da["fingerprint"], db["fingerprint"])
    for name in dict.fromkeys([*da["schema"], *db["schema"]]):
        row(f"{name}: type", da["schema"].get(name, "(missing)"), db["schema"].get(name, "(missing)"))
        sa, sb = da["stats"].get(name, {}), db["stats"].get(name, {})
        for stat in dict.fromkeys([*sa, *sb]):
            row(f"{name}: {stat}", fmt(sa.get(stat)), fmt(sb.get(stat)))
    console.print(table)


def print_rounds(history: list[dict]) -> None:
    """`guidedrl online`: the eval split's pass@1 / pass@n by level after each round."""
    table = Table(title="online GRPO: eval split after each round (pass@1 / pass@n)")
    table.add_column("round")
    table.add_column("stages computed / reused")
    levels = sorted({lvl for h in history for lvl in h["results"]["eval"]["summary"]["pass"].get("grpo", {})})
    for lvl in levels:
        table.add_column(lvl, justify="right")
    for h in history:
        res = h["results"]
        n = res["eval"]["summary"]["n"]
        done = sum(r["status"] == "computed" for r in res.values())
        cells = []
        for lvl in levels:
            t = res["eval"]["summary"]["pass"].get("grpo", {}).get(lvl)
            cells.append(f"{t['pass@1']:.3f} / {t[f'pass@{n}']:.3f}" if t else "-")
        table.add_row(str(h["round"]), f"{done} / {len(res) - done}", *cells)
    console.print(table)


def print_preset(method: str, preset: dict, resolved: dict) -> None:
    """`config show --method M`: each value the preset sets, whether it is in force (or a --set changed it), and its source."""
    table = Table(title=f"preset {method} (configs/presets/{method}.yaml): the method's published settings")
    for col in ("key", "preset", "in force", "source"):
        table.add_column(col)
    for key, (value, source) in preset.items():
        now = resolved.get(key)
        table.add_row(key, str(value), "yes" if now == value else f"no: {now} (--set)", source)
    console.print(table)


def print_frontier(rows: list[dict], left: list[dict], nights: list[str], shown: int) -> None:
    """`guidedrl frontier`: the stuck set by round (and night), then the problems that left it."""
    several = len(nights) > 1
    table = Table(title="frontier: the stuck set by round (stuck = rolled out, never right; guidance columns: stuck problems "
                        "it produced a verified sample for)")
    from tasks.report.frontier import GUIDANCE
    from tasks.report.html import FRONTIER_HEADS

    for col in (["night"] if several else []) + ["round", "problems", "pass rate", "stuck", *(FRONTIER_HEADS[g] for g in GUIDANCE), "left stuck"]:
        table.add_column(col, justify="left" if col in ("night", "round") else "right")
    for r in rows:
        cells = [str(r["round"]), str(r["problems"]), f"{r['correct'] / r['samples']:.3f}" if r["samples"] else "-", str(r["stuck"]),
                 *("-" if r.get(g) is None else str(r[g]) for g in GUIDANCE), str(r["left_stuck"])]
        table.add_row(*([f"{r['night']} {nights[r['night'] - 1]}"] if several else []), *cells)
    console.print(table)
    if not left:
        console.print("no problem left the stuck set")
        return
    table = Table(title=f"problems that left the stuck set ({len(left)}" + (f"; the first {shown} shown" if len(left) > shown else "") + ")")
    for col in ("problem", "level", "left in", "first verified by", "pass rate, last round"):
        table.add_column(col, no_wrap=col == "problem")
    where = (lambda n, r: f"night {n} round {r}") if several else (lambda n, r: f"round {r}")
    for p in left[:shown]:
        guided = (f"{p['first_guidance']} ({where(p.get('first_guided_night'), p['first_guided_round'])})"
                  if p["first_guidance"] else "(none: solved without a verified guided sample)")
        table.add_row(p["problem_id"], str(p["level"] or ""), where(p.get("left_stuck_night"), p["left_stuck_round"]), guided,
                      f"{p['pass_rate']:.3f}")
    console.print(table)


def print_alignment(run_id: str, tokenizer_dir, reports: list, checks: tuple[str, ...]) -> None:
    """`runs check`: per dataset, failing rows of each check over the rows checked, then a few failing rows."""
    console.print(f"[bold]run {run_id}[/] — token–text alignment with the tokenizer in {copyable_path(tokenizer_dir)}")
    table = Table()
    table.add_column("dataset", overflow="fold")
    table.add_column("rows", justify="right")
    for c in checks:
        table.add_column(c, justify="right", no_wrap=True, min_width=len(c))
    for r in reports:
        cells = [f"{r.failed[c]}/{r.checked[c]}" if r.checked[c] else "–" for c in checks]
        table.add_row(f"{r.round} {r.dataset}".strip(), str(r.rows), *cells)
    console.print(table)
    console.print("cells: failing rows / rows checked; – not checked here (see `guidedrl runs check --help`); "
                  "where each dataset is: `guidedrl runs show`")
    for r in reports:
        for note, n in r.notes.items():
            console.print(f"  {r.dataset}: {n} rows not counted as failing — {note}")
        for e in r.examples:
            console.print(f"  {r.dataset} {e['row']}: {e['check']}: {e['why']}")
    failures = sum(sum(r.failed.values()) for r in reports)
    console.print("every row's text is what its token ids say" if not failures else f"[red]{failures} failing rows[/]")
