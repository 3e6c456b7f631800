"""Per-step metrics of reasoning replies (DeepSeek-R1 recipe), as pure functions.

:func:`reasoning_metrics` takes one step's completion texts and their token counts and returns
``reasoning/*`` floats, the curves the R1 report watches while RL runs:

- ``length_{mean,p50,p90,max}``: response length in tokens; it grows as the policy learns to
  think longer (R1 report, figure 3).  Percentiles interpolate linearly between order
  statistics (``statistics.quantiles(method="inclusive")``, numpy's default).
- ``reflection_rate``: share of replies with a reflection marker ("wait", "verify", ...; the
  report's "aha moment", section 2.2.4), matched case-insensitively on word boundaries.
- ``answer_only_in_think``: share of replies that close a think block and write nothing after
  it, so the answer is (at best) only inside the reasoning; see
  :func:`actors.rewards.reasoning.split_think` (the opening tag may come from the template).
- ``ngram_repetition``: mean over replies of 1 − distinct n-grams / total n-grams of the
  lowercased whitespace tokens (n = 4), as open-r1's repetition penalty (after Yeo et al.,
  "Demystifying Long Chain-of-Thought Reasoning", appendix C.2) scales it; 0 for a reply of
  fewer than n tokens.
"""

from __future__ import annotations

import re
import statistics
from typing import Sequence

from actors.rewards.reasoning import CLOSE, OPEN, split_think
from orchestration.config.recipe import REFLECTION_MARKERS

PREFIX = "reasoning/"


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """``length_mean``, ``length_p50``, ``length_p90``, ``length_max`` of token counts ({} if none)."""
    if not lengths:
        return {}
    if len(lengths) == 1:
        p50 = p90 = float(lengths[0])
    else:
        deciles = statistics.quantiles(lengths, n=10, method="inclusive")
        p50, p90 = deciles[4], deciles[8]
    return {"length_mean": float(statistics.fmean(lengths)), "length_p50": float(p50),
            "length_p90": float(p90), "length_max": float(max(lengths))}


def marker_pattern(markers: Sequence[str]) -> re.Pattern[str]:
    """A case-insensitive regex matching any marker as whole words; spaces match any whitespace."""
    if not markers:
        raise ValueError("need at least one reflection marker")
    words = (r"\s+".join(map(re.escape, m.split())) for m in markers)
    return re.compile(r"\b(?:" + "|".join(words) + r")\b", re.IGNORECASE)


def reflection_rate(texts: Sequence[str], markers: Sequence[str] = REFLECTION_MARKERS) -> float:
    """Share of ``texts`` that contain at least one of ``markers`` (0.0 for no texts)."""
    pattern = marker_pattern(markers)
    return _share(pattern.search(t) is not None for t in texts)


def answer_only_in_think(texts: Sequence[str], open: str = OPEN, close: str = CLOSE) -> float:
    """Share of ``texts`` with a closed think block and only whitespace after its first ``close``."""
    return _share(p is not None and not p[1].strip() for p in (split_think(t, open, close) for t in texts))


def repetition(text: str, n: int = 4) -> float:
    """1 − distinct / total n-grams of the lowercased whitespace tokens; 0.0 below n tokens."""
    words = text.lower().split()
    grams = list(zip(*(words[i:] for i in range(n))))
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def ngram_repetition(texts: Sequence[str], n: int = 4) -> float:
    """Mean of :func:`repetition` over ``texts`` (0.0 for no texts)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return statistics.fmean(repetition(t, n) for t in texts) if texts else 0.0


def reasoning_metrics(texts: Sequence[str], lengths: Sequence[int], *,
                      markers: Sequence[str] = REFLECTION_MARKERS, n: int = 4,
                      open: str = OPEN, close: str = CLOSE) -> dict[str, float]:
    """All ``reasoning/*`` metrics of one step: ``texts[i]`` is a completion, ``lengths[i]`` its
    token count.  Returns {} for an empty step; raises ValueError when the lengths differ."""
    if len(texts) != len(lengths):
        raise ValueError(f"{len(texts)} texts but {len(lengths)} lengths")
    if not texts:
        return {}
    out = {**length_stats(lengths),
           "reflection_rate": reflection_rate(texts, markers),
           "answer_only_in_think": answer_only_in_think(texts, open, close),
           "ngram_repetition": ngram_repetition(texts, n)}
    return {PREFIX + k: v for k, v in out.items()}


def _share(flags) -> float:
    """The fraction of true values in an iterable of booleans (0.0 when it is empty)."""
    flags = list(flags)
    return sum(flags) / len(flags) if flags else 0.0
