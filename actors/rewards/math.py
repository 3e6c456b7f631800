"""Math reward functions: answer extraction, accuracy and format rewards.

Every reward has the signature ``fn(completion: str, answer: str) -> float``.

Answers are compared with math-verify (``parse`` + ``verify``), so ``007``
equals ``7`` and ``\\frac{4}{2}`` equals ``2``.  math-verify's own timeouts use
``signal.alarm``, which only works in a process's main thread (elsewhere it
raises ValueError, e.g. inside Ray worker threads), so they are disabled here
(``parsing_timeout=None``, ``timeout_seconds=None``).  The deadline is
enforced instead by :class:`actors.scoring.Scorer`, which runs rewards in a
child process that it kills when a sample overruns.
"""

from __future__ import annotations

import logging
import re

from math_verify import parse, verify


class _HideTimeoutDisabledWarning(logging.Filter):
    """Drop math-verify's "Timeout is disabled" warning: it is deliberate here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_HideTimeoutDisabledWarning())

# A number: optional minus, integer part (plain or with thousands separators),
# optional decimals.  It may not continue a word or another number, so
# ``10-3`` yields ``10`` and ``3``, and ``x1`` yields nothing.
_NUMBER = r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_FINAL_LINE_RE = re.compile(rf"####\s*{_NUMBER}")
_MARKER = "####"
_BOXED = "\\boxed{"


def _clean(text: str) -> str:
    """Trim spaces, ``$`` delimiters and a trailing period; drop thousands separators."""
    text = text.strip().rstrip(".").strip().strip("$").strip()
    return _THOUSANDS_RE.sub("", text)


def _after_marker(text: str) -> str | None:
    """What follows the last ``####`` on its line, or None."""
    if _MARKER not in text:
        return None
    tail = text.rsplit(_MARKER, 1)[1].split("\n", 1)[0]
    return _clean(tail) or None


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` with balanced braces, or None."""
    start = text.rfind(_BOXED)
    while start != -1:
        depth, begin = 1, start + len(_BOXED)
        for i in range(begin, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return _clean(text[begin:i]) or None
        start = text.rfind(_BOXED, 0, start)  # unbalanced: try an earlier one
    return None


def extract_answer(text: str, *, lenient: bool = True) -> str | None:
    """The final answer in ``text``, or None when there is none.

    Looks, in order, for what follows the last ``####`` (up to the end of that
    line), for the content of the last ``\\boxed{...}``, and (only when
    ``lenient``) for the last number in the text.  Thousands separators are
    removed, so ``1,234`` comes back as ``1234``.
    """
    found = _after_marker(text) or _last_boxed(text)
    if found is None and lenient:
        numbers = _NUMBER_RE.findall(text)
        found = _clean(numbers[-1]) if numbers else None
    return found


def _equal(predicted: str, answer: str) -> bool:
    """Whether two answer strings are mathematically equal (math-verify)."""
    # Timeouts off: signal.alarm fails outside the main thread; the Scorer's
    # killable child process enforces the deadline instead (see module doc).
    gold = parse(f"${_clean(answer)}$", parsing_timeout=None)
    target = parse(f"${predicted}$", parsing_timeout=None)
    return bool(gold and target and verify(gold, target, timeout_seconds=None))


def accuracy(completion: str, answer: str) -> float:
    """1.0 when the extracted answer (``####``, ``\\boxed{}`` or last number) is right."""
    predicted = extract_answer(completion, lenient=True)
    return float(predicted is not None and _equal(predicted, answer))


def accuracy_strict(completion: str, answer: str) -> float:
    """1.0 when the answer given after ``####`` or in ``\\boxed{}`` is right."""
    predicted = extract_answer(completion, lenient=False)
    return float(predicted is not None and _equal(predicted, answer))


def format_reward(completion: str, answer: str) -> float:
    """1.0 when the reply ends with a line ``#### <number>`` and has one ``####``."""
    lines = completion.strip().splitlines()
    final = lines[-1].strip() if lines else ""
    ok = completion.count(_MARKER) == 1 and _FINAL_LINE_RE.fullmatch(final) is not None
    return float(ok)


def single_number(completion: str, answer: str) -> float:
    """1.0 when the reply holds exactly one number (a terse-answer format reward)."""
    return float(len(_NUMBER_RE.findall(completion)) == 1)


def digits(completion: str, answer: str) -> float:
    """Fraction of the reply's non-space characters that are digits: a dense shaping signal that
    even an untrained (random) model has variance on — the smoke run trains on it."""
    chars = [c for c in completion if not c.isspace()]
    return sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0
