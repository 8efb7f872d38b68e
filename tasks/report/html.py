"""The run report: `<workspace>/runs/<run_id>/report.html` and its PNG charts.

Stage timings, pass rates by level before/after training, how many stuck
problems each guidance method unlocked, the judge's parse rate and score
histogram, and links to every dataset the run used or made. Written from the
run record alone (and the stage outputs it points at), after the run ends —
failed runs included.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

from tasks.models import served
from tasks.report.frontier import GUIDANCE

#: a frontier guidance column's heading
FRONTIER_HEADS = {"explain": "explain", "hint": "hint", "prefix": "prefix", "self_hint": "self-hint", "judge": "judge partial"}
#: the guidance stages whose summaries count unlocked stuck problems, and the method each belongs to
GUIDED_BY = {"explain": "ExPO", "hint": "LTE", "prefix": "reference prefix", "self_hint": "self-hint"}

log = logging.getLogger("guidedrl.report")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1f2328;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #d0d7de;padding-bottom:.3rem}
.meta{color:#59636e} table{border-collapse:collapse;margin:.6rem 0;font-size:.92rem}
th,td{border:1px solid #d0d7de;padding:.35rem .6rem;text-align:left;vertical-align:top} th{background:#f6f8fa}
td.num{text-align:right;font-variant-numeric:tabular-nums} .ok{color:#1a7f37;font-weight:600} .bad{color:#cf222e;font-weight:600}
.muted{color:#59636e} img{max-width:100%;border:1px solid #d0d7de;border-radius:6px;margin:.4rem 0}
.error{background:#ffebe9;border:1px solid #ff8182;border-radius:6px;padding:.6rem .8rem} code{font-size:.85rem}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:1rem}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _stage_name(name: str) -> str:
    return name.split("/")[-1]


def _charts(record, out_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts = {}
    stages = [(n, s.get("seconds") or 0.0, s.get("status")) for n, s in record.data["stages"].items() if "seconds" in s]
    if stages:
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(stages) + 1))
        colors = {"computed": "#2da44e", "failed": "#cf222e"}
        ax.barh([n for n, _, _ in stages][::-1], [t for _, t, _ in stages][::-1],
                color=[colors.get(st, "#8c959f") for _, _, st in stages][::-1])
        ax.set_xlabel("seconds (grey: reused from the store)")
        fig.tight_layout()
        fig.savefig(out_dir / "timings.png", dpi=110)
        plt.close(fig)
        charts["timings"] = "timings.png"
    grades = [s["summary"] for n, s in record.data["stages"].items() if _stage_name(n) == "grade" and s.get("summary")]
    if grades and grades[-1].get("outcome_histogram"):
        hist = grades[-1]["outcome_histogram"]
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(list(hist), list(hist.values()), color="#0969da")
        ax.set_xlabel("outcome score (0-1)")
        ax.set_ylabel("traces")
        ax.set_title(f"judge scores (parse rate {grades[-1].get('parse_rate')})")
        fig.tight_layout()
        fig.savefig(out_dir / "judge.png", dpi=110)
        plt.close(fig)
        charts["judge"] = "judge.png"
    charts.update(_round_charts(record, out_dir, plt))
    for n, s in record.data["stages"].items():
        png = Path(s.get("path", "")) / "charts" / "eval.png"
        if _stage_name(n) == "eval" and png.is_file():
            target = out_dir / f"eval-{n.replace('/', '-')}.png"
            target.write_bytes(png.read_bytes())
            charts.setdefault("eval", [])
            charts["eval"].append(target.name)
    return charts


def update_label(raw_config: dict) -> str:
    """What the run's update learns from, by the materialize settings (their defaults where unset)."""
    from tasks.stages.materialize import MaterializeConfig

    m = {k: f.default for k, f in MaterializeConfig.model_fields.items()} | dict(raw_config.get("materialize") or {})
    used = [name for name, on in (("ExPO explanations", m["include_explanations"]), ("LTE hinted samples", m["lte_replace"]),
                                  ("ExpRL judge rewards", m["reward"] == "judge")) if on]
    return "update with " + (", ".join(used) if used else "verified rewards only (plain GRPO)")


