"""Tokens and text: every place guidedrl maps token ids to text positions goes through here (DESIGN.md, "Tokens and text").

A row's truth is its token ids; text is derived. Positions in text come from incremental decoding — the decoded
prefix grows by what each token adds, as a streaming detokenizer emits it — never from adding up tokens decoded one
at a time: a character can span tokens (byte-level BPE, SentencePiece's byte fallback: each part alone decodes to
U+FFFD), and SentencePiece drops a word's leading ``▁`` when its token is decoded alone.

- ``prompt_ids``: a rendered prompt's ids as the sampler gets them (the chat template's BOS and special tokens are in
  its text: nothing is added, so nothing is doubled).
- ``stop_token_ids``: where generation stops (the eos, and every eos of the generation config: a list in real ones).
- ``decode_completion``: a completion's text (special tokens removed).
- ``token_spans``: the decoded text and each token's [start, end) in it (``prefix_pieces``: the same by decoding every
  prefix, O(n²), the fallback and the alignment checker's reference).
- ``token_steps``: a completion cut into steps at the token where the step's text ends with a delimiter (ExpRL).
- ``token_step_index``: each token's step, for steps given as texts located in the completion.
- ``suffix_ids``: the ids of a text as it follows another (for text nobody sampled, such as a reference answer), cut
  where the two tokenizations diverge (``common_prefix_length``), as TRL's DPO trainer cuts a prompt from its completion.
- ``decodes_to``: whether ids are a completion with a given text (decoded alone, or after a word, as a server may write it).
- ``continuation_text``: what follows the prompt in the text of prompt + completion ids (a SentencePiece completion
  keeps its first word's space: prompt + continuation tokenizes back to the sampled ids).
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Sequence

Span = tuple[int, int]

#: the step delimiter the ExpRL authors cut on (``judge.step_split: "###"``)
DELIMITER = "###"


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The ids of a rendered prompt (chat template applied), as the sampler is given them and as the loss side
    puts them before the sampled ids: the template's own BOS and special tokens as written, nothing added."""
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """The ids generation stops at: the tokenizer's eos and every id of the generation config's ``eos_token_id``
    (an int or a list, as real configs have it)."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    extra = getattr(generation_config, "eos_token_id", None)
    for i in extra if isinstance(extra, (list, tuple)) else [extra]:
        if i is not None and i not in ids:
            ids.append(int(i))
    return ids


def decode_completion(tokenizer, ids: Sequence[int]) -> str:
    """A completion's text: its ids decoded whole, special tokens (eos, turn markers) removed."""
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _stream_pieces(tokenizer, ids: list[int], skip_special_tokens: bool) -> list[str] | None:
    """What each token adds to the decoded text, from tokenizers' ``DecodeStream`` (a fast tokenizer), or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:
        return None
    stream = DecodeStream(skip_special_tokens=skip_special_tokens)
    try:
        return [stream.step(backend, int(i)) or "" for i in ids]
    except Exception:  # the stream refuses ids whose decoded prefix changes as it grows ("Invalid prefix"): decode prefixes
        return None


def prefix_pieces(tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    """The same by decoding every prefix (any tokenizer): a token adds the growth of the decoded prefix, once the
    prefix no longer ends inside a character (U+FFFD) and still begins the text decoded so far."""
    pieces, done = [], ""
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k], skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)
        if text.startswith(done) and not text.endswith("\ufffd"):
            pieces.append(text[len(done):])
            done = text
        else:
            pieces.append("")
    return pieces


def token_spans(tokenizer, ids: Sequence[int], skip_special_tokens: bool = True) -> tuple[str, list[Span]]:
    """``decode(ids)`` and each token's [start, end) in it, by incremental decoding. A token that ends inside a
    character gets an empty span where the character starts; the token that completes it, the whole character.
    A special token removed from the text gets an empty span where it stood."""
    ids = [int(i) for i in ids]
    text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)
    pieces = _stream_pieces(tokenizer, ids, skip_special_tokens)
    if pieces is None or "".join(pieces) != text:
        pieces = prefix_pieces(tokenizer, ids, skip_special_tokens)
    if "".join(pieces) != text:  # a decoder that rewrites what it emitted (no streaming form): the prefixes' ends
        ends = [len(tokenizer.decode(ids[:k + 1], skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False))
                for k in range(len(ids))]
        ends = [min(e, len(text)) for e in ends]
        return text, [(a, max(a, b)) for a, b in zip([0] + ends[:-1], ends)]
    spans, at = [], 0
    for piece in pieces:
        spans.append((at, at + len(piece)))
        at += len(piece)
    return text, spans


def token_steps(pieces: list[str], delimiter: str = DELIMITER) -> list[Span]:
    """Steps as token ranges [start, end), cut as the ExpRL authors cut them: a step ends at the token where the
    step's text so far ends with ``delimiter`` (that token, and so the delimiter, belongs to the step it closes); the
    last step runs to the end. ``pieces``: what each token adds to the text (``token_spans``), so a token that is
    part of a character adds nothing and never closes a step. A token that straddles the delimiter (``##`` then
    ``# S``) leaves the text not ending with it: no cut."""
    spans, start, text = [], 0, ""
    for i, piece in enumerate(pieces):
        text += piece
        if piece and text.endswith(delimiter):
            spans.append((start, i + 1))
            start, text = i + 1, ""
    if start < len(pieces):
        spans.append((start, len(pieces)))
    return spans


def pieces_of(text: str, spans: list[Span]) -> list[str]:
    """What each token adds to the text."""
    return [text[a:b] for a, b in spans]


def step_char_ranges(spans: list[Span], steps: list[Span], length: int) -> list[Span]:
    """The text range of each token range (a step's text: ``text[a:b]``, its leading space included)."""
    cuts = [spans[a][0] if a < len(spans) else length for a, _ in steps]
    return [(c, n) for c, n in zip(cuts, cuts[1:] + [length])]


def token_step_index(text: str, spans: list[Span], steps: list[str]) -> list[int]:
    """For each token, the index of the step its text starts in: the steps (texts) located in ``text`` in order;
    tokens before the first step belong to it, whitespace between steps to the step before."""
    starts, pos = [], 0
    for step in steps:
        at = text.find(step, pos)
        at = pos if at < 0 else at
        starts.append(at)
        pos = at + len(step)
    return [max(0, bisect_right(starts, start) - 1) for start, _ in spans]


def decodes_to(tokenizer, ids: Sequence[int], text: str) -> bool:
    """Whether ``ids`` are a completion whose text is ``text``: decoded alone, or as they read after a word (a
    server that decodes a completion with its prompt as context writes a SentencePiece completion's first space)."""
    return decode_completion(tokenizer, ids) == text or continuation_text(tokenizer, "a", ids) == text


def continuation_text(tokenizer, prompt: str, ids: Sequence[int]) -> str | None:
    """The text that follows ``prompt`` when its ids and the completion ``ids`` are decoded together, special tokens
    removed (None where the prompt's text is not a prefix of the whole): for SentencePiece the completion's first
    word keeps the space its ``▁`` carries, so prompt + continuation tokenizes as the sampled sequence."""
    head_ids = prompt_ids(tokenizer, prompt)
    head = tokenizer.decode(head_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    whole = tokenizer.decode(head_ids + [int(i) for i in ids], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return whole[len(head):] if whole.startswith(head) else None


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def suffix_ids(tokenizer, head: str, tail: str) -> list[int]:
    """The ids of text ``tail`` as it follows text ``head``: ``head + tail`` tokenized, less the ids it shares with
    ``head`` alone (as TRL's DPO trainer splits a prompt from its completion). For text nobody sampled (a reference
    answer placed after a prompt); sampled text has its ids."""
    whole = prompt_ids(tokenizer, head + tail)
    return whole[common_prefix_length(prompt_ids(tokenizer, head), whole):]
