"""Cost of the code sandbox: seconds per `code_tests` sample, jailed vs the previous isolation.

Three ways to run the same sample (a HumanEval reference solution and its tests, the work of one
sample of a code step), interleaved round by round so that load on the machine hits all alike:
- `bwrap`: today's jail (actors/sandbox.py);
- `unshare`: the isolation before it — the same runner under `unshare --pid --fork --kill-child
  --net` with rlimits and no filesystem isolation (root only; skipped otherwise);
- `none`: the runner with no isolation at all (the floor: interpreter start-up and the tests).
Prints one JSON line per mode (median, p90, ms) and the ratios bwrap/unshare and bwrap/none.

    .venv/bin/python bench/sandbox.py            # --samples 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import sandbox  # noqa: E402
from actors.rewards.code import make_code_tests  # noqa: E402


def sample() -> tuple[str, dict]:
    """HumanEval/0's reference solution as a reply, and its row."""
    from tasks.files import FileTask

    problem = FileTask(["builtin:humaneval"], ["builtin:humaneval"], batch_size=1).test_set()[0]
    return f"```python\n{problem.answer}\n```", problem.metadata


def unshare_spawn(real):
    """`sandbox._spawn` as the previous code ran it: `unshare` namespaces for pid and net only."""
    def spawn(argv, stdin, limits, isolation, report_fd, cwd="/"):
        return real(["unshare", "--pid", "--fork", "--kill-child", "--net", *argv], stdin, limits, "none", report_fd, cwd)
    return spawn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=40)
    args = parser.parse_args()
    reply, row = sample()
    modes = {"bwrap": make_code_tests("bwrap"), "none": make_code_tests("none")}
    if os.geteuid() == 0:
        modes["unshare"] = make_code_tests("none")
    times: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(args.samples + 1):
        for mode, fn in modes.items():
            patch = mock.patch.object(sandbox, "_spawn", unshare_spawn(sandbox._spawn)) if mode == "unshare" \
                else mock.patch.object(sandbox, "_spawn", sandbox._spawn)
            with patch:
                start = time.perf_counter()
                assert fn(reply, row["answer"] if "answer" in row else "", row) == 1.0, mode
                if i:  # the first round warms caches
                    times[mode].append(time.perf_counter() - start)
    medians = {}
    for mode, ts in times.items():
        ts.sort()
        medians[mode] = statistics.median(ts)
        print(json.dumps({"bench": "sandbox", "mode": mode, "samples": len(ts), "median_ms": round(1e3 * medians[mode], 1),
                          "p90_ms": round(1e3 * ts[int(0.9 * (len(ts) - 1))], 1)}))
    ratios = {f"bwrap/{m}": round(medians["bwrap"] / medians[m], 2) for m in medians if m != "bwrap"}
    print(json.dumps({"bench": "sandbox", "ratios": ratios}))


if __name__ == "__main__":
    main()