def eval_curve(stages: dict) -> dict[str, list[tuple[int, float]]]:
    """level -> [(round, pass@1)] of the eval split: round 0 the starting policy, then each round's checkpoint."""
    curve: dict[str, list[tuple[int, float]]] = {}
    rounds = sorted(int(n.split("/")[0].removeprefix("round-")) for n in stages if n.startswith("round-") and n.endswith("/eval"))
    for r in rounds:
        passes = (stages[f"round-{r}/eval"].get("summary") or {}).get("pass", {})
        for label, at in (("base", 0), ("grpo", r)):
            if label == "base" and r != rounds[0]:
                continue
            for level, t in passes.get(label, {}).items():
                curve.setdefault(level, []).append((at, t["pass@1"]))
    return curve


def _round_charts(record, out_dir: Path, plt) -> dict[str, str]:
    """The frontier chart (stuck-set size by round, and the stuck problems each guidance reached) and
    the eval split's learning curve by round, for runs with a frontier or with rounds."""
    charts = {}
    front = record.data["stages"].get("frontier", {}).get("summary", {}).get("by_round")
    if front:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        rounds = [r["round"] for r in front]
        ax.plot(rounds, [r["stuck"] for r in front], "o-", color="#cf222e", label="stuck set", linewidth=2)
        for g, color, what in (("explain", "#0969da", "a right self-explanation"), ("hint", "#8250df", "a right hinted sample"),
                               ("judge", "#bf8700", "judge partial credit")):
            if any(r[g] is not None for r in front):
                ax.plot(rounds, [r[g] or 0 for r in front], "s--", color=color, label=f"stuck, with {what}")
        ax.plot(rounds, [r["left_stuck"] for r in front], "^:", color="#1a7f37", label="left the stuck set")
        ax.set_xlabel("round")
        ax.set_ylabel("problems")
        ax.set_xticks(rounds)
        ax.set_title(update_label(record.data.get("config") or {}), fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "frontier.png", dpi=110)
        plt.close(fig)
        charts["frontier"] = "frontier.png"
    curve = eval_curve(record.data["stages"])
    if curve and max(len(v) for v in curve.values()) > 1:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for level, pts in sorted(curve.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ":" if level == "all" else "o-", color="#8c959f" if level == "all" else None,
                    label=level)
        ax.set_xticks(sorted({p[0] for pts in curve.values() for p in pts}))
        ax.set_xlabel("round (0: the starting policy)")
        ax.set_ylabel("eval pass@1")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "learning.png", dpi=110)
        plt.close(fig)
        charts["learning"] = "learning.png"
    return charts


def _pass_table(passes: dict) -> str:
    """pass@1 / pass@n by level, one column per policy; an `errors` column (failed generations, left out of
    pass@k) when there were any."""
    if not passes:
        return ""
    labels = list(passes)
    levels = list(next(iter(passes.values())))
    n = max((v.get("n", 0) for t in passes.values() for v in t.values()), default=0)
    errors = {lvl: sum(passes[lab][lvl].get("errors", 0) for lab in labels if lvl in passes[lab]) for lvl in levels}
    shown = any(errors.values())
    rows = "".join(
        f"<tr><td>{_e(lvl)}</td>" + "".join(
            f"<td class=num>{passes[lab][lvl]['pass@1']:.3f} / {passes[lab][lvl].get(f'pass@{n}', 0):.3f}</td>" if lvl in passes[lab]
            else "<td>-</td>" for lab in labels) + (f"<td class=num>{errors[lvl]}</td>" if shown else "") + "</tr>" for lvl in levels)
    head = "".join(f"<th>{_e(lab)}<br><span class=muted>pass@1 / pass@{n}</span></th>" for lab in labels)
    head += "<th>errors<br><span class=muted>failed generations</span></th>" if shown else ""
    return f"<table><tr><th>level</th>{head}</tr>{rows}</table>"


