"""The run configuration: one YAML file, validated by pydantic.

Keys follow the stage names of DESIGN.md. Unknown keys are errors (a typo must
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

STAGES = ("curate", "rollouts", "filter", "explain", "hint", "rubric", "grade", "materialize", "dpo", "grpo", "eval")
#: stages that exist in this version of guidedrl; the others are still to come.
IMPLEMENTED_STAGES = STAGES
#: what each stage reads: its upstream stages
UPSTREAM = {"curate": (), "rollouts": ("curate",), "filter": ("curate", "rollouts"), "explain": ("curate", "rollouts"), "hint": ("curate", "rollouts"),
            "rubric": ("curate", "rollouts"), "grade": ("curate", "rollouts", "rubric"),
            "materialize": ("curate", "rollouts", "explain", "hint", "grade"), "dpo": ("materialize",),
            "grpo": ("materialize",), "eval": ("curate",)}
#: what a stage also reads when it ran in the same run (eval measures the checkpoints trained there)
OPTIONAL_UPSTREAM = {"eval": ("dpo", "grpo")}

_SECRET_KEY = re.compile(r"(^|[_-])(api[_-]?key|secret[_-]?key|access[_-]?key|token|secret|password|passwd)$", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@", re.I)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReasoningGymSpec(_Strict):
    task: str = Field(description="reasoning-gym dataset name, e.g. chain_sum")
    size: int = Field(gt=0)
    seed: int = 0
    level: str | None = None
    config: dict[str, Any] = Field(default_factory=dict, description="generator config, e.g. min_terms")


class HFSpec(_Strict):
    """A Hugging Face dataset on local disk: a ``save_to_disk`` directory
    (``path``) or local data files loaded by a builder (``format`` + ``data_files``).
    Nothing is downloaded."""

    path: str | None = None
    format: Literal["parquet", "json", "csv"] | None = None
    data_files: str | list[str] | None = None
    split: str = "train"

    @model_validator(mode="after")
    def _one_way(self):
        if bool(self.path) == bool(self.data_files):
            raise ValueError("give either 'path' (a save_to_disk directory) or 'data_files' with 'format'")
        if self.data_files and not self.format:
            raise ValueError("'data_files' needs 'format': one of parquet, json, csv")
        return self


class SourceConfig(_Strict):
    """One problem source. Exactly one of ``file``, ``hf``, ``reasoning_gym``."""

    file: str | None = None
    hf: HFSpec | None = None
    reasoning_gym: ReasoningGymSpec | None = None
    format: Literal["jsonl", "json", "csv", "parquet"] | None = Field(
        None, description="file format; default from the file extension"
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="contract column -> column name in the input (question, answer, reference_solution, level, split)",
    )
    source: str | None = Field(None, description="the value of the `source` column; default from the file or task name")
    level: str | None = Field(None, description="level label for every row of this source")
    split: Literal["train", "eval"] | None = Field(None, description="put every row of this source in this split")

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("file", "hf", "reasoning_gym") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "a source needs exactly one of 'file', 'hf', 'reasoning_gym'"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.reasoning_gym is not None and self.reasoning_gym.level and self.level:
            raise ValueError("give 'level' once: inside reasoning_gym or beside it, not both")
        allowed = {"question", "answer", "reference_solution", "level", "split"}
        bad = sorted(set(self.columns) - allowed)
        if bad:
            raise ValueError(f"columns: unknown contract column(s) {bad}; allowed: {sorted(allowed)}")
        return self

    @property
    def kind(self) -> str:
        return "file" if self.file is not None else "hf" if self.hf is not None else "reasoning_gym"


class DecontaminationConfig(_Strict):
    enabled: bool = True
    ngram: int = Field(8, ge=1, description="n of the word n-grams compared")
    threshold: float = Field(
        0.5, gt=0, le=1, description="a train problem is contaminated when this fraction of its n-grams occur in eval problems"
    )
    template_fraction: float = Field(
        0.5, gt=0, le=1, description="n-grams in more than this fraction of one source's questions are template text and do not count"
    )


class ProblemsConfig(_Strict):
    sources: list[SourceConfig] = Field(min_length=1)
    eval_fraction: float = Field(0.2, ge=0, lt=1)
    split_seed: int = 0
    decontamination: DecontaminationConfig = Field(default_factory=DecontaminationConfig)


class PolicyConfig(_Strict):
    """The policy that generates: a local checkpoint or a served model."""

    model: str = Field("data/models/tiny-policy", description="local checkpoint dir (transformers, vllm) or served model name (openai)")
    backend: Literal["transformers", "openai", "vllm"] = "transformers"
    tokenizer: str | None = Field(None, description="local tokenizer dir whose chat template wraps prompts; default: `model` when it is a directory")
    # transformers
    batch_size: int = Field(64, gt=0, description="sequences per generate() call")
    # openai
    base_url: str | None = Field(None, description="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (default: OPENAI_BASE_URL)")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key")
    concurrency: int = Field(16, gt=0, description="requests in flight")
    timeout_seconds: float = Field(120.0, gt=0)
    max_retries: int = Field(5, ge=0, description="retries with exponential backoff on 429, 5xx and time-outs")
    policy_id: str | None = Field(None, description="name of a served policy's weights (default: openai:<model>)")
    # vllm
    engine: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of vllm.LLM, e.g. tensor_parallel_size")


class PromptsConfig(_Strict):
    """Prompt templates: a built-in name (tasks/prompts/<name>.txt) or a file path."""

    plain: str = "plain"
    explain: str = "explain"
    hint: str = "hint"
    judge_outcome: str = "judge_outcome"
    judge_process: str = "judge_process"
    judge_items: str = "judge_items"
    rubric: str = "rubric"


class RolloutsConfig(_Strict):
    samples_per_problem: int = Field(8, gt=0, description="the group size G")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(160, gt=0)
    seed: int = 0
    split: Literal["train", "eval", "all"] = "train"
    levels: list[str] | None = Field(None, description="only problems of these levels (default: all)")
    max_problems: int | None = Field(None, gt=0, description="at most this many problems (first by problem_id)")
    shard_size: int = Field(32, gt=0, description="problems per shard; a crash resumes at the first unfinished shard")


class FilterConfig(_Strict):
    """Keep problems whose pass rate under the current policy lies in [min, max]."""

    min_pass_rate: float = Field(0.0, ge=0, le=1)
    max_pass_rate: float = Field(0.0, ge=0, le=1, description="0.0 with min 0.0 keeps exactly the stuck problems")

    @model_validator(mode="after")
    def _band(self):
        if self.min_pass_rate > self.max_pass_rate:
            raise ValueError("min_pass_rate must be at most max_pass_rate")
        return self


class ExplainConfig(_Strict):
    """ExPO: the policy explains how to reach the ground-truth answer it is shown."""

    problems: Literal["stuck", "all"] = Field("stuck", description="stuck: only problems whose rollouts all failed; all: every rolled-out problem")
    samples_per_problem: int = Field(4, gt=0, description="explanations sampled per problem (m)")
    temperature: float | None = Field(None, ge=0, description="default: rollouts.temperature")
    max_new_tokens: int | None = Field(None, gt=0, description="default: rollouts.max_new_tokens")
    seed: int = 0
    select: Literal["loglik", "answer_gain", "all"] = Field(
        "loglik", description="per problem keep the correct explanation with the highest per-token log-likelihood, the highest answer gain, or all"
    )
    shard_size: int = Field(32, gt=0, description="problems per shard (sampled with seed + shard index); a crash resumes at the first unfinished shard")


class HintConfig(_Strict):
    """LTE: re-prompt the stuck problems with a hint built from the policy's own mistakes."""

    samples_per_problem: int | None = Field(None, gt=0, description="hinted samples per stuck problem (default: rollouts.samples_per_problem)")
    temperature: float | None = Field(None, ge=0, description="default: rollouts.temperature")
    max_new_tokens: int | None = Field(None, gt=0, description="default: rollouts.max_new_tokens")
    seed: int = 0
    max_wrong_answers: int = Field(5, gt=0, description="at most this many distinct wrong answers in a hint")
    leak_check: bool = Field(False, description="reject hinted samples that mention the hint")
    shard_size: int = Field(32, gt=0, description="problems per shard (sampled with seed + shard index); a crash resumes at the first unfinished shard")


