"""The commands that run the pipeline: quickstart, run (and its dry run), rerun, online, deploy, bootstrap."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

from flows.cli.app import PROJECT_ROOT, QUICKSTART_CONFIG, MethodOpt, WorkspaceOpt, app, console, fail, parse_stages
from flows.cli.render import print_pass_table, print_results, print_rounds
from flows.errors import user_errors
from tasks.core import owner
from tasks.core.interrupt import is_stop


def _execute(raw: dict, base_dir: Path, workspace: Optional[Path], stages: Optional[list[str]], command: str = "run",
             force: Optional[list[str]] = None, rerun_of: Optional[str] = None, present: Optional[list[str]] = None,
             where: str = "<config>") -> None:
    """Run the pipeline flow with a run record; a failure ends in one line that names the stage and the fix.

    ``present``: the stages of the run being re-run (an optional upstream stage such as
    dpo for eval comes along when it ran); default: those whose output is in the store."""
    from tasks.registry import left_out, parse_config, preflight, select_stages, stored_optional
    from tasks.report.runs import RunRecord

    config = parse_config(raw, where=where, base_dir=base_dir)
    ws = config.workspace_dir(workspace)
    preflight(config, select_stages(stages, config=config), ws)
    owner.configure(config.store.heartbeat_seconds, config.store.lease_seconds)  # the run record's heartbeat from the start
    if present is None:
        present = stored_optional(stages, config, str(ws))
    to_run, skipped = select_stages(stages, present, config=config), left_out(stages, present, config=config)

    from flows.pipeline import pipeline  # after the checks: importing Prefect's flow engine costs seconds
    record = RunRecord.create(ws, command, raw, str(base_dir.resolve()), to_run, rerun_of=rerun_of, left_out=skipped)
    console.print(f"workspace: {ws}\nrun: {record.run_id} (record: {record.path})")
    print_left_out(skipped)
    stop_on_signals(record, f"guidedrl {command} again resumes where it stopped")
    try:
        with record.running():
            results = pipeline(raw_config=raw, base_dir=str(base_dir.resolve()), workspace=str(ws), stages=to_run,
                               force=force, run_record=str(record.path))
    except BaseException as exc:
        if is_stop(exc):
            stopped(record)
        closed = RunRecord.open(record.path)
        stage = closed.data.get("failed_stage")
        hint = f" — after fixing the cause: guidedrl rerun {record.run_id} --stage {stage} --downstream --workspace {ws}" if stage else ""
        fail(f"run {record.run_id} failed: {closed.data['error']}{hint}")
    print_results(results, skipped)
    console.print(f"run {record.run_id} completed; report: {record.dir / 'report.html'}")


def print_left_out(skipped: dict[str, str]) -> None:
    """The stages a run leaves out because nothing it trains reads them, one line each."""
    for stage, why in skipped.items():
        console.print(f"left out: {stage} — {why}", soft_wrap=True)


def stop_on_signals(record, resume: str) -> None:
    """SIGTERM / SIGINT end this run within seconds (tasks/core/interrupt.py): the record says `interrupted`."""
    from tasks.core import interrupt

    def on_stop(signum: int) -> None:
        from tasks.report.runs import RunRecord

        fresh = RunRecord.open(record.path)
        if fresh.data.get("status") == "running":  # the watchdog came first: the flow never unwound
            fresh.data["error"] = fresh.data.get("error") or f"interrupted ({signal_name(signum)})"
            fresh.finish("interrupted")
        console.print(f"run {record.run_id} interrupted ({signal_name(signum)}); {resume} (finished shards and stages are kept)")

    interrupt.install(on_stop)


def signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


def stopped(record) -> None:
    """The run unwound after a signal (the record is closed `interrupted`): end the process now, without waiting on
    worker threads still in a request or on Prefect's services."""
    from tasks.core import interrupt

    interrupt.finish()


