"""Child process that runs reward functions for :class:`actors.scoring.Scorer`.

Started as ``python -m actors.reward_server``.  It talks over stdin/stdout in
length-prefixed UTF-8 JSON (an 8-byte big-endian length, then the JSON text;
at most ``MAX_MESSAGE_BYTES``).  JSON, not pickle: the reply pipe may be
written by code the child runs (a hostile completion in the code sandbox),
and reading a reply must never run anything.  Messages are JSON arrays:

1. The parent sends ``[[name, settings], ...]`` for the reward functions
   (settings: null, or a factory's keyword arguments).  The child resolves
   them itself (so functions never need to be picklable) and answers
   ``["ready", null]`` or ``["error", message]``.
2. Then requests, each answered by ``["ok", result, id]`` or
   ``["error", message, id]`` when a function raised (the child keeps serving
   after an error); ``id`` is the request's, echoed so that a reply forged by
   someone who does not know it is refused:
   - ``["sample", id, completion, answer, prompt, metadata, info]``: every
     per-sample function on one completion; result ``{name: value}``;
   - ``["group", id, completions, answer, prompt, metadata, infos]``: every batched
     function on a whole group; result ``[{name: value}, ...]``, one per completion.
   ``prompt`` (a string, or chat messages: a tuple of dicts again in the child),
   ``metadata`` and ``info`` (the completion's trajectory counters; for a group,
   a list of them) reach only functions that ask for them.  Values JSON cannot
   hold arrive converted (:func:`plain`: arrays as lists, datetimes as ISO text,
   anything else as ``str``).

The parent checks every reply strictly (see :mod:`actors.scoring`); the child
trusts its requests, which come from the parent.  Functions run in the child's
main thread, one sample at a time.  The child has no deadline of its own: the
parent kills it when a reply is late.  It exits when its stdin closes.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from typing import Any, BinaryIO

HEADER = struct.Struct("!Q")
MAX_MESSAGE_BYTES = 64 << 20  # a longer message means a broken (or hostile) peer


class ProtocolError(ValueError):
    """A message that is too long or not UTF-8 JSON."""


def plain(value: Any) -> Any:
    """``json.dumps``' fallback for what JSON cannot hold: numpy and torch values as (lists of)
    numbers, dates and times as ISO text, sets as lists, anything else as its ``str``."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, (set, frozenset)):
        return list(value)
    return str(value)


def pack(message: Any) -> bytes:
    """A message framed for the pipe: length header plus JSON; ProtocolError when over the cap."""
    try:
        payload = json.dumps(message, default=plain, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as e:  # e.g. a dict key JSON cannot hold
        raise ProtocolError(f"message not encodable as JSON: {e}") from e
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(payload)} bytes over the {MAX_MESSAGE_BYTES} byte cap")
    return HEADER.pack(len(payload)) + payload


def unpack(payload: bytes) -> Any:
    """The message in one payload; ProtocolError when it is not UTF-8 JSON."""
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"not UTF-8 JSON: {e}") from e


def message_size(header: bytes) -> int:
    """The payload length a header announces; ProtocolError when over the cap."""
    (size,) = HEADER.unpack(header)
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {size} bytes announced, over the {MAX_MESSAGE_BYTES} byte cap")
    return size


def read_message(stream: BinaryIO) -> Any:
    """The next message from a blocking stream; raises EOFError at end of stream."""
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        raise EOFError("stream closed")
    size = message_size(header)
    payload = stream.read(size)
    if len(payload) < size:
        raise EOFError("stream closed mid-message")
    return unpack(payload)


def write_message(stream: BinaryIO, message: Any) -> None:
    """Send one message on a blocking stream."""
    stream.write(pack(message))
    stream.flush()


def _private_pipes() -> tuple[BinaryIO, BinaryIO]:
    """Take over stdin/stdout for the protocol.

    Prints from reward functions go to stderr and reads from stdin see an
    empty file, so user code cannot corrupt the message stream.
    """
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return requests, replies


def _score(functions: dict, request: list) -> tuple[str, Any]:
    """Run the request's functions: ``("ok", parts)`` or ``("error", text)``."""
    kind, _, first, answer, prompt, metadata, info = request
    group = kind == "group"
    if isinstance(prompt, list):  # chat messages travel as a JSON array; functions get them as before
        prompt = tuple(prompt)
    context = {"prompt": prompt, "metadata": metadata, "info": info}
    parts: list[dict[str, float]] = [{} for _ in first] if group else [{}]
    for name, (fn, batched, wants) in functions.items():
        if batched != group:
            continue
        try:
            value = fn(first, answer, **{k: context[k] for k in wants})
            values = [float(v) for v in value] if group else [float(value)]
            if len(values) != len(parts):
                raise ValueError(f"returned {len(values)} rewards for a group of {len(parts)}")
        except Exception as e:  # reported to the parent; the child keeps serving
            return "error", f"{name}: {type(e).__name__}: {e}"
        for p, v in zip(parts, values):
            p[name] = v
    return "ok", parts if group else parts[0]


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    """The handshake, then one reply per request until ``requests`` closes."""
    from actors.rewards import context_kwargs, is_batched, resolve  # here, so framing helpers stay light

    try:
        functions = {}
        for name, settings in read_message(requests):
            fn = resolve(name, settings)
            functions[name] = (fn, is_batched(fn), context_kwargs(fn))
    except Exception as e:
        write_message(replies, ["error", f"{type(e).__name__}: {e}"])
        return
    write_message(replies, ["ready", None])
    while True:
        try:
            request = read_message(requests)
        except EOFError:
            return
        write_message(replies, [*_score(functions, request), request[1]])


def main() -> None:
    """Entry point of ``python -m actors.reward_server``."""
    requests, replies = _private_pipes()
    try:
        serve(requests, replies)
    except (KeyboardInterrupt, BrokenPipeError):
        sys.exit(1)


if __name__ == "__main__":
    main()
