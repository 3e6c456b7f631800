"""The `python` tool of multi-turn environments: model-written code, run in the sandbox."""

from __future__ import annotations

from actors import sandbox

# the jailed program: runs stdin's code; its prints and any error go to the report fd (argv[1])
_SNIPPET = """import contextlib, io, sys, traceback
out = io.StringIO()
try:
    with contextlib.redirect_stdout(out):
        exec(compile(sys.stdin.read(), "<tool>", "exec"), {"__name__": "__main__"})
except BaseException as err:
    out.write("".join(traceback.format_exception_only(type(err), err)))
with open(int(sys.argv[1]), "w") as report:
    report.write(out.getvalue()[:4000])
"""


def python(code: str) -> str:
    """Run a Python snippet in a sandbox and return what it prints.

    Args:
        code: a short Python program; print the values you need
    """
    done = sandbox.run(_SNIPPET, code.encode(), sandbox.Limits(wall_s=5.0, cpu_s=5))  # jailed, or raises
    return done.report + ("\n(timed out)" if done.timed_out else "")
