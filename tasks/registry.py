"""The stage registry: every stage module under tasks/stages, in pipeline order, and
the run config composed of their sections.

A stage is found by its module declaring ``STAGE = Stage(...)`` (tasks/core/stage.py);
modules whose name starts with ``_`` are shared helpers, not stages. The pipeline
order is the stage graph's topological order (a stage after everything it reads,
ties by name). Everything that needs the graph reads it here: `--stages` upstream
resolution, `rerun --downstream`, the Prefect wiring, the online round, the report.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from pydantic import Field, ValidationError, create_model, model_validator

import tasks.stages
from tasks.core.config import BaseConfig, ConfigError, StrictModel, apply_overrides, read_yaml, validate
from tasks.core.stage import Stage
from tasks.core.store import StageOutput, Store


def _discover() -> dict[str, Stage]:
    found: dict[str, Stage] = {}
    for info in pkgutil.iter_modules(tasks.stages.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"tasks.stages.{info.name}")
        stage = getattr(module, "STAGE", None)
        if not isinstance(stage, Stage):
            raise TypeError(f"{module.__file__}: a stage module must declare STAGE = Stage(...)")
        if stage.name in found:
            raise ValueError(f"stage {stage.name!r} declared twice ({found[stage.name].module}, {stage.module})")
        found[stage.name] = stage
    return found


def _pipeline_order(stages: dict[str, Stage]) -> tuple[str, ...]:
    """Kahn's algorithm over required and optional upstream edges; ties by name."""
    for s in stages.values():
        unknown = [u for u in (*s.upstream, *s.optional_upstream) if u not in stages]
        if unknown:
            raise ValueError(f"stage {s.name} reads unknown stage(s) {unknown}")
    order: list[str] = []
    while len(order) < len(stages):
        ready = sorted(n for n, s in stages.items() if n not in order and set(s.upstream) | set(s.optional_upstream) <= set(order))
        if not ready:
            raise ValueError(f"the stage graph has a cycle among {sorted(set(stages) - set(order))}")
        order.append(ready[0])
    return tuple(order)


_FOUND = _discover()
#: stage names in pipeline order
STAGES: tuple[str, ...] = _pipeline_order(_FOUND)
#: stage name -> its declaration, in pipeline order
REGISTRY: dict[str, Stage] = {name: _FOUND[name] for name in STAGES}


def stage(name: str) -> Stage:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(STAGES)}") from None


# --------------------------------------------------------------------------- the stage graph


