"""The configured policy (`policy` in the config): its id, a generation backend for it,
the tokenizer whose chat template wraps prompts, and the checkpoint a training
stage starts from. One backend per process and policy is shared by the shards
of a stage."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.models.generation import GenerationBackend, checkpoint_fingerprint, make_backend
from tasks.models.prompts import chat

if TYPE_CHECKING:
    from tasks.registry import Config

log = logging.getLogger("guidedrl.policy")


def policy_id_for(config: Config) -> str:
    p = config.policy
    if p.backend == "openai":
        return p.policy_id or f"openai:{p.model}"
    path = config.resolve(p.model)
    if path.is_dir():
        return checkpoint_fingerprint(path)
    if p.backend == "vllm":
        return p.policy_id or f"vllm:{p.model}"
    raise FileNotFoundError(f"{path}: policy checkpoint not found (policy.model)")


def local_policy_dir(config: Config, stage: str) -> Path:
    """The policy checkpoint directory a training stage starts from (it must be a local transformers model)."""
    base = config.resolve(config.policy.model)
    if config.policy.backend != "transformers" or not base.is_dir():
        raise ValueError(f"{stage}: trains a local checkpoint; policy.model ({config.policy.model}) must be a model directory "
                         "with policy.backend transformers")
    return base


def resolve_device(spec: str = "auto") -> str:
    """``policy.device`` as a torch device string: auto is cuda when a CUDA device is visible, else cpu."""
    import torch

    from tasks.core.config import ConfigError

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"policy.device: {spec}, but torch sees no CUDA device (torch {torch.__version__}); use auto or cpu")
        index = int(spec.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"policy.device: {spec}, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return spec


def resolve_dtype(spec: str, device: str) -> str:
    """``policy.dtype`` for ``device``: auto is bfloat16 on a GPU that supports it, else float32."""
    import torch

    if spec != "auto":
        return spec
    return "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"


def precision(config: Config) -> tuple[str, str]:
    """(device, dtype name) the model-loading stages use for this config."""
    device = resolve_device(config.policy.device)
    return device, resolve_dtype(config.policy.dtype, device)


def precision_settings(config: Config) -> dict:
    """What a stage's key holds of its precision: nothing at float32 (the CPU default, so CPU keys stay as they
    were), the dtype otherwise — bfloat16 samples and scores are not float32's."""
    dtype = precision(config)[1] if config.policy.backend == "transformers" else "float32"
    return {} if dtype == "float32" else {"dtype": dtype}


def check_policy(config: Config) -> None:
    """Before any work (``preflight``): the policy can be loaded — for a local checkpoint,
    its directory, config.json and tokenizer; for a served one, where it is served."""
    import os

    from tasks.core.config import ConfigError

    p = config.policy
    if p.backend == "transformers":
        precision(config)  # a device that is not there is an error now, not in the middle of a stage
    if p.backend == "openai":
        if not (p.base_url or os.environ.get("OPENAI_BASE_URL")):
            raise ConfigError("policy.base_url: backend openai needs the server's URL (or OPENAI_BASE_URL in the environment)")
        return
    path = config.resolve(p.model)
    if p.backend == "vllm" and not path.is_dir():
        return  # a model name the vLLM engine resolves itself
    if not path.is_dir():
        raise ConfigError(f"{path}: policy checkpoint not found (policy.model: {p.model}); build the tiny one with "
                          "`guidedrl bootstrap`, or point policy.model at a model directory")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: not a transformers model directory — no config.json (policy.model; it has: "
                          f"{', '.join(sorted(f.name for f in path.iterdir())[:8]) or 'nothing'})")
    tok = config.resolve(p.tokenizer) if p.tokenizer else path
    key = "policy.tokenizer" if p.tokenizer else "policy.model"
    if not tok.is_dir():
        raise ConfigError(f"{tok}: tokenizer directory not found ({key})")
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tok))
    except Exception as exc:  # transformers raises several types for missing or broken tokenizer files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{tok}: no usable tokenizer ({key}; it has: {', '.join(sorted(f.name for f in tok.iterdir())[:8])}) — "
                          f"save one with tokenizer.save_pretrained there ({first[:200]})") from None


def open_backend(config: Config) -> GenerationBackend:
    p = config.policy
    if p.backend == "transformers":
        device, dtype = precision(config)
        return make_backend("transformers", str(config.resolve(p.model)), batch_size=p.batch_size, device=device, dtype=dtype)
    if p.backend == "openai":
        return make_backend("openai", p.model, base_url=p.base_url, api_key_env=p.api_key_env, concurrency=p.concurrency,
                            timeout=p.timeout_seconds, max_retries=p.max_retries, policy_id=policy_id_for(config))
    return make_backend("vllm", str(config.resolve(p.model)) if config.resolve(p.model).is_dir() else p.model, **p.engine)


def chat_tokenizer(config: Config, backend: GenerationBackend):
    """The tokenizer whose chat template wraps prompts (None: prompts go unwrapped)."""
    if getattr(backend, "tokenizer", None) is not None:
        return backend.tokenizer
    path = config.resolve(config.policy.tokenizer or config.policy.model)
    if path.is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    log.warning("no local tokenizer for %s: prompts are sent without a chat template (set policy.tokenizer)", config.policy.model)
    return None


def render(tokenizer, user_turn: str) -> str:
    """A user turn wrapped in the policy's chat template (unwrapped without a tokenizer)."""
    return chat(tokenizer, user_turn) if tokenizer is not None else user_turn


_BACKENDS: dict[str, GenerationBackend] = {}
_BACKENDS_LOCK = threading.Lock()


def shared_backend(config: Config) -> GenerationBackend:
    """One backend per process and policy config: the shards of a stage (in a loop,
    on threads or on one Ray worker) load the model once."""
    key = json.dumps(config.policy.model_dump(mode="json"), sort_keys=True) + str(config.resolve(config.policy.model))
    with _BACKENDS_LOCK:
        if key not in _BACKENDS:
            _BACKENDS[key] = open_backend(config)
        return _BACKENDS[key]


def release_backends() -> None:
    """Forget this process's shared backends (a stage is done with them)."""
    with _BACKENDS_LOCK:
        _BACKENDS.clear()
