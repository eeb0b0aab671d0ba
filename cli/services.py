"""The four services as local background processes, for `make dev` and the end-to-end tests."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Final
from urllib.error import URLError
from urllib.request import urlopen

from cli.procs import ManagedProcess, ProcessError, wait_until
from cli.progress import Step, quiet
from cli.stack import IMAPS_PORT_OFFSET, Dovecot, StackError
from libs.config import REPO_ROOT, StackSettings

__all__ = ["SERVICE_PORTS", "LocalService", "LocalServices", "dev_env", "local_imap_env"]

SERVICE_PORTS: Final = {"ingest": 8081, "transform": 8082, "persist": 8083, "gateway": 8080}


def dev_env(settings: StackSettings | None = None) -> dict[str, str]:
    """What `flightlog services up` / `flightlog dev` set for a local development stack: webhooks
    may go to receivers on this machine (the bench's own receiver on 127.0.0.1 among them), and
    IMAP accounts may use the local Dovecot (:func:`local_imap_env`)."""
    return {"FLIGHTLOG_WEBHOOKS_ALLOW_PRIVATE_TARGETS": "true", **local_imap_env(settings)}


def local_imap_env(settings: StackSettings | None = None) -> dict[str, str]:
    """IMAP accounts on the local stack's Dovecot servers: loopback hosts, their ports (plain and
    implicit TLS) besides IMAP's own, and trust in their self-signed certificate."""
    s = settings or StackSettings()
    dovecots = (Dovecot(s), Dovecot(s, name="dovecot-plain", port=s.imap_port + 1))
    ports = {143, 993, *(d.port for d in dovecots), *(d.port + IMAPS_PORT_OFFSET for d in dovecots)}
    return {
        "FLIGHTLOG_IMAP_TLS_CA_FILE": str(dovecots[0].tls_cert),
        "FLIGHTLOG_IMAP_ALLOW_PRIVATE_HOSTS": "true",
        "FLIGHTLOG_IMAP_ALLOWED_PORTS": json.dumps(sorted(ports)),
    }


def _ready(url: str) -> bool:
    try:
        with urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (URLError, OSError):
        return False


class LocalService:
    def __init__(
        self, name: str, port: int, state_dir: Path, env: Mapping[str, str] | None = None, instance: str = ""
    ) -> None:
        self.name = name
        self.port = port
        # A local process is development: it may use the repository's built-in secrets.
        self.env = {"FLIGHTLOG_ENVIRONMENT": "development", "FLIGHTLOG_HTTP_PORT": str(port), **(env or {})}
        label = f"{name}{instance}"
        self.proc = ManagedProcess(
            label,
            state_dir / "services" / f"{label}.pid",
            state_dir / "logs" / f"{label}.log",
            f"services.{name}",
        )

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        return _ready(f"{self.address}/readyz")

    def start(self, *, wait_s: float = 60) -> None:
        self.proc.start([sys.executable, "-m", f"services.{self.name}"], env=self.env, cwd=REPO_ROOT)
        if wait_s:
            self.wait_ready(wait_s)

    def wait_ready(self, wait_s: float = 60) -> None:
        def check() -> bool:
            if not self.proc.running():
                raise StackError(f"{self.name} exited during start-up:\n{self.proc.log_tail(30)}")
            return self.ready()

        try:
            wait_until(check, wait_s, f"{self.name} to be ready on {self.address}")
        except ProcessError as exc:
            raise StackError(f"{exc}\n{self.proc.log_tail(30)}") from None


class LocalServices:
    def __init__(self, settings: StackSettings | None = None, env: Mapping[str, str] | None = None) -> None:
        state_dir = (settings or StackSettings()).state_dir
        self.services = {n: LocalService(n, p, state_dir, env) for n, p in SERVICE_PORTS.items()}

    def up(self, step: Step = quiet) -> None:
        # all four start at once; then each is awaited in turn, and shown as it becomes ready
        for svc in self.services.values():
            svc.start(wait_s=0)
        for svc in self.services.values():
            with step(f"{svc.name} ready on {svc.address}"):
                svc.wait_ready()

    def down(self) -> list[str]:
        return [name for name, svc in reversed(self.services.items()) if svc.proc.stop(timeout_s=40)]

    def status(self) -> list[tuple[str, str, str]]:
        rows = []
        for name, svc in self.services.items():
            state = ("ready" if svc.ready() else "running, not ready") if svc.proc.running() else "down"
            rows.append((name, svc.address, state))
        return rows
