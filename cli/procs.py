"""Background processes with pid files: start detached, check, stop exactly what was started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = ["ManagedProcess", "ProcessError", "port_answers", "wait_until"]


class ProcessError(RuntimeError):
    pass


def port_answers(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval_s)
    raise ProcessError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class ManagedProcess:
    """One detached process, known by its pid file.

    ``marker`` is a string its command line must contain, so a recycled pid is never taken for
    ours (and never signalled).
    """

    def __init__(self, name: str, pid_file: Path, log_file: Path, marker: str) -> None:
        self.name = name
        self.pid_file = pid_file
        self.log_file = log_file
        self.marker = marker
        self._popen: subprocess.Popen[bytes] | None = None

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if self._popen is not None and self._popen.pid == pid:
            # Started by this process: poll() is exact, and reaps it when it has exited.
            return pid if self._popen.poll() is None else None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return None
        if self.marker not in cmdline:
            return None
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return None  # a zombie is dead; its parent just has not reaped it yet
        except OSError:
            return None
        return pid

    def running(self) -> bool:
        return self.pid() is not None

    def start(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> int:
        if (pid := self.pid()) is not None:
            return pid
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # not killed with the shell that ran `flightlog stack up`
            )
        self._popen = proc
        self.pid_file.write_text(f"{proc.pid}\n")
        return proc.pid

    def detach(self) -> None:
        """Let a started server outlive this Python process's interest in it.

        Until it answers, the Popen object tells exactly whether it is alive; after that a
        server (Kafka, MariaDB) is meant to outlive us, so we stop tracking it as our child.
        """
        if self._popen is not None:
            self._popen.returncode = 0  # tells Popen.__del__ it need not warn or reap
            self._popen = None

    def adopt(self, pid: int) -> None:
        """Record a pid for a process that daemonized itself."""
        self.pid_file.write_text(f"{pid}\n")

    def signal(self, signum: int) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signum)
        return True

    def stop(self, timeout_s: float = 30.0) -> bool:
        """SIGTERM, wait, then SIGKILL. Returns whether a process was stopped."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        try:
            wait_until(lambda: self.pid() is None, timeout_s, f"{self.name} to stop")
        except ProcessError:
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: self.pid() is None, 10, f"{self.name} to die")
        self.pid_file.unlink(missing_ok=True)
        return True

    def kill(self) -> bool:
        """SIGKILL at once, as a crash would."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: self.pid() is None, 10, f"{self.name} to die")
        self.pid_file.unlink(missing_ok=True)
        return True

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""