def _dry_run(raw: dict, base_dir: Path, workspace: Optional[Path], stages: Optional[list[str]], where: str = "<config>") -> None:
    """Count what the judge stages would send; run nothing, send nothing."""
    from tasks.core.store import Store
    from tasks.registry import REGISTRY, left_out, parse_config, select_stages, stored_outputs

    config = parse_config(raw, where=where, base_dir=base_dir)
    ws = config.workspace_dir(workspace)
    print_left_out(left_out(stages, config=config))
    judged = [s for s in select_stages(stages, config=config) if hasattr(REGISTRY[s].impl, "dry_run")]
    if not judged:
        console.print("dry run: none of these stages sends judge requests; nothing to count.")
        return
    for stage in judged:
        found, missing = stored_outputs(config, ws, select_stages(list(REGISTRY[stage].upstream), config=config))
        note = ""
        if missing == "rubric":  # grading can be counted before the rubrics exist
            missing = None
            if config.judge.backend == "openai" and config.judge.rubric:
                note = " (counted before the rubrics exist: their items will make the prompts somewhat longer)"
        if missing:
            sends = "its own count is above" if missing in judged else "it sends no judge requests"
            console.print(f"[yellow]{stage}:[/] cannot count yet — it reads the output of `{missing}`, which has not run with this "
                          f"config in {ws}. Run `guidedrl run CONFIG --stages {missing}` first ({sends}).")
            continue
        p = REGISTRY[stage].impl.dry_run(config, Store(ws), found)
        if p["requests"] == 0:
            console.print(f"{stage}: 0 requests to send ({p.get('note') or str(p.get('cached', 0)) + ' answers cached'})")
            continue
        over = p.get("max_requests") is not None and p["requests"] > p["max_requests"]
        console.print(f"{stage}: would send {p['requests']} requests to {p['endpoint']} ({p['cached']} answers already cached), "
                      f"about {p['prompt_tokens']:,} prompt tokens and at most {p['max_completion_tokens']:,} completion tokens"
                      + (f" — [red]over judge.max_requests = {p['max_requests']}: the stage would refuse to start[/]" if over else "")
                      + f". Parse failures add one reminder request each{note}.")
    console.print("dry run: nothing was sent.")


@app.command()
def quickstart(workspace: Optional[Path] = typer.Option(Path("workspace"), "--workspace", "-w", help="Workspace directory.")):
    """Run the whole pipeline on the embedded defaults (tiny problems, no GPU, no network).

    Runs every stage of the pipeline (`guidedrl run configs/quickstart.yaml` does the same from the repository root).
    """
    from tasks.core.config import read_yaml

    if not QUICKSTART_CONFIG.is_file():
        fail(f"{QUICKSTART_CONFIG}: the embedded quickstart config is missing; run from a clone of the repository (pip install -e .)")
    try:
        _execute(read_yaml(QUICKSTART_CONFIG), PROJECT_ROOT, workspace, None, where=str(QUICKSTART_CONFIG))
    except user_errors() as exc:
        fail(str(exc))
    console.print(f"what these tables mean: {PROJECT_ROOT / 'docs' / 'getting-started.md'} (\"What the quickstart prints\"); "
                  "the whole manual: `guidedrl docs`")


@app.command()
def run(
    config: Path = typer.Argument(..., help="YAML config file (see configs/quickstart.yaml)."),
    stages: Optional[str] = typer.Option(None, "--stages", help="Comma-separated stages to run (default: all). Stages: curate, rollouts, filter, explain, hint, rubric, grade, materialize, dpo, grpo, eval."),
    workspace: Optional[Path] = WorkspaceOpt,
    set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set problems.eval_fraction=0.3 (repeatable)."),
    method: Optional[str] = MethodOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print how many judge requests (and roughly how many tokens) the rubric and grade stages would send; run and send nothing."),
):
    """Run the pipeline (a Prefect flow) on CONFIG. Finished stage outputs are reused."""
    from tasks.core.config import read_run_config

    try:
        raw, _ = read_run_config(config, method, set_)
        (_dry_run if dry_run else _execute)(raw, Path.cwd(), workspace, parse_stages(stages), where=str(config))
    except user_errors() as exc:
        fail(str(exc))


