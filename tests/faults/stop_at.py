"""Run a real command with a breakpoint: the process stops itself when it reaches a step.

``python -m tests.faults.stop_at MODULE:QUALNAME[@HIT] -- MODULE ARGS...`` wraps the
function ``QUALNAME`` of ``MODULE`` (a method is ``Class.method``) so that its ``HIT``-th
call (default 1) first sends the process SIGSTOP -- before the function runs -- and then
runs ``python -m MODULE ARGS...`` in this interpreter. Nothing else changes: it is a
debugger's breakpoint, so a test can SIGKILL a real agent at an exact step of an update
(a step that takes a millisecond cannot be hit by watching from outside), then restart it
as it is. The wrapped call never returns: SIGKILL ends the stopped process.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import runpy
import signal
import sys
import threading
import time
from typing import Any

STOPPED_LINE = "stop_at: stopped at"


def install(spec: str) -> None:
    """Put the breakpoint ``MODULE:QUALNAME[@HIT]`` in place."""
    target, _, hit_text = spec.partition("@")
    hit = int(hit_text or 1)
    module_name, _, qualname = target.partition(":")
    if not module_name or not qualname or hit < 1:
        raise SystemExit(f"stop_at: {spec!r} is not MODULE:QUALNAME[@HIT]")
    owner: Any = importlib.import_module(module_name)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = itertools.count(1)

    @functools.wraps(original)
    def stop_here(*args: Any, **kwargs: Any) -> Any:
        if next(calls) == hit:
            sys.stderr.write(f"{STOPPED_LINE} {target} (call {hit}) at {time.time():.3f}\n")
            sys.stderr.flush()
            # At this thread: kill(getpid()) would let the kernel wake another thread to
            # start the group stop, and this one could run on for a few milliseconds.
            signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
        return original(*args, **kwargs)

    setattr(owner, name, stop_here)


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit(__doc__)
    install(argv[0])
    module, *args = argv[2:]
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