class JudgeConfig(_Strict):
    """ExpRL: grade each trace against the reference solution the policy never saw."""

    backend: Literal["rule", "openai"] = Field("rule", description="rule: the reference's checkable intermediate results; openai: an LLM judge")
    mode: Literal["outcome", "process"] = Field("process", description="outcome: one score per trace; process: one score per step")
    rubric: bool = Field(False, description="openai: an LLM turns each reference into weighted checkpoint items (stage `rubric`), which the judge scores")
    step_split: Literal["auto", "headers", "paragraphs", "lines"] = Field(
        "auto", description="auto: `###` headers, else blank-line paragraphs, else lines of a single paragraph")
    # openai
    model: str | None = Field(None, description="judge model (default: OPENAI_MODEL)")
    base_url: str | None = Field(None, description="OpenAI-compatible server, e.g. http://127.0.0.1:8001/v1 (default: OPENAI_BASE_URL)")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key")
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(1024, gt=0, description="longest judge reply")
    concurrency: int = Field(16, gt=0, description="requests in flight")
    timeout_seconds: float = Field(60.0, gt=0, description="per request")
    max_retries: int = Field(5, ge=0, description="retries with exponential backoff and jitter on 429, 5xx, time-outs, dropped connections")
    max_requests: int | None = Field(None, gt=0, description="spending guard: a stage that would send more requests than this sends none")
    max_failed_fraction: float = Field(
        0.0, ge=0, le=1, description="traces whose request failed after retries, as a fraction, above which the stage fails "
        "(answers already received stay cached; a re-run sends only the missing requests); checked for each grade shard")
    shard_size: int = Field(512, gt=0, description="traces per grade shard (grades do not depend on it); a crash resumes at the first unfinished shard")