def _known(stages) -> list[str]:
    stages = list(stages)
    unknown = [s for s in stages if s not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are: {', '.join(STAGES)}")
    return stages


def guidance_read(name: str, config, run) -> dict[str, str | None]:
    """What stage ``name`` makes of its optional upstream in a run of ``run`` (stage names) under ``config``: each
    optional upstream stage -> None where it reads it, else why not. A stage module's ``reads(config, run)`` says
    (materialize: the guidance its datasets' trainers use); without one, or without a config, an optional upstream
    stage is read when it is in the run (eval: the checkpoints of the run)."""
    s = REGISTRY[name]
    hook = getattr(s.impl, "reads", None)
    if hook is None or config is None:
        return {u: None if u in run else "not in this run" for u in s.optional_upstream}
    return hook(config, set(run))


def upstream_closure(stages, with_optional=(), config=None, run=None) -> set[str]:
    """``stages`` and every stage they read, transitively: required upstream always, optional upstream (eval reads
    dpo, grpo) when it is in ``with_optional`` — and, with ``config``, when a stage's ``reads`` says that this config
    uses it (materialize reads the guidance its trainers use; ``run``: the stages the trainers are looked for in)."""
    wanted, todo = set(), _known(stages)
    run = set(run if run is not None else stages)
    while todo:
        s = todo.pop()
        if s in wanted:
            continue
        wanted.add(s)
        todo.extend(REGISTRY[s].upstream)
        if hasattr(REGISTRY[s].impl, "reads"):  # (without a config: all it may read)
            todo.extend(u for u, why in guidance_read(s, config, run).items() if why is None or config is None)
        else:
            todo.extend(u for u in REGISTRY[s].optional_upstream if u in with_optional)
    return wanted


def select_stages(requested: list[str] | None, present=(), config=None, only_used: bool | None = None) -> list[str]:
    """The stages to run for ``requested`` with everything they read, in pipeline order.

    A stage brings along what it reads, transitively. An optional upstream stage
    (eval measures the dpo and grpo checkpoints) comes along when it is requested
    too or is in ``present``: it ran in the run being re-run, or its output for
    this config is in the store (``stored_optional``). With ``config``, a stage that
    declares what it reads (materialize: the guidance its trainers use) brings only
    that; and with ``only_used`` (default: when no stages are requested, i.e. the
    whole pipeline) the stages nothing in the run reads are left out (``left_out``
    says which and why). Resolving a resolved list gives the same list."""
    return [s for s in STAGES if s in _selection(requested, present, config, only_used)[0]]


def left_out(requested: list[str] | None, present=(), config=None, only_used: bool | None = None) -> dict[str, str]:
    """The stages of the pipeline (or of ``requested``) that a run under ``config`` leaves out, and why: the guidance
    that no update of the run reads (``select_stages``)."""
    return _selection(requested, present, config, only_used)[1]


def _selection(requested, present, config, only_used) -> tuple[set[str], dict[str, str]]:
    prune = (requested is None) if only_used is None else only_used
    requested = _known(requested or STAGES)
    run = {*requested, *present}
    wanted = upstream_closure(requested, with_optional={*requested, *present}, config=config, run=run)
    why: dict[str, str] = {}
    if config is None or not prune:
        return wanted, why
    kept: set[str] = set()
    for s in reversed(STAGES):  # consumers before what they read
        if s not in wanted:
            continue
        consumers = [c for c in wanted if s in (*REGISTRY[c].upstream, *REGISTRY[c].optional_upstream)]
        if not consumers:  # a product of the run (a checkpoint, eval): kept
            kept.add(s)
            continue
        readers = [c for c in consumers if c in kept and (s in REGISTRY[c].upstream or guidance_read(c, config, run).get(s) is None)]
        if readers:
            kept.add(s)
            continue
        reasons = [f"{c}: {guidance_read(c, config, run)[s]}" for c in consumers if c in kept and s not in REGISTRY[c].upstream]
        left = [c for c in consumers if c not in kept]
        why[s] = "; ".join(reasons + ([f"read only by {', '.join(sorted(left))}, left out"] if left else []))
    return kept, why


def downstream_of(name: str, stages: list[str]) -> list[str]:
    """The stages among ``stages`` that read ``name``'s output, directly or not, in pipeline order."""
    found = {name}
    for s in STAGES:
        if s in stages and ({*REGISTRY[s].upstream, *REGISTRY[s].optional_upstream} & found):
            found.add(s)
    return [s for s in STAGES if s in found and s != name]


def round_stages() -> list[str]:
    """The stages of one round of `guidedrl online`, in pipeline order."""
    return [s for s in STAGES if REGISTRY[s].online]


def upstream_of(name: str, outputs: dict, config=None, run=None) -> dict:
    """What stage ``name`` reads out of ``outputs`` (stage -> output or path): its required upstream, and its optional
    upstream where present (and, with ``config``, where the stage's ``reads`` says this config uses it in a run of the
    stages ``run``)."""
    s = REGISTRY[name]
    used = (guidance_read(name, config, set(run) if run is not None else set(outputs) | {name}) if config is not None
            else {u: None for u in s.optional_upstream})
    return {**{u: outputs[u] for u in s.upstream}, **{u: outputs[u] for u in s.optional_upstream if u in outputs and used.get(u) is None}}


def preflight(config, stages: list[str], workspace: str | Path) -> None:
    """Everything that can be checked before the flow starts, checked: the workspace
    can be written, and each stage's ``preflight(config)`` (sources readable and
    decodable, the policy's model and tokenizer directories, the judge's settings).
    Raises the user error (one line naming the file or config key); costs no Prefect
    server start-up."""
    import tempfile

    from tasks.core.locks import check_locking

    ws = Path(workspace)
    try:
        ws.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=ws, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{ws}: the workspace cannot be written ({exc.strerror or exc}); choose another with --workspace "
                          "or `workspace:` in the config") from None
    try:
        check_locking(ws / "store")
    except OSError as exc:
        raise ConfigError(str(exc)) from None
    for name in stages:
        check = getattr(REGISTRY[name].impl, "preflight", None)
        if check is not None:
            check(config)


