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

from tasks.models.generation import GenerationBackend, checkpoint_fingerprint
from tasks.models.backends import make_backend
from tasks.models.prompts import chat

if TYPE_CHECKING:
    from tasks.registry import Config

log = logging.getLogger("guidedrl.policy")


def checkpoint_dir(config: Config) -> Path | None:
    """The local checkpoint the policy's weights come from: `policy.checkpoint`, else `policy.model` when it
    is a directory (a served policy named by the server has none unless `checkpoint` says where it is)."""
    p = config.policy
    if p.checkpoint:
        return config.resolve(p.checkpoint)
    path = config.resolve(p.model)
    return path if path.is_dir() else None


def policy_id_for(config: Config) -> str:
    """The policy_id its samples carry: the fingerprint of the checkpoint they come from — for a served
    policy too, when `policy.checkpoint` (or a model directory) says which; else `policy.policy_id` or
    `<backend>:<model>`."""
    p = config.policy
    if p.backend == "transformers":
        path = config.resolve(p.model)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: policy checkpoint not found (policy.model)")
        return checkpoint_fingerprint(path)
    if p.policy_id:
        return p.policy_id
    ckpt = checkpoint_dir(config)
    if ckpt is not None and ckpt.is_dir():
        return checkpoint_fingerprint(ckpt)
    return f"{p.backend}:{p.model}"


def local_policy_dir(config: Config, stage: str) -> Path:
    """The checkpoint directory a training stage starts from: the policy's local checkpoint, whatever
    samples it (in process, or a server started on it: `policy.checkpoint`)."""
    ckpt = checkpoint_dir(config)
    if ckpt is None or not ckpt.is_dir():
        where = (f"policy.checkpoint ({config.policy.checkpoint})" if config.policy.checkpoint
                 else f"policy.model ({config.policy.model})")
        raise ValueError(f"{stage}: trains a local checkpoint, but {where} is not a model directory; with a served policy "
                         "set policy.checkpoint to the directory the server was started on")
    return ckpt


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


def policy_key(config: Config, backend) -> dict:
    """What a reuse key (tasks/core/reuse.py) holds of the policy that samples: its fingerprint, backend and precision."""
    return {"policy_id": backend.policy_id, "backend": config.policy.backend, "precision": precision_settings(config)}


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
        if p.checkpoint and not (config.resolve(p.checkpoint) / "config.json").is_file():
            raise ConfigError(f"{config.resolve(p.checkpoint)}: policy.checkpoint is not a transformers model directory (no config.json)")
        if p.serve.follow == "none":  # (a server that follows the rounds is started or loaded by the online run)
            from tasks.models.served import capabilities

            capabilities(p)  # nothing listening, a refused key, a model it does not serve, a field it refuses: an error now
        return
    if p.serve.follow != "none":
        raise ConfigError(f"policy.serve.follow: {p.serve.follow} is for a served policy (backend openai); backend "
                          f"{p.backend} samples the checkpoint in process and follows it by itself")
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
        return make_backend("transformers", str(config.resolve(p.model)), batch_size=p.batch_size, batch_tokens=p.batch_tokens,
                            device=device, dtype=dtype)
    if p.backend == "openai":
        from tasks.models.served import capabilities

        backend = make_backend("openai", p.model, base_url=p.base_url, api_key_env=p.api_key_env, concurrency=p.concurrency,
                               timeout=p.timeout_seconds, max_retries=p.max_retries, policy_id=policy_id_for(config),
                               capabilities=capabilities(p))
        backend.tokenizer = local_tokenizer(config)  # re-tokenizing text-only answers; scoring sends token ids
        ckpt = checkpoint_dir(config)
        if ckpt is not None and (ckpt / "config.json").is_file():  # scores the server cannot give: the checkpoint's forward pass
            device, dtype = precision(config)
            backend.local_scorer = lambda: make_backend("transformers", str(ckpt), batch_size=p.batch_size,
                                                        batch_tokens=p.batch_tokens, device=device, dtype=dtype)
        return backend
    return make_backend("vllm", str(config.resolve(p.model)) if config.resolve(p.model).is_dir() else p.model, **p.engine)


def local_tokenizer(config: Config):
    """The policy's tokenizer from disk (`policy.tokenizer`, else its checkpoint), or None."""
    path = config.resolve(config.policy.tokenizer) if config.policy.tokenizer else checkpoint_dir(config)
    if path is None or not path.is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def chat_tokenizer(config: Config, backend: GenerationBackend):
    """The tokenizer whose chat template wraps prompts (None: prompts go unwrapped)."""
    if getattr(backend, "tokenizer", None) is not None:
        return backend.tokenizer
    tokenizer = local_tokenizer(config)
    if tokenizer is None:
        log.warning("no local tokenizer for %s: prompts are sent without a chat template (set policy.tokenizer)", config.policy.model)
    return tokenizer


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
    """Forget this process's shared backends (a stage is done with them) and what the policy server gave
    (the next stage asks again)."""
    from tasks.models.served import forget

    with _BACKENDS_LOCK:
        _BACKENDS.clear()
    forget()


def server_summary(config: Config) -> dict:
    """What the policy's server gave and what guidedrl computed itself (a stage's summary: `server`)."""
    if config.policy.backend != "openai":
        return {"kind": config.policy.backend, "gave": ["text", "token ids", "sampled log-probs", "prompt log-probs"], "computed": []}
    from tasks.models.served import capabilities

    return capabilities(config.policy).summary()
