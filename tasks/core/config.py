"""The run configuration's shared machinery: one YAML file, validated by pydantic.

The config is composed in tasks/registry.py: the sections every stage shares
are here (`workspace`, `policy`, `prompts`, `judge`, `prefect`: `BaseConfig`),
each stage's own section lives in its module (tasks/stages/<name>.py). Keys
follow the stage names of DESIGN.md. Unknown keys are errors (a typo must
not silently fall back to a default); every error names the key path and, where
there is a fixed set, the allowed values.

Secrets never appear in a config: a key that names an API key, token, secret or
password must be written ``<name>_env: VARIABLE`` and the value is read from
that environment variable when it is used. Configs are copied into manifests
and run records that other teams receive.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.core.owner import Lease

_SECRET_KEY = re.compile(r"(^|[_-])(api[_-]?key|secret[_-]?key|access[_-]?key|token|secret|password|passwd)$", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@", re.I)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key."""


class StrictModel(BaseModel):
    """A config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class ServeConfig(StrictModel):
    """How a served policy (backend openai) follows each online round's checkpoint (`guidedrl online`)."""

    follow: Literal["none", "restart", "lora"] = Field(
        "none", description="none: the server is left as it is (rounds after the first sample an older policy: refused); "
        "restart: run `restart_command` on the new checkpoint and wait until the server lists it; lora: load the round's "
        "LoRA adapter through vLLM's /v1/load_lora_adapter (needs train.grpo.lora) and sample it by its name")
    restart_command: str | None = Field(
        None, description="shell command template that (re)starts the server on a checkpoint: {checkpoint}, {model} (the "
        "served name), {port}, {base_url}; e.g. `MODEL={checkpoint} NAME={model} PORT={port} infra/vllm-serve.sh`. If it "
        "keeps running it is the server: guidedrl stops it (its process group) before the next restart and at the end")
    ready_timeout_seconds: float = Field(900.0, gt=0, description="how long to wait for the server to list the new checkpoint")

    @model_validator(mode="after")
    def _restart_needs_a_command(self):
        if self.follow == "restart" and not self.restart_command:
            raise ValueError("policy.serve.follow: restart needs policy.serve.restart_command (e.g. "
                             "`MODEL={checkpoint} NAME={model} PORT={port} infra/vllm-serve.sh`)")
        return self


class PolicyConfig(StrictModel):
    """The policy that generates: a local checkpoint or a served model."""

    model: str = Field("data/models/tiny-policy", description="local checkpoint dir (transformers, vllm) or served model name (openai)")
    backend: Literal["transformers", "openai", "vllm"] = "transformers"
    tokenizer: str | None = Field(None, description="local tokenizer dir whose chat template wraps prompts; default: `model` when it is a directory")
    # transformers
    batch_size: int = Field(64, gt=0, description="sequences per generate() / scoring forward pass (at most)")
    batch_tokens: int | None = Field(
        None, gt=0, description="memory-aware batching: at most this many padded tokens (prompt + max_new_tokens) per batch, "
        "so short prompts batch wide and long ones narrow; e.g. 65536 for a 1.5B model on an 80 GB GPU. Out of device memory, "
        "a batch is retried at half its size and a warning says so (whatever this is)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$",
                        description="where the stages that load the model run it: auto (cuda when one is visible, else cpu) | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bfloat16 on a GPU that supports it, float32 on CPU. Training keeps float32 weights and runs "
        "under bfloat16 autocast")
    # openai
    base_url: str | None = Field(None, description="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (default: OPENAI_BASE_URL)")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key")
    concurrency: int = Field(16, gt=0, description="requests in flight")
    timeout_seconds: float = Field(120.0, gt=0)
    max_retries: int = Field(5, ge=0, description="retries with exponential backoff on 429, 5xx and time-outs")
    policy_id: str | None = Field(None, description="name of a served policy's weights (default: the fingerprint of "
                                  "`checkpoint` when it is a directory, else openai:<model>)")
    checkpoint: str | None = Field(None, description="the local checkpoint directory the served policy's weights come from: "
                                   "what dpo and grpo train and what policy_id names (default: `model` when it is a directory)")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="how a served policy follows the checkpoint "
                               "each `guidedrl online` round trains")
    server: Literal["auto", "vllm", "sglang", "generic"] = Field(
        "auto", description="what kind of OpenAI-compatible server serves the policy: auto (asked once per stage: /v1/models and "
        "a short probe request; a field it refuses is not sent again) | vllm (token ids, sampled and prompt log-probs: the exact "
        "path) | sglang | generic (text only: token ids from the policy's tokenizer, log-probs from the local checkpoint)")
    max_error_fraction: float = Field(
        0.0, ge=0, le=1, description="the share of a sampling stage's prompts whose generation may fail (after the client's "
        "retries) before the stage fails and publishes nothing; failed generations are never data: they are counted apart "
        "and left out of pass@k, filter, guidance, grades and training (0: any failure fails the stage)")
    # vllm
    engine: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of vllm.LLM, e.g. tensor_parallel_size")


