"""Environments for the multi-turn tests, referenced as "tests.env_fixtures:<Class>" (the engine
actor imports them by path, as it would a user's)."""

from __future__ import annotations

import threading
import time

from envs.base import StepResult


def reply_length(completion: str, answer: str) -> float:
    """A reward the random tiny model's groups have variance on: the final reply's length (so
    that DAPO's dynamic sampling keeps groups in an end-to-end run)."""
    return len(completion) / 100


class Echo:
    """Answers every reply with a tool message "noted <k>" and ends after `replies` replies; each
    answer takes `sleep_s` (a slow tool)."""

    replies = 2
    sleep_s = 0.0

    def __init__(self, max_turns: int = 3, tool_timeout_s: float = 5.0):
        self.max_turns = max_turns

    def reset(self, messages):
        return messages, {"k": 0}

    def step(self, state, reply: str) -> StepResult:
        state["k"] += 1
        time.sleep(self.sleep_s)
        if state["k"] >= self.replies:
            return StepResult(messages=[], done=True, info={"tool_calls": 0.0})
        return StepResult(messages=[{"role": "tool", "content": f"noted {state['k']}"}], done=False,
                          info={"tool_calls": 1.0}, reward=0.5)

    def tools(self):
        return None


class SlowEcho(Echo):
    """Echo whose answers take 0.2 s, counting how many run at once (`most`)."""

    sleep_s = 0.2
    lock = threading.Lock()
    now = most = 0

    def step(self, state, reply: str) -> StepResult:
        with self.lock:
            SlowEcho.now += 1
            SlowEcho.most = max(SlowEcho.most, SlowEcho.now)
        try:
            return super().step(state, reply)
        finally:
            with self.lock:
                SlowEcho.now -= 1


class Broken(Echo):
    def step(self, state, reply: str) -> StepResult:
        raise RuntimeError("the environment's own bug")
