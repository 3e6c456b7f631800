"""Child process that runs reward functions for :class:`actors.scoring.Scorer`.

Started as ``python -m actors.reward_server``.  It talks over stdin/stdout in
length-prefixed pickles (an 8-byte big-endian length, then the pickle):

1. The parent sends the list of ``(name, settings)`` of the reward functions
   (settings: None, or a factory's keyword arguments).  The child resolves
   them itself (so functions never need to be picklable) and answers
   ``("ready", None)`` or ``("error", message)``.
2. Then requests, each answered by ``("ok", result)`` or ``("error", message)``
   when a function raised (the child keeps serving after an error):
   - ``("sample", completion, answer, prompt, metadata)``: every per-sample
     function on one completion; result ``{name: value}``;
   - ``("group", completions, answer, prompt, metadata)``: every batched
     function on a whole group; result ``[{name: value}, ...]``, one per completion.
   ``prompt`` and ``metadata`` reach only functions that ask for them.

Functions run in the child's main thread, one sample at a time.  The child
has no deadline of its own: the parent kills it when a reply is late.  It
exits when its stdin closes.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
from typing import Any, BinaryIO

HEADER = struct.Struct("!Q")


def pack(message: Any) -> bytes:
    """A message framed for the pipe: length header plus pickle."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(payload)) + payload


def read_message(stream: BinaryIO) -> Any:
    """The next message from a blocking stream; raises EOFError at end of stream."""
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        raise EOFError("stream closed")
    (size,) = HEADER.unpack(header)
    payload = stream.read(size)
    if len(payload) < size:
        raise EOFError("stream closed mid-message")
    return pickle.loads(payload)


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


def _score(functions: dict, request: tuple) -> tuple[str, Any]:
    """Run the request's functions: ``("ok", parts)`` or ``("error", text)``."""
    kind, first, answer, prompt, metadata = request
    group = kind == "group"
    context = {"prompt": prompt, "metadata": metadata}
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
        write_message(replies, ("error", f"{type(e).__name__}: {e}"))
        return
    write_message(replies, ("ready", None))
    while True:
        try:
            request = read_message(requests)
        except EOFError:
            return
        write_message(replies, _score(functions, request))


def main() -> None:
    """Entry point of ``python -m actors.reward_server``."""
    requests, replies = _private_pipes()
    try:
        serve(requests, replies)
    except (KeyboardInterrupt, BrokenPipeError):
        sys.exit(1)


if __name__ == "__main__":
    main()
