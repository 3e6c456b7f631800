"""DeepSeek-R1 recipe rewards: the think-block format and language consistency of the reasoning.

A reply is split as vLLM's ``deepseek_r1`` reasoning parser splits it (:func:`split_think`):
the reasoning is what precedes the first closing tag (after the opening tag, when the reply has
one) and the final answer is what follows it.  The opening tag may be missing: DeepSeek-R1's
chat template (and QwQ's, Qwen3-Thinking's) ends the generation prompt with ``<think>\\n``, so
the completion starts inside the block and only closes it (SGLang's and vLLM's ``deepseek_r1``
parsers accept both forms).  trl's ``think_format_reward`` and open-r1's ``format_reward`` require
the opening tag; they assume the model opens the block itself.

- :func:`make_think_format` / ``think_format``: the R1 format reward (R1 report, section 2.2.2).
- :func:`make_language_consistency` / ``language_consistency``: "the proportion of target
  language words in the CoT" (R1 report, section 2.3.2), by Unicode script (``unicodedata``).
"""

from __future__ import annotations

import itertools
import unicodedata
from functools import lru_cache
from typing import Callable

OPEN, CLOSE = "<think>", "</think>"

# First word of a letter's Unicode name -> its script ("KATAKANA-HIRAGANA ..." counts as kana).
_SCRIPT_BY_NAME = {
    "LATIN": "latin", "CYRILLIC": "cyrillic", "GREEK": "greek", "CJK": "han", "IDEOGRAPHIC": "han",
    "HIRAGANA": "kana", "KATAKANA": "kana", "HANGUL": "hangul",
}
# Target names -> the scripts that count as the target.
SCRIPTS: dict[str, frozenset[str]] = {
    "latin": frozenset({"latin"}),
    "cyrillic": frozenset({"cyrillic"}),
    "greek": frozenset({"greek"}),
    "cjk": frozenset({"han", "kana", "hangul"}),
}
_UNSPACED = frozenset({"han", "kana"})  # written without spaces: one word per character
_MATH_SCRIPTS = frozenset({"greek"})  # θ, π, α are math symbols unless Greek is the target


def split_think(text: str, open: str = OPEN, close: str = CLOSE) -> tuple[str, str] | None:
    """``(reasoning, answer)``, or None when the reply has no closing tag.

    ``reasoning`` is the text before the first ``close``, from after the first ``open`` when
    one precedes it (else from the start: the template opened the block); ``answer`` is
    everything after the first ``close``.  Neither is stripped.
    """
    head, found, answer = text.partition(close)
    if not found:
        return None
    before, opened, inside = head.partition(open)
    return (inside if opened else before), answer


def reasoning_text(text: str, open: str = OPEN, close: str = CLOSE) -> str:
    """The reasoning: inside the think block; after ``open`` when it never closes; else all."""
    parts = split_think(text, open, close)
    if parts is not None:
        return parts[0]
    before, opened, inside = text.partition(open)
    return inside if opened else before


def make_think_format(open: str = OPEN, close: str = CLOSE) -> Callable[[str, str], float]:
    """A reward: 1.0 for ``[open] reasoning close answer`` with both parts non-blank, else 0.0.

    Exactly one ``close``; at most one ``open``, and only at the very start (leading whitespace
    allowed) — without it the chat template is taken to have opened the block.  Blank reasoning
    (an empty block: a "no thinking" reply) or a blank answer scores 0.0, as does any tag in
    the answer (a second block).
    """
    if not open or not close or open == close:
        raise ValueError(f"think tags must be two different non-empty strings, got {open!r}, {close!r}")

    def think_format(completion: str, answer: str) -> float:
        """1.0 when the reply is one think block then a non-empty final answer (see factory)."""
        parts = split_think(completion, open, close)
        if parts is None:
            return 0.0
        reasoning, final = parts
        head = completion.partition(close)[0].lstrip()
        opened_at_start = head.startswith(open) and head.count(open) == 1
        ok = (opened_at_start or open not in head) and open not in final and close not in final
        return float(ok and bool(reasoning.strip()) and bool(final.strip()))

    return think_format


@lru_cache(maxsize=8192)
def script_of(char: str) -> str | None:
    """The script of a letter (``latin``, ``cyrillic``, ``greek``, ``han``, ``kana``, ``hangul``
    or ``other``), from its Unicode name; None for anything that is not a letter."""
    if not char.isalpha():
        return None
    first = unicodedata.name(char, "").split(" ", 1)[0].split("-", 1)[0]
    return _SCRIPT_BY_NAME.get(first, "other")


def word_scripts(text: str) -> list[str]:
    """The script of each word of ``text`` (NFKC-normalized, so full-width letters are Latin).

    A word is a maximal run of letters of one script, so digits, punctuation, spaces and a
    change of script all end a word (``x计算`` is three words: ``x``, ``计``, ``算``); Han and
    kana, written without spaces, count one word per character.
    """
    scripts: list[str] = []
    for script, run in itertools.groupby(unicodedata.normalize("NFKC", text), key=script_of):
        if script is not None:
            scripts.extend([script] * (len(list(run)) if script in _UNSPACED else 1))
    return scripts


def make_language_consistency(script: str = "latin", open: str = OPEN,
                              close: str = CLOSE) -> Callable[[str, str], float]:
    """A reward: the share of the reasoning's words written in ``script`` (a key of :data:`SCRIPTS`).

    The reasoning is :func:`reasoning_text` (the think block when there is one, else the whole
    reply).  Words without letters (numbers, math symbols) do not count either way, nor do
    Greek words unless Greek is the target (in math they are variables).  A reasoning with no
    counted word (empty, numbers only) scores 0.0.
    """
    if script not in SCRIPTS:
        raise ValueError(f"unknown script {script!r}; known: {', '.join(sorted(SCRIPTS))}")
    target = SCRIPTS[script]
    neutral = _MATH_SCRIPTS - target

    def language_consistency(completion: str, answer: str) -> float:
        """Share of the reasoning's words in the target script (see factory)."""
        words = [s for s in word_scripts(reasoning_text(completion, open, close)) if s not in neutral]
        return sum(s in target for s in words) / len(words) if words else 0.0

    return language_consistency


think_format = make_think_format()
language_consistency = make_language_consistency()