def render(record, charts: dict) -> str:
    d = record.data
    status_cls = "ok" if record.status == "completed" else "bad"
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>guidedrl run {_e(record.run_id)}</title><style>{CSS}</style></head><body>",
             f"<h1>guidedrl run <code>{_e(record.run_id)}</code></h1>",
             f"<p class=meta>{_e(d['command'])} · <span class={status_cls}>{_e(record.status)}</span> · started {_e(d['started'])} · "
             f"finished {_e(d.get('finished') or '-')} · workspace <code>{_e(d['workspace'])}</code>"
             + (f" · rerun of <code>{_e(d['rerun_of'])}</code>" if d.get("rerun_of") else "") + "</p>"]
    if d.get("error"):
        parts.append(f"<div class=error><b>Failed.</b> {_e(d['error'])}</div>")

    from tasks.registry import REGISTRY

    parts.append("<h2>Stages</h2><table><tr><th>stage</th><th>status</th><th>seconds</th><th>result</th><th>output</th><th>error</th></tr>")
    for name, s in d["stages"].items():
        st = s.get("status", "")
        cls = "ok" if st == "computed" else "bad" if st == "failed" else "muted"
        path = s.get("path", "")
        link = f"<a href='file://{_e(path)}'><code>{_e(Path(path).name)}</code></a>" if path else ""
        stage = REGISTRY.get(_stage_name(name))
        result = stage.describe(s["summary"]) if stage and s.get("summary") else ""
        parts.append(f"<tr><td>{_e(name)}</td><td class={cls}>{_e(st)}</td><td class=num>{_e(s.get('seconds', ''))}</td>"
                     f"<td>{_e(result)}</td><td>{link}</td><td>{_e(s.get('error', ''))}</td></tr>")
    parts.append("</table>")
    if d.get("left_out"):
        parts.append("<p class=meta>Left out (nothing this run trains reads them): "
                     + "; ".join(f"<b>{_e(s)}</b> — {_e(why)}" for s, why in d["left_out"].items()) + "</p>")
    if "timings" in charts:
        parts.append(f"<img src='{charts['timings']}' alt='stage timings'>")

    summaries = {n: s.get("summary") or {} for n, s in d["stages"].items()}
    rollouts = [(n, v) for n, v in summaries.items() if _stage_name(n) == "rollouts" and v.get("pass")]
    evals = [(n, v) for n, v in summaries.items() if _stage_name(n) == "eval" and v.get("pass")]
    if rollouts or evals:
        parts.append("<h2>Pass rates by level</h2>")
        for n, v in rollouts:
            server = served.describe(v.get("server"))
            parts.append(f"<p>{_e(n)}: the policy's rollouts ({_e(v.get('samples'))} samples{'; ' + _e(server) if server else ''})</p>"
                         + _pass_table({"rollouts": {k: x for k, x in v["pass"].items()}}))
        for n, v in evals:
            parts.append(f"<p>{_e(n)}: eval split, before/after training</p>" + _pass_table(v["pass"]))
        for png in charts.get("eval", []):
            parts.append(f"<img src='{png}' alt='eval chart'>")

    front = summaries.get("frontier", {}).get("by_round")
    if front or "learning" in charts:
        parts.append("<h2>Frontier and learning by round</h2>")
    if front:
        parts.append(f"<p>{_e(update_label(d.get('config') or {}))}. The stuck set: problems the round rolled out and never solved; "
                     "the guidance columns count the stuck problems it produced a verified sample for (<code>guidedrl frontier "
                     f"{_e(record.run_id)}</code> lists the problems).</p><table><tr><th>round</th><th>problems</th><th>stuck</th>"
                     + "".join(f"<th>{_e(FRONTIER_HEADS[g])}</th>" for g in GUIDANCE) + "<th>left the stuck set</th></tr>")
        for r in front:
            cells = [r["round"], r["problems"], r["stuck"], *("-" if r.get(g) is None else r[g] for g in GUIDANCE), r["left_stuck"]]
            parts.append("<tr>" + "".join(f"<td class=num>{_e(c)}</td>" for c in cells) + "</tr>")
        parts.append("</table><div class=grid>" + (f"<div><img src='{charts['frontier']}' alt='frontier'></div>" if "frontier" in charts else ""))
        parts.append((f"<div><img src='{charts['learning']}' alt='eval by round'></div>" if "learning" in charts else "") + "</div>")
    elif "learning" in charts:
        parts.append(f"<img src='{charts['learning']}' alt='eval by round'>")

    guided = [(n, v) for n, v in summaries.items() if _stage_name(n) in GUIDED_BY and "stuck_problems" in v]
    if guided:
        parts.append("<h2>Stuck problems unlocked by guidance</h2><table><tr><th>stage</th><th>stuck</th><th>unlocked</th>"
                     "<th>fraction</th><th>kept samples</th><th>with every step right</th></tr>")
        for n, v in guided:
            parts.append(f"<tr><td>{_e(n)} ({GUIDED_BY[_stage_name(n)]})</td><td class=num>{v['stuck_problems']}</td>"
                         f"<td class=num>{v['unlocked_problems']}</td><td class=num>{v['unlocked_fraction']:.1%}</td>"
                         f"<td class=num>{v.get('kept')}</td><td class=num>{v.get('kept_with_all_steps_right', '-')}</td></tr>")
        parts.append("</table>")

    grades = [(n, v) for n, v in summaries.items() if _stage_name(n) == "grade" and v]
    if grades:
        parts.append("<h2>Judge</h2><div class=grid><div><table>")
        n, v = grades[-1]
        req = v.get("judge_requests", {})
        for k, val in [("judge", v.get("judge")), ("mode", v.get("mode")), ("traces graded", f"{v.get('graded')} / {v.get('traces')}"),
                       ("parse rate", v.get("parse_rate")), ("mean outcome (right / wrong answer)",
                                                             f"{v.get('mean_outcome_if_correct')} / {v.get('mean_outcome_if_wrong')}"),
                       ("agreement with answer correctness", v.get("agreement_with_correctness")),
                       ("requests / cache hits / retries", f"{req.get('requests', 0)} / {req.get('cache_hits', 0)} / {req.get('retries', 0)}")]:
            parts.append(f"<tr><th>{_e(k)}</th><td>{_e(val)}</td></tr>")
        parts.append("</table></div><div>" + (f"<img src='{charts['judge']}' alt='judge scores'>" if "judge" in charts else "") + "</div></div>")

    parts.append("<h2>Datasets</h2><table><tr><th>stage</th><th>dataset</th><th>rows</th><th>path</th></tr>")
    for name, s in d["stages"].items():
        path = Path(s.get("path", ""))
        manifest = path / "manifest.json"
        if not manifest.is_file():
            continue
        for ds, meta in json.loads(manifest.read_text()).get("datasets", {}).items():
            parts.append(f"<tr><td>{_e(name)}</td><td>{_e(ds)}</td><td class=num>{meta.get('num_rows')}</td>"
                         f"<td><a href='file://{_e(path / ds)}'><code>{_e(path / ds)}</code></a></td></tr>")
    parts.append("</table><p class=muted>Each dataset directory holds manifest.json, data/*.parquet and (training datasets) a README.md card.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(record) -> Path:
    """Write report.html (and its charts) into the run's directory; never fails the run."""
    out = record.dir / "report.html"
    try:
        charts = _charts(record, record.dir)
        tmp = out.with_name(".report.html.tmp")
        tmp.write_text(render(record, charts))
        tmp.replace(out)
    except Exception as exc:  # a report is a convenience: say so and go on
        log.warning("could not write the run report %s: %s", out, exc)
    return out