class PromptsConfig(StrictModel):
    """Prompt templates: a built-in name (tasks/models/prompts/<name>.txt) or a file path."""

    plain: str = "plain"
    explain: str = "explain"
    hint: str = "hint"
    prefix: str = "prefix"
    self_hint: str = "hint"
    self_hint_write: str = "self_hint_write"
    judge_outcome: str = "judge_outcome"
    judge_process: str = "judge_process"
    judge_items: str = "judge_items"
    rubric: str = "rubric"
    judge_segment: str = "judge_segment"


class JudgeConfig(StrictModel):
    """ExpRL: grade each trace against the reference solution the policy never saw."""

    backend: Literal["rule", "openai"] = Field("rule", description="rule: the reference's checkable intermediate results; openai: an LLM judge")
    mode: Literal["outcome", "process"] = Field("process", description="outcome: one score per trace; process: one score per step")
    process_protocol: Literal["trace", "prefix", "segment"] = Field(
        "trace", description="process mode: trace: one request per trace scoring how far along the reference's path each step is "
        "(cheaper); prefix: one request per step prefix y<=t, as the ExpRL paper's text (as many requests as steps); segment: one "
        "request per step showing that step alone (prompts.judge_segment): could it be a correct, useful next step on the "
        "reference's path? — the ExpRL authors' main configuration (the rule judge: does the step alone establish a checkpoint)")
    rubric: bool = Field(False, description="openai: an LLM turns each reference into weighted checkpoint items (stage `rubric`), which the judge scores")
    grade: Literal["when_used", "always"] = Field(
        "when_used", description="when the grade stage (and rubric) runs in `run` and `online`: when_used — when the update reads "
        "grades (materialize.reward: judge); always — in every run (the frontier report's judge partial credit, a study of the judge)")
    step_split: Literal["auto", "headers", "paragraphs", "lines", "###"] = Field(
        "auto", description="auto: `###` headers, else blank-line paragraphs, else lines of a single paragraph; \"###\": cut on "
        "the completion's tokens as the ExpRL authors do — a step ends at the token where its text ends with `###` (the "
        "delimiter belongs to the step it closes), the last step runs to the end; token advantages follow those spans exactly")
    # openai
    model: str | None = Field(None, description="judge model (default: OPENAI_MODEL)")
    base_url: str | None = Field(None, description="OpenAI-compatible server, e.g. http://127.0.0.1:8001/v1 (default: OPENAI_BASE_URL)")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key")
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(2048, gt=0, description="longest judge reply (ExpRL: 2048)")
    overlong: Literal["zero", "grade"] = Field(
        "zero", description="traces cut at max_new_tokens (finish_reason length): zero: reward 0, as the ExpRL authors' code; grade: the judge's score")
    concurrency: int = Field(16, gt=0, description="requests in flight")
    timeout_seconds: float = Field(60.0, gt=0, description="per request")
    max_retries: int = Field(5, ge=0, description="retries with exponential backoff and jitter on 429, 5xx, time-outs, dropped connections")
    max_requests: int | None = Field(None, gt=0, description="spending guard: a stage that would send more requests than this sends none")
    max_failed_fraction: float = Field(
        0.0, ge=0, le=1, description="traces whose request failed after retries, as a fraction, above which the stage fails "
        "(answers already received stay cached; a re-run sends only the missing requests); checked for each grade shard")
    shard_size: int | None = Field(None, gt=0, description="traces per grade shard (grades do not depend on it); a crash resumes at the "
                                   "first unfinished shard. Default: 512 for an LLM judge, 8192 for the rule judge (microseconds a "
                                   "trace: smaller shards spend their time reading their slice of the rollouts, not grading)")


