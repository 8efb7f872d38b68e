"""The tiny policies' tokenizers: the character one, and two real ones a user's model has.

``guidedrl bootstrap --tokenizer char|gpt2-bpe|spm``:

- ``char`` (data/models/tiny-policy): one token per printable ASCII character, no BOS, a home-made chat
  template. The quickstart's: cheap, and nothing in it maps tokens to text in an unusual way.
- ``gpt2-bpe`` (data/models/tiny-gpt2bpe): GPT-2's real byte-level BPE (50,257 tokens, its merges, its
  pre-tokenizer regex), read from ``whisper/assets/gpt2.tiktoken`` of the ``openai-whisper`` source package
  (installed without its dependencies: tests/consumers.txt). A ChatML chat template as Qwen2.5/3 write it,
  ``<|im_start|>``/``<|im_end|>`` added as special tokens, generation stopping at ``<|im_end|>`` (eos a list:
  ``<|im_end|>`` and ``<|endoftext|>``, as Qwen's generation configs have it). The policy writes a reasoning
  block first (``<think>`` … ``</think>``, added as non-special tokens as Qwen3 has them), the answer after it.
- ``spm`` (data/models/tiny-spm): a SentencePiece BPE model with byte fallback and split digits, trained by
  the ``sentencepiece`` library on the problems (word starts as ``▁``, as Llama 2 / Mistral), loaded as
  transformers' ``LlamaTokenizer``; a Llama-2 chat template whose text begins with the BOS (``<s>[INST] …
  [/INST]``), completions ending in ``</s>``.

A checkpoint's tokenizer is saved with it (tokenizer.json and the chat template); nothing here runs when a
shipped checkpoint is loaded.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import tempfile
from pathlib import Path

from tasks.models.answers import REASONING_CLOSE, REASONING_OPEN

TOKENIZERS = ("char", "gpt2-bpe", "spm")

# ------------------------------------------------------------------------------------------------ char

CHAR_SPECIAL_TOKENS = ["<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAR_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|end|>"
    "{% else %}{{ m['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer():
    """A character-level tokenizer over printable ASCII plus newline, with a chat template."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(CHAR_SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(CHAR_SPECIAL_TOKENS)
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>", bos_token=None,
                                   chat_template=CHAR_CHAT_TEMPLATE, padding_side="left", clean_up_tokenization_spaces=False)


# ------------------------------------------------------------------------------------------------ gpt2-bpe

#: GPT-2's pre-tokenizer regex (openai/gpt-2 encoder.py; tiktoken's "gpt2" encoding)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
#: the reasoning block's markers (Qwen3, DeepSeek-R1): added tokens, not special ones (decoding keeps them)
THINK_OPEN, THINK_CLOSE = REASONING_OPEN, REASONING_CLOSE
#: a ChatML template as Qwen2.5 / Qwen3 write it (no default system turn, as Qwen3)
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def gpt2_tiktoken_file() -> Path:
    """``whisper/assets/gpt2.tiktoken`` of the installed ``openai-whisper`` package (found, not imported)."""
    spec = importlib.util.find_spec("whisper")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "assets" / "gpt2.tiktoken"
        if path.is_file():
            return path
    raise FileNotFoundError("GPT-2's BPE vocabulary ships in the openai-whisper source package (whisper/assets/gpt2.tiktoken): "
                            "install it without its dependencies: pip install --no-deps -r tests/consumers.txt")


def gpt2_bpe_tokenizer(tiktoken_file: Path | None = None):
    """GPT-2's byte-level BPE as a fast tokenizer (transformers' TikTokenConverter: vocabulary and merges from
    the ranks), with the ChatML template and the reasoning tokens."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(path: str) -> dict[bytes, int]:  # tiktoken's file format, without the tiktoken package
            ranks = {}
            for line in Path(path).read_text().splitlines():
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
            return ranks

    converted = _Converter(vocab_file=str(tiktoken_file or gpt2_tiktoken_file()), pattern=GPT2_PATTERN).converted()
    converted.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    converted.add_tokens([AddedToken(t, normalized=False, special=False) for t in (THINK_OPEN, THINK_CLOSE)])
    return PreTrainedTokenizerFast(tokenizer_object=converted, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
                                   unk_token=None, extra_special_tokens=["<|im_start|>"], chat_template=CHATML_TEMPLATE,
                                   padding_side="left", clean_up_tokenization_spaces=False)


# ------------------------------------------------------------------------------------------------ spm

#: Llama 2's chat template (user turns only and answers; the text begins with the BOS)
LLAMA2_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


def spm_tokenizer(texts, vocab_size: int = 1024):
    """A SentencePiece BPE model trained on ``texts`` as Llama 2's was set up (byte fallback, split digits, a
    dummy prefix ``▁``, whitespace kept; one thread: the same texts give the same model), loaded as transformers' LlamaTokenizer (its converter: Metaspace,
    byte fallback), with the Llama-2 chat template. As Llama 2's, it adds a BOS when asked to add special tokens: a
    template's text that has one, tokenized that way, would start with two (guidedrl never adds them)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
        split_digits=True, add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(model.getvalue())
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True, "add_eos_token": False,
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "clean_up_tokenization_spaces": False}))
        tok = AutoTokenizer.from_pretrained(tmp)
    tok.pad_token = tok.unk_token  # Llama 2 has no pad token; left padding never reaches the loss
    tok.chat_template = LLAMA2_TEMPLATE
    tok.padding_side = "left"
    return tok


# ------------------------------------------------------------------------------------------------ the policy's side


def tokenizer_requirement(kind: str) -> str | None:
    """What building the ``kind`` tokenizer needs and this environment lacks (None: nothing)."""
    if kind == "gpt2-bpe":
        gpt2_tiktoken_file()  # raises FileNotFoundError with what to install
    if kind == "spm" and importlib.util.find_spec("sentencepiece") is None:
        return "the sentencepiece library trains it: pip install -e '.[dev]' (or pip install sentencepiece==0.2.3)"
    return None


def build_tokenizer(kind: str = "char", texts=None):
    """The tokenizer of ``kind`` (TOKENIZERS); ``texts``: what ``spm`` is trained on."""
    if kind == "char":
        return char_tokenizer()
    if kind == "gpt2-bpe":
        return gpt2_bpe_tokenizer()
    if kind == "spm":
        return spm_tokenizer(texts or [])
    raise ValueError(f"unknown tokenizer {kind!r}; one of {', '.join(TOKENIZERS)}")


def taught_completion(kind: str, solution: str) -> str:
    """What the tiny policy of ``kind`` learns to write for a worked ``solution`` (steps, then ``\\boxed{}``):
    the gpt2-bpe policy reasons in a ``<think>`` block and states the answer after it; the others write the
    solution as it is (the spm one after a space: Llama 2's template opens the assistant's turn with one, so its
    first word is sampled as a ``▁`` piece)."""
    if kind == "spm":
        return " " + solution
    if kind != "gpt2-bpe":
        return solution
    *steps, answer = solution.splitlines()
    return f"{THINK_OPEN}\n" + "\n".join(steps or [answer]) + f"\n{THINK_CLOSE}\n\n{answer}"
