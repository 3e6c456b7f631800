"""Plain data passed between the driver and the actors (no Ray, no vLLM, no torch).

Token ids flow unchanged from the engine to the learner: nothing is decoded and re-tokenized
for training. `text` is kept only for rewards and reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Prompt:
    """One prompt to sample a group for."""

    id: str
    text: str  # user message (wrapped in the chat template when the tokenizer has one)
    system: str = ""  # optional system message


@dataclass(frozen=True)
class SamplingSpec:
    """Engine-independent sampling settings (mapped onto vLLM's SamplingParams by the actor)."""

    n: int  # completions per prompt (G)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 32
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Completion:
    token_ids: list[int]  # [C] sampled tokens, EOS included when generated
    logprobs: list[float]  # [C] engine logprob of each sampled token (after temperature)
    finish_reason: str  # "stop" | "length" | "abort"
    text: str  # decoded completion, for rewards and reports only


@dataclass
class Group:
    """The G completions of one prompt, produced by one policy version."""

    prompt: Prompt
    prompt_token_ids: list[int]  # [P_i]
    completions: list[Completion]  # G entries
    version: int  # policy version (number of weight syncs) the engine held while sampling


@dataclass
class GenerateResult:
    groups: list[Group]
    dropped: list[str] = field(default_factory=list)  # ids of prompts longer than the limit
