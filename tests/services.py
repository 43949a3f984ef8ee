"""Real services for the infra tests: processes started in their own session, so that stopping
one stops exactly its process group (a Prefect server's uvicorn, a Ray head's daemons) and
nothing that other tests or people run on the machine."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.5) -> Any:
    """Poll ``check`` until it returns something truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Service:
    """A command run in a new session, its output in ``log``; :meth:`stop` ends its group."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path, cwd: Path | None = None):
        self.command = command
        self.log = log
        self._log_file = log.open("wb")
        self.process = subprocess.Popen(
            command,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.group = self.process.pid  # the session leader's pid is the group id

    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self, tail: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-tail:]

    def check_alive(self) -> None:
        assert self.alive(), f"{self.command[:3]} exited:\n{self.output()}"

    def stop(self, grace: float = 30.0, first: int = signal.SIGTERM) -> None:
        """Signal the leader and give it ``grace`` seconds to shut its children down; then
        terminate, and finally kill, whatever is left of the group. Returns once it is gone."""
        if self.alive():
            self.process.send_signal(first)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace)
        for signal_number, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            if not group_alive(self.group):
                break
            os.killpg(self.group, signal_number)
            deadline = time.monotonic() + wait
            while group_alive(self.group) and time.monotonic() < deadline:
                time.sleep(0.1)
        self.process.wait()
        self._log_file.close()


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