class PrefectConfig(StrictModel):
    retries: int = Field(1, ge=0, description="retries of a failed stage")
    retry_delay_seconds: float = Field(2.0, ge=0)
    stage_retries: dict[str, int] = Field(default_factory=dict, description="per-stage override of retries")
    cache: bool = Field(True, description="reuse finished stage outputs (store + Prefect task cache)")
    fan_out: bool = Field(True, description="sharded stages (rollouts, explain, hint, grade) run each shard as its own Prefect task on the task runner")
    task_runner: Literal["threads", "ray"] = Field("threads", description="where shard tasks run: a thread pool, or Ray through prefect-ray")
    max_workers: int = Field(1, gt=0, description="threads: shard tasks at once (they share one model per process)")
    ray_address: str | None = Field(None, description="ray: cluster address, e.g. ray://head:10001 (default: start a local Ray)")
    ray_init: dict[str, Any] = Field(default_factory=dict, description="ray: extra ray.init() arguments, e.g. {num_cpus: 2}")

    def retries_for(self, stage: str) -> int:
        return self.stage_retries.get(stage, self.retries)


class StoreConfig(StrictModel):
    """The workspace's store on a shared file system (tasks/core/owner.py): every host of a workspace uses the same values."""

    heartbeat_seconds: float = Field(Lease.heartbeat_seconds, gt=0, description="how often a live writer touches its temporaries and its run record")
    lease_seconds: float = Field(Lease.lease_seconds, gt=0, description="another host's temporary (or running run) untouched this long is a dead "
                                 "writer's: removed by the next write or gc (its run shown stale); on this host a pid says so at once")

    @model_validator(mode="after")
    def _lease_outlasts_heartbeats(self):
        if self.lease_seconds < 3 * self.heartbeat_seconds:
            raise ValueError(f"store.lease_seconds ({self.lease_seconds}) must be at least 3 heartbeats "
                             f"(store.heartbeat_seconds {self.heartbeat_seconds}): a slow touch must not end a live lease")
        return self


class BaseConfig(StrictModel):
    """The sections every stage shares; tasks/registry.py adds each stage's own section."""

    workspace: str = "./workspace"
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    prefect: PrefectConfig = Field(default_factory=PrefectConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)

    #: directory that relative paths in the config are resolved against
    _base_dir: Path = Path(".")

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self._base_dir / p)

    def workspace_dir(self, override: str | Path | None = None) -> Path:
        """The workspace a run uses: ``override`` (``--workspace``) or the config's `workspace`, absolute."""
        return Path(override or self.resolve(self.workspace)).resolve()

    def template_path(self, kind: str) -> str | Path:
        """A prompt template as given in config: a built-in name, or a path resolved like other paths."""
        value = getattr(self.prompts, kind)
        return value if ("/" not in value and not value.endswith(".txt")) else self.resolve(value)


# --------------------------------------------------------------------------- loading


def _check_no_literal_secrets(obj: Any, path: str = "") -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            kp = f"{path}.{k}" if path else str(k)
            if isinstance(k, str) and _SECRET_KEY.search(k) and not k.endswith("_env") and v not in (None, ""):
                raise ConfigError(
                    f"{kp}: looks like a secret written into the config. Configs are copied into manifests "
                    f"and run records; write `{k}_env: SOME_VARIABLE` and export SOME_VARIABLE instead."
                )
            _check_no_literal_secrets(v, kp)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_no_literal_secrets(v, f"{path}.{i}")
    elif isinstance(obj, str) and _URL_USERINFO.search(obj):
        raise ConfigError(f"{path}: a URL with a password in it; put credentials in environment variables")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``--set a.b.0.c=value`` overrides (value parsed as YAML) to a raw config."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. problems.eval_fraction=0.3")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = raw
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: {'.'.join(parts[:i]) or 'config'} is a list of {len(node)}; {part!r} is not an index in it")
                if last:
                    node[int(part)] = yaml.safe_load(value)
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = yaml.safe_load(value)
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} is a value, not a section")
    return raw


