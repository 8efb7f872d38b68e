"""The generation backend named in config: ``make_backend`` (each backend's module is imported only when it is
asked for: no torch for a served policy, no vLLM unless named)."""

from __future__ import annotations

from tasks.models.generation import GenerationBackend


def make_backend(backend: str, model: str, **options) -> GenerationBackend:
    """The backend named in config (``transformers`` | ``openai`` | ``vllm``)."""
    if backend == "transformers":
        from tasks.models.transformers_backend import TransformersBackend

        return TransformersBackend(model, **options)
    if backend == "openai":
        from tasks.models.openai_backend import OpenAIBackend

        return OpenAIBackend(model, **options)
    if backend == "vllm":
        from tasks.models.vllm_backend import VLLMBackend

        return VLLMBackend(model, **options)
    raise ValueError(f"unknown generation backend {backend!r}; allowed: transformers, openai, vllm")
