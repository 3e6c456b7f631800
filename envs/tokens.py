"""Token ids of a multi-turn trajectory, built from the chat template's deltas.

The policy's replies are kept as the engine sampled them, end-of-turn token included. An
observation (tool results, a user turn) is encoded once as the difference between the template
rendering a fixed two-turn chat and the same chat followed by the observation with the
generation prompt, so its ids are exactly what the template puts between the policy's
end-of-turn token and its next reply (separators and role headers included). Nothing is ever
re-tokenized: a conversation rendered whole could merge tokens across a turn boundary, the
re-tokenization drift that makes learner and engine disagree on what was sampled.
"""

from __future__ import annotations

import json
from typing import Any

from envs.base import Message

# For tokenizers without a chat template (the tiny test model): ChatML with the tokenizer's own
# end-of-sequence token closing each turn, so the engine stops where a turn ends.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + eos_token + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
_BASE: list[Message] = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]


def _ids(tokenizer: Any, messages: list[Message], **kw: Any) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        kw["chat_template"] = FALLBACK_TEMPLATE
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """Token ids that close a reply: the tokenizer's EOS and the template's turn terminator."""
    ids = {tokenizer.eos_token_id} - {None}
    closing = _ids(tokenizer, _BASE)
    reply = tokenizer.encode("a", add_special_tokens=False)
    for i in range(len(closing) - len(reply), -1, -1):  # the token right after the reply's text
        if closing[i:i + len(reply)] == reply and i + len(reply) < len(closing):
            ids.add(closing[i + len(reply)])
            break
    return ids


def prompt_ids(tokenizer: Any, messages: list[Message], tools: list[dict] | None) -> list[int]:
    """The opening prompt with the tools: rendered by the template; a template that ignores tools
    gets them as a system message (Hermes-style instructions)."""
    plain = _ids(tokenizer, messages, add_generation_prompt=True)
    if not tools:
        return plain
    with_tools = _ids(tokenizer, messages, tools=tools, add_generation_prompt=True)
    if with_tools != plain:
        return with_tools
    return _ids(tokenizer, render_tools(messages, tools), add_generation_prompt=True)


def render_tools(messages: list[Message], tools: list[dict]) -> list[Message]:
    """The chat with a system message that lists the tools and the call format."""
    listing = "\n".join(json.dumps(t["function"]) for t in tools)
    text = ("You can call tools. Tools:\n" + listing + "\nTo call one, reply with "
            '<tool_call>{"name": "<tool>", "arguments": {...}}</tool_call> and wait for its answer.')
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + text}] + messages[1:]
    return [{"role": "system", "content": text}] + messages


def observation_ids(tokenizer: Any, observation: list[Message], eot: set[int], closed: bool = True) -> list[int]:
    """Ids to append after a reply: what the template puts after the reply's end-of-turn token,
    the observation's messages, and the next generation prompt. `closed=False` (a reply that
    stopped on a stop string, without the end-of-turn token) starts with that token too."""
    base = _ids(tokenizer, _BASE)
    full = _ids(tokenizer, _BASE + observation, add_generation_prompt=True)
    if full[:len(base)] != base:
        raise ValueError("the chat template renders earlier turns differently once more follow; "
                         "multi-turn trajectories need a template that appends turns")
    last = max((i for i, t in enumerate(base) if t in eot), default=len(base) - 1)
    return base[last + int(closed):] + full[len(base):]