def _format_validation_error(exc: ValidationError, where: str, model: type[BaseModel]) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            parent = _model_at(model, err["loc"][:-1])
            allowed = f"; allowed keys here: {', '.join(parent)}" if parent else ""
            msg = f"unknown key{allowed}"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{loc}: {msg}")
    more = f" (and {len(lines) - 1} more:)\n" + "\n".join(f"  {line}" for line in lines[1:]) if len(lines) > 1 else ""
    return f"{where}: invalid config: {lines[0]}{more}"  # the first problem on the line a user sees first


def _model_at(model: Any, loc: tuple) -> list[str]:
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        for c in candidates:
            inner = getattr(c, "__args__", ())
            for t in (c, *inner):
                if isinstance(t, type) and issubclass(t, BaseModel):
                    model = t
                    break
            else:
                continue
            break
        else:
            return []
    return list(getattr(model, "model_fields", {}))


def validate(model: type[BaseModel], raw: dict, *, where: str = "<config>", base_dir: Path | None = None):
    """``raw`` validated as ``model`` (the composed config of tasks/registry.py); errors name the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the config must be a YAML mapping, got {type(raw).__name__}")
    _check_no_literal_secrets(raw)
    try:
        cfg = model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, where, model)) from None
    cfg._base_dir = Path(base_dir) if base_dir else Path.cwd()
    return cfg


def read_yaml(path: Path | str) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{at} not valid YAML ({problem})") from None
    return raw or {}


#: the methods by name: each file sets a method's published hyperparameters (`settings`) and says where each comes from (`sources`)
PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "presets"


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def flatten(obj: dict, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys -> leaf values (lists are leaves)."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` set over a copy of ``base``, mappings merged key by key (neither argument is changed)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def apply_preset(raw: dict, method: str | None) -> tuple[dict, dict[str, tuple[Any, str]]]:
    """``raw`` with the preset of ``method`` (configs/presets/<method>.yaml) set over it, and the
    preset's values in force: dotted key -> (value, source). ``--set`` overrides come after."""
    if not method:
        return raw, {}
    path = PRESETS_DIR / f"{method}.yaml"
    if not path.is_file():
        raise ConfigError(f"--method {method}: no preset {path}; presets: {', '.join(presets()) or '(none)'}")
    preset = read_yaml(path)
    settings, sources = preset.get("settings") or {}, preset.get("sources") or {}
    unknown = sorted(set(preset) - {"settings", "sources"})
    if unknown or not isinstance(settings, dict):
        raise ConfigError(f"{path}: a preset has `settings` (a partial config) and `sources`; found {unknown or 'no settings mapping'}")
    values = flatten(settings)
    return deep_merge(raw, settings), {k: (v, sources.get(k, f"preset {method}")) for k, v in values.items()}


def read_run_config(path: Path | str, method: str | None = None, overrides: list[str] = ()) -> tuple[dict, dict[str, tuple[Any, str]]]:
    """A run config as the commands take it: the file, then the preset of ``method``,
    then ``--set`` overrides. Returns the raw config and the preset's values."""
    raw, preset = apply_preset(read_yaml(path), method)
    return apply_overrides(raw, list(overrides)), preset


def masked(obj: Any) -> Any:
    """A copy of a raw config safe to print: ``*_env`` references show whether the
    variable is set (never its value); URL passwords are masked."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(k, str) and k.endswith("_env") and isinstance(v, str):
                out[k] = f"{v} ({'set' if os.environ.get(v) else 'not set'})"
            else:
                out[k] = masked(v)
        return out
    if isinstance(obj, list):
        return [masked(v) for v in obj]
    if isinstance(obj, str):
        return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:****@", obj)
    return obj
