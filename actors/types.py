"""Plain data passed between the driver and the actors (no Ray, no vLLM, no torch).

Token ids flow unchanged from the engine to the learner: nothing is decoded and re-tokenized
for training. `text` is kept only for rewards and reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Union

Messages = tuple[dict[str, str], ...]  # [{"role": ..., "content": ...}], used as is with the chat template


@dataclass(frozen=True)
class Prompt:
    """One prompt to sample a group for."""

    id: str
    content: Union[str, Messages]  # the user message (wrapped in the chat template), or a whole chat
    system: str = ""  # optional system message, put first unless the chat has its own
    # The problem's reference answer and row (`tasks.base.Problem`), for environments that judge
    # replies themselves (`envs.base.open_trajectory`); the chat alone decides the prompt's tokens.
    answer: str = ""
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)

    def messages(self) -> list[dict[str, str]]:
        """The chat to template: the system message (unless the chat has one), then the prompt."""
        chat = [{"role": "user", "content": self.content}] if isinstance(self.content, str) else \
            [dict(m) for m in self.content]
        if self.system and chat[0]["role"] != "system":
            chat.insert(0, {"role": "system", "content": self.system})
        return chat

    def token_ids(self, tokenizer: Any) -> list[int]:
        """Prompt token ids: the chat template when the tokenizer has one, else the raw text (a
        chat's contents joined by blank lines). The engines and SFT encode prompts alike."""
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(self.messages(), add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        text = self.content if isinstance(self.content, str) else "\n\n".join(m["content"] for m in self.content)
        return tokenizer(text, add_special_tokens=False)["input_ids"]


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
    text: str  # decoded completion (a trajectory: its final reply), for rewards and reports only
    # multi-turn trajectories (actors.multiturn); None for a single reply
    mask: list[int] | None = None  # [C] 1 on the policy's tokens, 0 on the environment's (no loss there)
    turns: list[dict[str, str]] | None = None  # the exchange after the prompt: replies and observations
    info: dict[str, float] | None = None  # counters: turns, tool calls/errors/timeouts, tokens by role, cuts


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

    @classmethod
    def merge(cls, parts: Iterable["GenerateResult"], prompts: list[Prompt]) -> "GenerateResult":
        """One result from streamed parts, groups in the order of `prompts`."""
        out = cls(groups=[], dropped=[])
        for part in parts:
            out.groups += part.groups
            out.dropped += part.dropped
        order = {p.id: i for i, p in enumerate(prompts)}
        out.groups.sort(key=lambda g: order[g.prompt.id])
        return out


@dataclass
class ScoreRequest:
    """One group to score: the G completions of one prompt, its reference answer and context."""

    completions: list[str]  # [G] decoded completions
    answer: str
    prompt: Union[str, Messages] = ""  # for reward functions that ask for `prompt`
    metadata: dict[str, Any] = field(default_factory=dict)  # the data row's other columns
    # [G] each completion's trajectory counters (`Completion.info`, {} for a single reply), for
    # reward functions that ask for `info`; empty: none (as single replies)
    infos: list[dict[str, float]] = field(default_factory=list)