class MaterializeConfig(_Strict):
    """How rollouts, guidance samples and grades become the dpo, grpo and sft datasets."""

    reward: Literal["verify", "judge"] = Field("verify", description="verify: the checked answer (1/0); judge: the judge's outcome score (+ token advantages in process mode)")
    advantage: Literal["grpo", "dr_grpo"] = Field("grpo", description="grpo: (r - mean) / std in the group; dr_grpo: r - mean")
    keep_uniform_groups: bool = Field(False, description="keep groups whose rewards are all equal (no signal); default: drop them (dynamic sampling)")
    lte_replace: bool = Field(True, description="LTE: in all-failed groups, replace failed samples by correct hinted ones (at most G - 1)")
    include_explanations: bool = Field(True, description="ExPO: selected explanations ride along in grpo (null advantage, for the beta-NLL term)")
    pairs_per_problem: int = Field(2, gt=0, description="DPO pairs per problem and pair kind")


class DPOTrainConfig(_Strict):
    """Offline DPO with TRL's DPOTrainer on the materialised `dpo` dataset."""

    beta: float = Field(0.1, gt=0)
    learning_rate: float = Field(1e-6, gt=0)
    max_steps: int = Field(200, gt=0)
    batch_size: int = Field(8, gt=0, description="pairs per device step")
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_length: int = Field(1024, gt=0, description="prompt + completion tokens")
    max_pairs: int | None = Field(None, gt=0, description="train on at most this many pairs (a seeded sample)")
    sft_weight: float = Field(0.0, ge=0, description="weight of an NLL term on the chosen completion (TRL loss_type sft; RPO); 0: plain DPO")
    heldout_fraction: float = Field(0.1, ge=0, lt=1, description="pairs held out (whole problems) to measure the DPO loss before/after")
    lora: bool = Field(False, description="train LoRA adapters (peft) and merge them into the saved checkpoint")
    lora_r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    seed: int = 0


