"""The ``transformers`` generation backend: the policy's checkpoint in process (the test engine).

Batched and left-padded, prompts bucketed by length, every row drawn from its own seeded stream
(tasks/models/sampling.py ``decode``), so a row does not depend on its batch-mates; batches
capped by `policy.batch_size` / `batch_tokens` and halved on running out of device memory.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

from tasks.models.generation import Sample, SamplingParams, checkpoint_fingerprint
from tasks.models.sampling import decode, default_seeds
from tasks.models.token_text import decode_completion, prompt_ids, stop_token_ids

log = logging.getLogger("guidedrl.generation")


def attention_implementation(device: str, dtype: str) -> str:
    """The attention kernels transformers is asked for: FlashAttention-2 for bfloat16 weights on a GPU when the
    `flash_attn` package is installed, else PyTorch's SDPA (which itself picks its flash / memory-efficient
    kernels on a GPU). Nothing hand-written."""
    import importlib.util

    if str(device).startswith("cuda") and dtype == "bfloat16" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


class TransformersBackend:
    name = "transformers"

    def __init__(self, model: str | Path, batch_size: int = 64, device: str = "cpu", threads: int | None = None, dtype: str = "float32",
                 batch_tokens: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: policy checkpoint directory not found (models are loaded from disk, never from a hub)")
        if threads:
            torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype),
                                                          attn_implementation=attention_implementation(device, dtype)).to(device).eval()
        self.device = device
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.policy_id = checkpoint_fingerprint(path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @classmethod
    def from_objects(cls, model, tokenizer, policy_id: str, batch_size: int = 64) -> "TransformersBackend":
        """Wrap an in-memory model (tests, the training loop) without loading from disk."""
        self = cls.__new__(cls)
        self.model, self.tokenizer, self.policy_id = model.eval(), tokenizer, policy_id
        self.tokenizer.padding_side = "left"
        self.device, self.batch_size, self.batch_tokens = next(model.parameters()).device, batch_size, None
        return self

    oom_backoffs = 0  # batches split in two after running out of device memory

    def _batch_end(self, lengths: list[int], start: int, extra: int) -> int:
        """The end of the batch that starts at ``start``: at most `batch_size` sequences and, with
        `batch_tokens`, at most that many padded tokens (``lengths`` + ``extra`` each)."""
        stop = min(len(lengths), start + self.batch_size)
        if self.batch_tokens:
            while stop - start > 1 and (max(lengths[start:stop]) + extra) * (stop - start) > self.batch_tokens:
                stop -= 1
        return stop

    def _run_batches(self, lengths: list[int], extra: int, run: Callable[[int, int], None], what: str) -> None:
        """``run(start, stop)`` over consecutive batches of the items. Out of device memory, the batch is
        retried at half its size (down to one sequence), the smaller size kept for the rest of this
        backend's work, and a warning says so."""
        import torch

        start = 0
        while start < len(lengths):
            stop = self._batch_end(lengths, start, extra)
            try:
                run(start, stop)
            except torch.OutOfMemoryError:
                if stop - start == 1:
                    raise
                if str(self.device).startswith("cuda"):
                    torch.cuda.empty_cache()
                self.oom_backoffs += 1
                self.batch_size = (stop - start) // 2
                log.warning("%s: out of device memory at %d sequences of up to %d tokens; retrying with batches of %d "
                            "(policy.batch_size / batch_tokens lower avoid it)", what, stop - start, max(lengths[start:stop]) + extra,
                            self.batch_size)
                continue
            start = stop

    _lock = threading.Lock()  # one generate at a time per process: batches share the model's memory

    def generate(self, prompts: list[str], params: SamplingParams, seeds: list[list[int]] | None = None) -> list[list[Sample]]:
        with self._lock:
            return self._generate(prompts, params, seeds or default_seeds(params.seed, prompts, params.n))

    def _generate(self, prompts: list[str], params: SamplingParams, seeds: list[list[int]]) -> list[list[Sample]]:
        import torch

        tok = self.tokenizer
        encoded = [prompt_ids(tok, p) for p in prompts]
        jobs = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        jobs.sort(key=lambda ij: (len(encoded[ij[0]]), ij))  # bucket by prompt length
        results: list[list[Sample | None]] = [[None] * params.n for _ in prompts]
        stops, pad = stop_token_ids(tok, getattr(self.model, "generation_config", None)), tok.pad_token_id

        def run(b: int, stop: int) -> None:
            chunk = jobs[b:stop]
            width = max(len(encoded[i]) for i, _ in chunk)
            ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i, _ in chunk], device=self.device)
            mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i, _ in chunk], device=self.device)
            new, logp = decode(self.model, ids, mask, [seeds[i][j] for i, j in chunk], params.temperature, params.top_p,
                               params.max_new_tokens, stops, pad)
            for row, (i, j) in enumerate(chunk):
                toks = new[row].tolist()
                at = next((k for k, t in enumerate(toks) if t in stops), None)
                if at is not None:
                    end, reason = at + 1, "stop"
                else:
                    end, reason = len(toks), "length"
                token_ids = toks[:end]
                results[i][j] = Sample(
                    text=decode_completion(tok, token_ids),
                    token_ids=token_ids,
                    logprobs=[float(x) for x in logp[row, :end].tolist()],
                    finish_reason=reason,
                )

        self._run_batches([len(encoded[i]) for i, _ in jobs], params.max_new_tokens, run, "generate")
        return results  # type: ignore[return-value]

    def score(self, prompts: list[str], token_ids: list[list[int]], temperature: float = 1.0) -> list[list[float]]:
        """Per-token log-probabilities of given completion tokens under given prompts:
        ``log_softmax(logits / temperature)`` of a forward pass (what the loss side of
        a guided sample uses: the same tokens under the prompt *without* the guidance)."""
        import torch

        tok = self.tokenizer
        out: list[list[float]] = []
        t = temperature if temperature > 0 else 1.0
        encoded = [prompt_ids(tok, p) for p in prompts]

        def run(b: int, stop: int) -> None:
            ps, cs = encoded[b:stop], token_ids[b:stop]
            seqs = [p + c for p, c in zip(ps, cs)]
            width = max(len(x) for x in seqs)
            ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in seqs], device=self.device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in seqs], device=self.device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float() / t
            logp = torch.log_softmax(logits, dim=-1)
            for row, (p, c) in enumerate(zip(ps, cs)):
                start = width - len(c)  # first completion position; predicted from the one before
                picked = logp[row, start - 1 : width - 1].gather(-1, torch.tensor(c, device=self.device)[:, None]).squeeze(-1)
                out.append([float(x) for x in picked.tolist()])

        self._run_batches([len(p) + len(c) for p, c in zip(encoded, token_ids)], 0, run, "score")
        return out
