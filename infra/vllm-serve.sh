#!/usr/bin/env bash
# Serve a policy (or a judge) with vLLM from vLLM's own environment, for `backend: openai`.
# vLLM pins its own torch and transformers, so it never shares guidedrl's virtualenv.
#
#   python -m venv /opt/vllm && /opt/vllm/bin/pip install vllm     # on the GPU machine, once
#   MODEL=/models/qwen2.5-3b-instruct NAME=Qwen/Qwen2.5-3B-Instruct infra/vllm-serve.sh
#
# then in the guidedrl config:
#   policy: {backend: openai, model: Qwen/Qwen2.5-3B-Instruct, base_url: http://HOST:8000/v1,
#            tokenizer: /models/qwen2.5-3b-instruct}
#
# A judge for ExpRL grading (the chat endpoint), on another port:
#   MODEL=/models/qwen3-4b-instruct NAME=Qwen/Qwen3-4B-Instruct-2507 PORT=8001 infra/vllm-serve.sh
#   judge: {backend: openai, model: Qwen/Qwen3-4B-Instruct-2507, base_url: http://HOST:8001/v1}
set -euo pipefail
: "${MODEL:?set MODEL to a local model directory}"
VLLM_BIN="${VLLM_BIN:-/opt/vllm/bin/vllm}"
exec "$VLLM_BIN" serve "$MODEL" \
  --served-model-name "${NAME:-$(basename "$MODEL")}" \
  --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" \
  --tensor-parallel-size "${TP:-1}" \
  --logprobs-mode processed_logprobs \
  --max-logprobs 1 \
  "$@"