@app.command()
def deploy(
    config: Path = typer.Argument(..., help="The YAML config the scheduled runs use (read at each run, so edits take effect)."),
    work_pool: str = typer.Option("guidedrl", "--work-pool", help="Process work pool to create or use."),
    cron: str = typer.Option("0 2 * * *", "--cron", help="Schedule of the nightly data-generation deployment."),
    timezone: str = typer.Option("UTC", "--timezone"),
    workspace: Optional[Path] = WorkspaceOpt,
    stages: Optional[str] = typer.Option(None, "--stages", help="Stages of the data deployment (default: curate .. materialize)."),
):
    """Register the deployments (nightly data generation, on-demand training) on the Prefect server in PREFECT_API_URL.

    Then start a worker: prefect worker start --pool <work-pool>. Schedules need a real server
    (prefect server start, or Prefect Cloud); the temporary one of a plain `guidedrl run` does not run them."""
    from prefect.settings import PREFECT_API_URL

    from flows.deployments import register

    if not PREFECT_API_URL.value():
        fail("no Prefect server configured: start one (prefect server start) and set PREFECT_API_URL, e.g. "
              "prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api — schedules do not run on a temporary server")
    try:
        names = register(config, work_pool, cron, str(workspace) if workspace else None, timezone, parse_stages(stages))
    except user_errors() as exc:
        fail(str(exc))
    console.print(f"registered on {PREFECT_API_URL.value()}: {', '.join(names)} (work pool {work_pool}, nightly cron {cron!r} {timezone})")
    console.print(f"start a worker to run them: prefect worker start --pool {work_pool}")


@app.command()
def rerun(
    run_id: str = typer.Argument(..., help="The run to take the config and inputs from (guidedrl runs ls): its id, or a prefix naming one run."),
    stage: str = typer.Option(..., "--stage", help="The stage to run again."),
    downstream: bool = typer.Option(False, "--downstream", help="Also run again the stages of that run that depend on it."),
    workspace: Path = typer.Option(Path("workspace"), "--workspace", "-w", help="Workspace directory."),
):
    """Run one stage of an earlier run again (and, with --downstream, what depends on it), reusing every other
    finished stage output. Works in a fresh process long after the run: everything comes from its run record."""
    from tasks.registry import STAGES, downstream_of
    from tasks.report.runs import RunRecord

    try:
        r = RunRecord.load(workspace, run_id)
        requested = [s.split("/")[-1] for s in r.data["stages_requested"]]
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages are: {', '.join(STAGES)}")
        if stage not in requested:
            raise ValueError(f"run {r.run_id} did not run stage {stage!r}; it ran: {', '.join(requested)}")
        again = [stage] + (downstream_of(stage, requested) if downstream else [])
        console.print(f"rerun of {r.run_id}: running {', '.join(again)} again; other stages come from the store")
        _execute(r.data["config"], Path(r.data["base_dir"]), workspace, again, command="rerun", where=f"the config of run {r.run_id}",
                 force=again, rerun_of=r.run_id, present=requested)
    except user_errors() as exc:
        fail(str(exc))


@app.command()
def online(
    config: Path = typer.Argument(..., help="YAML config file (see configs/quickstart.yaml)."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="Rounds of rollouts -> guidance -> grading -> materialize -> update -> eval (default: train.grpo.rounds)."),
    workspace: Optional[Path] = WorkspaceOpt,
    set_: list[str] = typer.Option([], "--set", help="Override a config key (repeatable)."),
    method: Optional[str] = MethodOpt,
):
    """Online GRPO with guidance: each round a Prefect subflow; the new checkpoint feeds the next round.

    A run that was killed resumes at the round (and the stage) where it stopped: finished stage outputs are reused.
    """
    from flows.online import online as online_flow
    from tasks.core.config import read_run_config
    from tasks.models.serving import check_following
    from tasks.registry import left_out, parse_config, preflight, round_stages, select_stages
    from tasks.report.runs import RunRecord

    try:
        raw, _ = read_run_config(config, method, set_)
        cfg = parse_config(raw, where=str(config), base_dir=Path.cwd())
        ws = cfg.workspace_dir(workspace)
        preflight(cfg, select_stages(round_stages(), config=cfg, only_used=True), ws)
        owner.configure(cfg.store.heartbeat_seconds, cfg.store.lease_seconds)
        check_following(cfg, rounds or cfg.train.grpo.rounds)
        skipped = left_out(round_stages(), config=cfg, only_used=True)
        record = RunRecord.create(ws, "online", raw, str(Path.cwd().resolve()), [], left_out=skipped)
        console.print(f"workspace: {ws}\nrun: {record.run_id} (record: {record.path})")
        print_left_out(skipped)
    except user_errors() as exc:
        fail(str(exc))
    stop_on_signals(record, "`guidedrl online` again resumes where it stopped")
    try:
        with record.running():
            history = online_flow(raw_config=raw, base_dir=str(Path.cwd().resolve()), workspace=str(ws), rounds=rounds,
                                  run_record=str(record.path))
    except BaseException as exc:
        if is_stop(exc):
            stopped(record)
        fail(f"run {record.run_id} failed: {RunRecord.open(record.path).data['error']} — `guidedrl online` again resumes where it stopped")
    print_rounds(history)
    console.print(f"last checkpoint: {history[-1]['policy']}\nrun {record.run_id} completed; report: {record.dir / 'report.html'}")


