"""SFT data: prompt/response rows → token ids → batches (pure; no Ray, no torch).

Rows are read by the data loader of `data.*` (HF `datasets`; bad rows skipped and counted), with
the response column in the answer's place. A prompt is encoded exactly as the rollout engines
encode it (`Prompt.token_ids`: the chat template with `task.system_prompt` and the generation
prompt), so what SFT teaches is what generation sees; the response is the text's own tokens and
the end-of-sequence token. The loss is on the response only: the prompt is `TrainBatch.prompt_ids`
and the learner scores `completion_ids` alone. A distillation student re-tokenizes the same text
with its own tokenizer.

A response may also be a chat (assistant and tool/user turns: a tool-using trace): it is encoded
as a multi-turn rollout is (`envs.tokens`): each assistant turn its text's tokens and the
end-of-turn token, each observation the chat template's delta, with the prompt rendered with the
tools; `token_mask` keeps the observations out of the loss, as in GRPO.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.types import Prompt
from common.files import write_atomic
from learner.batch import TrainBatch
from tasks.base import PromptContent, stable_seed


@dataclass(frozen=True)
class Example:
    prompt: PromptContent  # the user message, or a chat
    response: str | list[dict[str, str]]  # the reply, or a chat (assistant and tool turns)
    source: str = ""  # file:row


@dataclass
class Encoded:
    prompt_ids: list[list[int]]  # N × P_i
    response_ids: list[list[int]]  # N × R_i (end-of-sequence included)
    too_long: int = 0  # rows over the length limit, skipped
    masks: list[list[int]] | None = None  # N × R_i: 0 on a chat response's observations; None: all 1

    def batch(self, index: list[int]) -> TrainBatch:
        """Rows `index` as a TrainBatch: loss weight 1, no advantages, no engine logprobs."""
        return TrainBatch([self.prompt_ids[i] for i in index], [self.response_ids[i] for i in index],
                          [[0.0] * len(self.response_ids[i]) for i in index], [0.0] * len(index), [1.0] * len(index),
                          token_mask=None if self.masks is None else [self.masks[i] for i in index])

    def __len__(self) -> int:
        return len(self.prompt_ids)


def load_examples(files: list[str], prompt_key: str, response_key: str) -> tuple[list[Example], int]:
    """Every valid row of `files` and the count of rows skipped (the loader logs them); DataError
    (a ConfigError) for a missing or unusable file."""
    from tasks.files import load_file

    examples, skipped = [], 0
    for f in files:
        loaded = load_file(f, prompt_key, response_key, "train")
        examples += [Example(p.prompt, p.answer, p.source) for p in loaded.problems]
        skipped += len(loaded.skipped)
    return examples, skipped


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    """`rows` as JSON lines at `path`, all at once (a later stage never reads half a file)."""
    return write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held out): a seeded shuffle, `fraction` of the rows (at least 1, at most n − 1) held out."""
    order = list(range(len(examples)))
    random.Random(stable_seed("sft-split", seed)).shuffle(order)
    n_val = min(max(1, round(fraction * len(examples))), len(examples) - 1)
    return [examples[i] for i in sorted(order[n_val:])], [examples[i] for i in sorted(order[:n_val])]


def encode(examples: list[Example], tokenizer: Any, system_prompt: str, max_len: int,
           tools: list[dict] | None = None) -> Encoded:
    """Token ids of each row; rows longer than `max_len` tokens in all are skipped and counted.
    `tools`: the schemas a chat response's prompt is rendered with (as the engines render it)."""
    chats = any(not isinstance(ex.response, str) for ex in examples)
    out = Encoded([], [], masks=[] if chats else None)
    for ex in examples:
        prompt = Prompt("sft", ex.prompt, system_prompt)
        if isinstance(ex.response, str):
            ids = list(prompt.token_ids(tokenizer))
            response = list(tokenizer(ex.response, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
            mask = [1] * len(response)
        else:
            ids, response, mask = encode_chat(tokenizer, prompt.messages(), ex.response, tools)
        if len(ids) + len(response) > max_len:
            out.too_long += 1
            continue
        out.prompt_ids.append(ids)
        out.response_ids.append(response)
        if out.masks is not None:
            out.masks.append(mask)
    return out


def encode_chat(tokenizer: Any, messages: list[dict[str, str]], reply: list[dict[str, str]],
                tools: list[dict] | None) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, response ids, mask) of a chat response, as a multi-turn rollout lays them out."""
    from envs.tokens import end_of_turn_ids, observation_ids, prompt_ids

    eot = end_of_turn_ids(tokenizer)
    response: list[int] = []
    mask: list[int] = []
    i = 0
    while i < len(reply):
        if reply[i]["role"] == "assistant":
            ids = list(tokenizer(reply[i]["content"], add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
            response, mask, i = response + ids, mask + [1] * len(ids), i + 1
            continue
        j = i
        while j < len(reply) and reply[j]["role"] != "assistant":
            j += 1
        ids = observation_ids(tokenizer, reply[i:j], eot)
        response, mask, i = response + ids, mask + [0] * len(ids), j
    return prompt_ids(tokenizer, messages, tools), response, mask


def epoch_batches(n: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Row indices of each optimizer step: a fresh seeded permutation per epoch, cut into
    `batch_size` rows (an epoch's last batch may be smaller)."""
    steps = []
    for epoch in range(epochs):
        order = list(range(n))
        random.Random(stable_seed("sft-epoch", seed, epoch)).shuffle(order)
        steps += [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return steps


def nll(logprobs: list[list[float]], masks: list[list[int]] | None = None) -> float:
    """Token-mean negative log-likelihood of per-sequence token logprobs (where `masks` is 1)."""
    if masks is None:
        masks = [[1] * len(row) for row in logprobs]
    tokens = sum(sum(m) for m in masks)
    return -sum(lp for row, m in zip(logprobs, masks) for lp, keep in zip(row, m) if keep) / max(1, tokens)