def mermaid() -> str:
    """The stage graph as a mermaid flowchart (docs/architecture.md shows it; a test keeps them equal).
    Solid arrows: what a stage reads; dotted: read when it ran; [[double boxes]]: sharded stages."""
    lines = ["flowchart LR"]
    lines += [f"    {name}[[{name}]]" if s.sharded else f"    {name}[{name}]" for name, s in REGISTRY.items()]
    for name, s in REGISTRY.items():
        lines += [f"    {u} --> {name}" for u in s.upstream]
        lines += [f"    {u} -.-> {name}" for u in s.optional_upstream]
    return "\n".join(lines)


def stored_outputs(config, workspace: str | Path, stages: list[str]) -> tuple[dict[str, StageOutput], str | None]:
    """The finished outputs of ``stages`` (in pipeline order) for this config, looked
    up in the store without running anything (each stage keyed on what it reads under
    this config in a run of ``stages``); stops at the first stage whose output is not
    there and returns its name."""
    store, found = Store(workspace), {}
    for name in stages:
        out = store.get(name, REGISTRY[name].key_for(config, upstream_of(name, found, config, stages))[0])
        if out is None:
            return found, name
        found[name] = out
    return found, None


def stored_optional(requested: list[str] | None, config, workspace: str | Path) -> set[str]:
    """The optional upstream stages of ``requested`` whose output for this config is
    already in the store (with everything they read): they ran, so a stage that
    reads them when they ran (eval) reads them again."""
    wanted = upstream_closure(requested or STAGES)
    present = set()
    for opt in sorted({u for s in wanted for u in REGISTRY[s].optional_upstream} - wanted):
        if stored_outputs(config, workspace, select_stages([opt], config=config))[1] is None:
            present.add(opt)
    return present


# --------------------------------------------------------------------------- the config


def _section_field(model: type) -> tuple[type, object]:
    try:
        model()
    except ValidationError:
        return model, ...  # a section with required keys must be given (problems.sources)
    return model, Field(default_factory=model)


def _compose_config() -> type[BaseConfig]:
    """The run config: BaseConfig's shared sections plus each stage's own section
    (dotted sections such as `train.grpo` nest)."""
    top: dict[str, tuple] = {}
    nested: dict[str, dict[str, tuple]] = {}
    for s in REGISTRY.values():
        if s.section is None:
            continue
        head, _, rest = s.section.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = _section_field(s.settings_model)
        else:
            top[head] = _section_field(s.settings_model)
    for head, fields in nested.items():
        model = create_model(f"{head.title()}Config", __base__=StrictModel, **fields)
        top[head] = (model, Field(default_factory=model))

    def _known_stages(self):
        bad = sorted(set(self.prefect.stage_retries) - set(STAGES))
        if bad:
            raise ValueError(f"prefect.stage_retries: unknown stage(s) {bad}; allowed: {list(STAGES)}")
        return self

    return create_model("Config", __base__=BaseConfig, __validators__={"_known_stages": model_validator(mode="after")(_known_stages)},
                        **top)


#: the run config (one YAML file): shared sections + every stage's section
Config = _compose_config()


def parse_config(raw: dict, *, where: str = "<config>", base_dir: Path | None = None):
    """A raw config (a dict from YAML) validated; relative paths resolve against ``base_dir``."""
    return validate(Config, raw, where=where, base_dir=base_dir)


def load_config(path: Path | str, overrides: list[str] = (), base_dir: Path | None = None):
    """Load, override and validate a config file. Relative paths in it resolve
    against ``base_dir`` (default: the current directory)."""
    raw = apply_overrides(read_yaml(path), list(overrides))
    return parse_config(raw, where=str(path), base_dir=base_dir)


__all__ = ["Config", "ConfigError", "REGISTRY", "STAGES", "Stage", "downstream_of", "guidance_read", "left_out", "load_config", "mermaid",
           "parse_config", "round_stages",
           "select_stages", "stage", "stored_optional", "stored_outputs", "upstream_closure", "upstream_of"]
