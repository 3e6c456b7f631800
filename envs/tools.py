"""A tool-calling environment: tools are Python functions, described to the policy by JSON schemas.

Schemas come from each function's signature and docstring (transformers' `get_json_schema`) and
are rendered by the model's own chat template (`apply_chat_template(tools=...)`); a template that
ignores tools gets them in the system message instead (`envs.tokens.render_tools`). The policy
calls a tool with `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the Hermes / Qwen
format); a reply without a call ends the trajectory. Every call runs in a thread with a timeout;
a malformed call, an unknown tool, an exception or a timeout becomes an error message back to the
policy (and a counter), never a dead actor. Code runs in the sandbox (`python`: `actors.code_tool`).
"""

from __future__ import annotations

import ast
import json
import operator
import re
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Callable

from envs.base import Message, StepResult

CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
MAX_RESULT_CHARS = 2000  # a tool's answer is cut here (the observation counts against the token limits)


@dataclass(frozen=True)
class Tool:
    fn: Callable[..., Any]
    schema: dict  # {"type": "function", "function": {"name", "description", "parameters"}}

    @property
    def name(self) -> str:
        return self.schema["function"]["name"]

    @classmethod
    def of(cls, fn: Callable[..., Any]) -> "Tool":
        """A tool from a typed function with a Google-style docstring (`Args:` per parameter)."""
        from transformers.utils import get_json_schema

        schema = get_json_schema(fn)
        schema["function"].pop("return", None)
        return cls(fn, schema)


def parse_calls(reply: str) -> tuple[list[tuple[str, dict]], int]:
    """The tool calls of a reply, in order, and how many `<tool_call>` blocks were malformed (not a
    JSON object with a string "name" and an object "arguments")."""
    calls, bad = [], 0
    for body in CALL.findall(reply):
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            bad += 1
            continue
        args = call.get("arguments", {}) if isinstance(call, dict) else None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(args, dict):
            bad += 1
            continue
        calls.append((call["name"], args))
    return calls, bad


class ToolEnv:
    """Up to `max_turns` replies; each call runs within `timeout_s`; at most `max_calls` per reply."""

    def __init__(self, tools: list[Tool], max_turns: int = 4, timeout_s: float = 5.0, max_calls: int = 4,
                 workers: int = 8):
        self.by_name = {t.name: t for t in tools}
        self.max_turns, self.timeout_s, self.max_calls = max_turns, timeout_s, max_calls
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="raygrpo-tool")

    def tools(self) -> list[dict]:
        return [t.schema for t in self.by_name.values()]

    def reset(self, messages: list[Message]) -> tuple[list[Message], None]:
        return messages, None

    def step(self, state: None, reply: str) -> StepResult:
        calls, bad = parse_calls(reply)
        info = {"tool_calls": float(len(calls)), "tool_malformed": float(bad), "tool_errors": 0.0,
                "tool_timeouts": 0.0}
        if not calls and not bad:
            return StepResult(messages=[], done=True, info=info)
        out = []
        if bad:
            out.append(_tool_message(f"error: {bad} malformed tool call(s); write "
                                     '<tool_call>{"name": "...", "arguments": {...}}</tool_call>'))
        for name, args in calls[:self.max_calls]:
            text, outcome = self.call(name, args)
            if outcome != "ok":
                info[outcome] += 1
            out.append(_tool_message(text))
        return StepResult(messages=out, done=False, info=info)

    def call(self, name: str, args: dict) -> tuple[str, str]:
        """(answer, outcome): outcome "ok", "tool_errors" or "tool_timeouts"."""
        tool = self.by_name.get(name)
        if tool is None:
            return f"error: unknown tool {name!r} (tools: {', '.join(self.by_name)})", "tool_errors"
        future = self.pool.submit(tool.fn, **args)
        try:
            result = future.result(timeout=self.timeout_s)
        except FutureTimeout:
            future.cancel()
            return f"error: {name} took longer than {self.timeout_s:g} s", "tool_timeouts"
        except Exception as err:  # noqa: BLE001 - the tool's own failure goes back to the policy
            return f"error: {type(err).__name__}: {err}"[:MAX_RESULT_CHARS], "tool_errors"
        return str(result)[:MAX_RESULT_CHARS], "ok"


def _tool_message(text: str) -> Message:
    return {"role": "tool", "content": text}


# ----------------------------------------------------------------------------- built-in tools

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: numbers with + - * / // % and parentheses, e.g. "(123 + 45) * 67"
    """
    def value(node: ast.AST):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Mult) and abs(left) * abs(right) > 1e30:
                raise ValueError("result too large")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")

    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")
    result = value(ast.parse(expression, mode="eval").body)
    return str(int(result)) if isinstance(result, float) and result.is_integer() else str(result)


TOOLS: dict[str, Callable[..., Any] | str] = {
    "calculator": calculator,
    "python": "actors.code_tool:python",  # runs in the sandbox, which lives with the actors
}


def resolve_tool(name: str) -> Tool:
    """A built-in tool by name, or any typed, documented function by import path "module:function"."""
    import importlib

    fn = TOOLS.get(name, name)
    if isinstance(fn, str):
        module, _, attr = fn.partition(":")
        if not attr:
            raise ValueError(f"unknown tool {name!r} (built-in: {', '.join(TOOLS)}; or module:function)")
        fn = getattr(importlib.import_module(module), attr)
    return Tool.of(fn)