class GRPOTrainConfig(_Strict):
    """The policy update over a `grpo` dataset, and the online rounds."""

    rounds: int = Field(1, gt=0, description="online rounds of rollouts -> guidance -> grading -> materialize -> update -> eval")
    learning_rate: float = Field(1e-6, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    epochs: int = Field(1, gt=0, description="passes over each round's grpo dataset")
    batch_size: int = Field(16, gt=0, description="samples per update step")
    clip_low: float = Field(0.2, ge=0, description="epsilon below 1 of the clipped ratio")
    clip_high: float = Field(0.28, ge=0, description="epsilon above 1 (clip-higher)")
    gamma: float = Field(0.1, gt=0, description="LTE's policy shaping f(r) = r / (r + gamma) on guided samples")
    expo_beta: float = Field(0.04, ge=0, description="ExPO's weight of the explanation NLL term")
    kl: float = Field(0.0, ge=0, description="weight of the KL to the round's starting policy (0: off)")
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0


class TrainConfig(_Strict):
    dpo: DPOTrainConfig = Field(default_factory=DPOTrainConfig)
    grpo: GRPOTrainConfig = Field(default_factory=GRPOTrainConfig)


class EvalConfig(_Strict):
    """pass@1 and pass@k on the evaluation split, by level, for the base policy and each trained checkpoint."""

    samples_per_problem: int = Field(8, gt=0, description="n samples per problem; pass@k for k = 1 and n (unbiased estimator)")
    temperature: float = Field(1.0, ge=0)
    max_new_tokens: int | None = Field(None, gt=0, description="default: rollouts.max_new_tokens")
    levels: list[str] | None = Field(None, description="only these levels (default: all)")
    max_problems: int | None = Field(None, gt=0, description="at most this many eval problems (first by problem_id)")
    seed: int = 1234


class PrefectConfig(_Strict):
    retries: int = Field(1, ge=0, description="retries of a failed stage")
    retry_delay_seconds: float = Field(2.0, ge=0)
    stage_retries: dict[str, int] = Field(default_factory=dict, description="per-stage override of retries")
    cache: bool = Field(True, description="reuse finished stage outputs (store + Prefect task cache)")
    fan_out: bool = Field(True, description="sharded stages (rollouts, explain, hint, grade) run each shard as its own Prefect task on the task runner")
    task_runner: Literal["threads", "ray"] = Field("threads", description="where shard tasks run: a thread pool, or Ray through prefect-ray")
    max_workers: int = Field(1, gt=0, description="threads: shard tasks at once (they share one model per process)")
    ray_address: str | None = Field(None, description="ray: cluster address, e.g. ray://head:10001 (default: start a local Ray)")
    ray_init: dict[str, Any] = Field(default_factory=dict, description="ray: extra ray.init() arguments, e.g. {num_cpus: 2}")

    @model_validator(mode="after")
    def _known_stages(self):
        bad = sorted(set(self.stage_retries) - set(STAGES))
        if bad:
            raise ValueError(f"stage_retries: unknown stage(s) {bad}; allowed: {list(STAGES)}")
        return self

    def retries_for(self, stage: str) -> int:
        return self.stage_retries.get(stage, self.retries)


class Config(_Strict):
    workspace: str = "./workspace"
    problems: ProblemsConfig
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    rollouts: RolloutsConfig = Field(default_factory=RolloutsConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    explain: ExplainConfig = Field(default_factory=ExplainConfig)
    hint: HintConfig = Field(default_factory=HintConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    materialize: MaterializeConfig = Field(default_factory=MaterializeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    prefect: PrefectConfig = Field(default_factory=PrefectConfig)

    #: directory that relative paths in the config are resolved against
    _base_dir: Path = Path(".")

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self._base_dir / p)

    def workspace_dir(self, override: str | Path | None = None) -> Path:
        """The workspace a run uses: ``override`` (``--workspace``) or the config's `workspace`, absolute."""
        return Path(override or self.resolve(self.workspace)).resolve()

    def stage_config(self, stage: str) -> dict:
        """The part of the config a stage's output depends on (it enters the store key).

        Runtime-only settings (concurrency, time-outs, batch size) stay out: they
        change how fast, not what."""
        if stage == "curate":
            return self.problems.model_dump(mode="json")
        if stage == "rollouts":
            policy = self.policy.model_dump(mode="json", include={"model", "backend", "engine"})
            return {"rollouts": self.rollouts.model_dump(mode="json"), "policy": policy}
        if stage == "filter":
            return self.filter.model_dump(mode="json")
        if stage == "explain":
            return {"explain": self.explain.model_dump(mode="json"), **self.stage_config("rollouts")}
        if stage == "hint":
            return {"hint": self.hint.model_dump(mode="json"), **self.stage_config("rollouts")}
        if stage == "rubric":
            return {"judge": self.judge.model_dump(mode="json", include={"backend", "rubric", "model", "temperature", "max_tokens"})}
        if stage == "grade":
            return {"judge": self.judge.model_dump(mode="json", include={"backend", "mode", "rubric", "step_split", "model", "temperature", "max_tokens"})}
        if stage == "materialize":
            return {"materialize": self.materialize.model_dump(mode="json"), "step_split": self.judge.step_split,
                    "tokenizer": self.policy.tokenizer or self.policy.model}
        if stage == "dpo":
            return self.train.dpo.model_dump(mode="json")
        if stage == "grpo":
            return self.train.grpo.model_dump(mode="json", exclude={"rounds"})
        if stage == "eval":
            return {"eval": self.eval.model_dump(mode="json"), "max_new_tokens": self.eval.max_new_tokens or self.rollouts.max_new_tokens,
                    "top_p": self.rollouts.top_p}
        raise KeyError(f"stage {stage!r} is not implemented yet")

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


def _format_validation_error(exc: ValidationError, where: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            parent = _model_at(err["loc"][:-1])
            allowed = f"; allowed keys here: {', '.join(parent)}" if parent else ""
            msg = f"unknown key{allowed}"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  {loc}: {msg}")
    return f"{where}: invalid config\n" + "\n".join(lines)


def _model_at(loc: tuple) -> list[str]:
    model: Any = Config
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


def parse_config(raw: dict, *, where: str = "<config>", base_dir: Path | None = None) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the config must be a YAML mapping, got {type(raw).__name__}")
    _check_no_literal_secrets(raw)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, where)) from None
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
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return raw or {}


def load_config(path: Path | str, overrides: list[str] = (), base_dir: Path | None = None) -> Config:
    """Load, override and validate a config file. Relative paths in it resolve
    against ``base_dir`` (default: the current directory)."""
    raw = apply_overrides(read_yaml(path), list(overrides))
    return parse_config(raw, where=str(path), base_dir=base_dir)


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
