"""Fault injection shared by the reliability tests: signal a CLI run once it has made progress."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def signal_when(
    args: Sequence[str], env: dict[str, str], out: Path, marker_glob: str, sig: signal.Signals, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """Run ``args``; as soon as a file matching ``out/marker_glob`` exists (or the run ends, or
    ``timeout`` passes) send ``sig``: SIGINT to the driver as a terminal's Ctrl-C would, SIGKILL to
    its whole process group. Returns the ended run (its exit code, stdout and stderr)."""
    proc = subprocess.Popen(
        list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
        # a shell without job control starts children with SIGINT ignored; a user's terminal does not
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler),
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not list(out.glob(marker_glob)):
        time.sleep(0.02)
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


class Stopped(Exception):
    """Raised by :func:`stop_search_after` in place of a crash."""


def stop_search_after(job: Any, parts: int) -> None:
    """Run ``raylead.search.run_search(job)`` and stop it (as a crash would) right after its
    ``parts``-th result part and marker are written: the state a killed search leaves."""
    from raylead.search import run_search

    def on_part(done: int, total: int) -> None:
        if done == parts:
            raise Stopped(f"stopped after {done} of {total} parts")

    try:
        run_search(job, on_part=on_part)
    except Stopped:
        return
    raise AssertionError(f"the search finished before its part {parts}")
