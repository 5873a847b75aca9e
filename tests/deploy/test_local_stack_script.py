"""docker/local_stack.py as a user runs it: a stop signal during start-up ends it at once, leaving no process.

Needs the nginx and prometheus programs and skips without them. Each case takes a few
seconds: the replicas are stopped while they still load.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "docker" / "local_stack.py"


def _read_until(process: subprocess.Popen, pattern: str, timeout: float = 60.0) -> list[str]:
    """Return the stderr lines of ``process`` up to the first that matches ``pattern``."""
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return lines
    raise AssertionError(f"no line matched {pattern!r}; stderr so far:\n{''.join(lines)}")


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT], ids=["SIGHUP", "SIGINT"])
def test_signal_during_start_up_stops_everything(local_stack, stack_programs, serve_args, tmp_path, signum):
    command = [
        sys.executable, str(SCRIPT),
        "--port", str(local_stack.free_port()),
        "--prometheus-port", str(local_stack.free_port()),
        "--workdir", str(tmp_path),
        "--", *serve_args,
    ]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines = _read_until(process, r"started server-2 \(pid \d+\)")
        # At least one readiness poll, whose request httpx must not log.
        time.sleep(1.0)
        process.send_signal(signum)
        returncode = process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines += process.stderr.readlines()

    output = "".join(lines)
    assert returncode == 0, output
    assert "stopped during start-up" in output
    assert "HTTP Request" not in output
    pids = [int(pid) for pid in re.findall(r"started server-\d \(pid (\d+)\)", output)]
    assert len(pids) == 2
    assert not any(_is_running(pid) for pid in pids), output