@app.command()
def bootstrap(
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write the checkpoint (default: data/models/tiny-policy, "
                                       "tiny-gpt2bpe or tiny-spm by --tokenizer)."),
    tokenizer: str = typer.Option("char", "--tokenizer", help="char — one token per character, the quickstart's; gpt2-bpe — "
                                  "GPT-2's byte-level BPE (from the openai-whisper source package) with Qwen's ChatML template and "
                                  "a <think> block; spm — a SentencePiece BPE with byte fallback trained on the problems, with "
                                  "Llama 2's template (tasks/models/tiny_tokenizers.py)."),
    family: str = typer.Option("chain2", "--family", help="Task family (tasks/models/tiny_policy.py: FAMILIES): chain2 — the quickstart's "
                               "policy (hard = sums of two 2-digit numbers); chain6 — the learning study's (hard = chains of 6 digits)."),
    seed: int = typer.Option(0, help="Seed: the same seed reproduces the checkpoint."),
    steps: Optional[int] = typer.Option(None, help="Training steps (default: TinyPolicyConfig.steps)."),
    hard_fraction: Optional[float] = typer.Option(None, help="How often the hard level appears in training."),
    eval_problems: int = typer.Option(40, help="Problems per level for the pass@k report."),
    eval_samples: int = typer.Option(64, help="Samples per problem for the pass@k report."),
    size: str = typer.Option("tiny", "--size", help="Model size (tasks/models/tiny_policy.py: SIZES): tiny — the CPU quickstart's "
                             "(~0.8M parameters); 100m — ~99M parameters of the same family, to check a GPU end to end."),
    device: str = typer.Option("cpu", "--device", help="Where to train it: cpu | cuda | cuda:N | auto (a GPU when torch sees one)."),
):
    """Build a tiny CPU policy from scratch (a tokenizer + small Llama), train it and report pass@k."""
    from flows.bootstrap import bootstrap as bootstrap_flow
    from tasks.core.config import ConfigError
    from tasks.models.policy import resolve_device
    from tasks.models.tiny_policy import FAMILIES, SIZES, TOKENIZER_MODELS
    from tasks.models.tiny_tokenizers import tokenizer_requirement

    if tokenizer not in TOKENIZER_MODELS:
        fail(f"unknown --tokenizer {tokenizer!r}; tokenizers: {', '.join(TOKENIZER_MODELS)}")
    if family not in FAMILIES:
        fail(f"unknown --family {family!r}; families: {', '.join(FAMILIES)}")
    if size not in SIZES:
        fail(f"unknown --size {size!r}; sizes: {', '.join(SIZES)}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        fail(f"--device {device!r}: one of auto, cpu, cuda, cuda:N")
    try:
        device = resolve_device(device)
    except ConfigError as exc:
        fail(str(exc).replace("policy.device", "--device"))
    try:
        missing = tokenizer_requirement(tokenizer)
    except FileNotFoundError as exc:
        missing = str(exc)
    if missing:
        fail(f"--tokenizer {tokenizer}: {missing}")
    cfg = {**FAMILIES[family], **SIZES[size], **TOKENIZER_MODELS[tokenizer].get(size, {}), "seed": seed, "tokenizer": tokenizer}
    out = out or PROJECT_ROOT / "data" / "models" / TOKENIZER_MODELS[tokenizer]["dir"]
    if steps is not None:
        cfg["steps"] = steps
    if hard_fraction is not None:
        cfg["hard_fraction"] = hard_fraction
    info = bootstrap_flow(out_dir=str(out), cfg=cfg, problems_per_level=eval_problems, n=eval_samples, device=device)
    console.print(f"tiny policy written to {out} ({info['parameters'] / 1e6:.2f}M parameters, {info['train_seconds']:.0f}s of training)")
    print_pass_table("plain prompt (the question alone)", info["eval"]["plain"])
    print_pass_table("explain prompt (the answer given)", info["eval"]["explain"])
    print_pass_table("plain prompt, a right answer counted only with every partial sum of the reference stated",
                     info["eval"]["plain_with_derivation"])
    print_pass_table("explain prompt, the same", info["eval"]["explain_with_derivation"])
