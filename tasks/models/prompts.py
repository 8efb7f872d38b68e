"""Prompt templates and their rendering (see tasks/models/prompts/README.md).

A prompt is stored as the rendered string the model saw: template filled in,
then wrapped by the tokenizer's chat template.
"""

from __future__ import annotations

from pathlib import Path
from string import Template

PROMPTS_DIR = Path(__file__).parent / "prompts"
PROMPT_KINDS = ("plain", "explain", "hint")


def load_template(path_or_name: str | Path) -> Template:
    """A template file by path, or a built-in one by name (``plain``, ``tiny_explain``...)."""
    p = Path(path_or_name)
    if not p.suffix:
        p = PROMPTS_DIR / f"{p.name}.txt"
    try:
        return Template(p.read_text().rstrip("\n"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: prompt template not found (built-in: {sorted(x.stem for x in PROMPTS_DIR.glob('*.txt'))})") from None


def fill(template: Template, question: str, answer: str | None = None, hint: str | None = None) -> str:
    """The user turn: the template with $question (and $answer / $hint) filled in."""
    try:
        return template.substitute(question=question, answer=answer or "", hint=hint or "")
    except (KeyError, ValueError) as exc:
        raise ValueError(f"prompt template {template.template[:60]!r}...: {exc}; allowed fields: $question, $answer, $hint") from None


def chat(tokenizer, user_turn: str) -> str:
    """Wrap a user turn in the tokenizer's chat template, ready for the assistant turn."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user_turn}], tokenize=False, add_generation_prompt=True)
    return user_turn


def hint_text(wrong: list[str], truncated: bool) -> str:
    """LTE's hint: the policy's distinct wrong answers and/or a call to be concise."""
    parts = []
    if wrong:
        parts.append("These answers are wrong: " + ", ".join(wrong) + ".")
    if truncated:
        parts.append("Be concise.")
    return " ".join(parts)
