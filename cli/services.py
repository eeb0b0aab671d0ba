"""The services as local background processes, for `make dev` and the end-to-end tests."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Final
from urllib.error import URLError
from urllib.request import urlopen

from cli.procs import ManagedProcess, ProcessError, wait_until
from cli.progress import Step, quiet
from cli.stack import OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, Dovecot, Stack, StackError
from libs.config import REPO_ROOT, StackSettings
from libs.service import MANAGEMENT_PORT_OFFSET, MULTIPROCESS_DIR

__all__ = [
    "SERVICE_PORTS",
    "LocalService",
    "LocalServices",
    "dev_env",
    "local_imap_env",
    "local_smtp_env",
    "management_address",
]

SERVICE_PORTS: Final = {"ingest": 8081, "transform": 8082, "persist": 8083, "gateway": 8080, "sender": 8085}


def dev_env(settings: StackSettings | None = None) -> dict[str, str]:
    """What `flightlog services up` / `flightlog dev` set for a local development stack: webhooks
    may go to receivers on this machine (the bench's own receiver on 127.0.0.1 among them), and
    IMAP accounts may use the local Dovecot (:func:`local_imap_env`) and send through the local
    Postfix (:func:`local_smtp_env`)."""
    return {
        "FLIGHTLOG_WEBHOOKS_ALLOW_PRIVATE_TARGETS": "true",
        **local_imap_env(settings),
        **local_smtp_env(settings),
    }


def local_smtp_env(settings: StackSettings | None = None) -> dict[str, str]:
    """Sending through the local stack's Postfix: its loopback host and ports, and trust in its
    certificate (Dovecot's)."""
    s = settings or StackSettings()
    return {
        "FLIGHTLOG_SMTP_TLS_CA_FILE": str(Dovecot(s).tls_cert),
        "FLIGHTLOG_SMTP_ALLOW_PRIVATE_HOSTS": "true",
        "FLIGHTLOG_SMTP_ALLOWED_PORTS": json.dumps(sorted({465, 587, s.submission_port, s.smtps_port})),
    }


def local_imap_env(settings: StackSettings | None = None) -> dict[str, str]:
    """IMAP accounts on the local stack's Dovecot servers: loopback hosts, their ports (plain and
    implicit TLS) besides IMAP's own, and trust in their self-signed certificate; and OAuth2
    accounts of the ``generic`` provider, which is the stack's token server (trusted the same
    way), for the OAuth2 Dovecot."""
    s = settings or StackSettings()
    stack = Stack(s)
    dovecots = (stack.dovecot, stack.dovecot_plain, stack.dovecot_oauth)
    ports = {143, 993, *(d.port for d in dovecots), *(d.imaps_port for d in dovecots if d.imaps_port)}
    token_server = stack.oauth_server
    return {
        "FLIGHTLOG_IMAP_TLS_CA_FILE": str(stack.dovecot.tls_cert),
        "FLIGHTLOG_IMAP_ALLOW_PRIVATE_HOSTS": "true",
        "FLIGHTLOG_IMAP_ALLOWED_PORTS": json.dumps(sorted(ports)),
        "FLIGHTLOG_OAUTH_GENERIC_AUTHORIZATION_URL": f"{token_server.url}/authorize",
        "FLIGHTLOG_OAUTH_GENERIC_TOKEN_URL": f"{token_server.url}/token",
        "FLIGHTLOG_OAUTH_GENERIC_CLIENT_ID": OAUTH_CLIENT_ID,
        "FLIGHTLOG_OAUTH_GENERIC_CLIENT_SECRET": OAUTH_CLIENT_SECRET,
        "FLIGHTLOG_OAUTH_TLS_CA_FILE": str(token_server.tls_cert),
    }


def management_address(address: str) -> str:
    """The management port's address of a local service at ``address`` (``http://host:port``)
    with the default management port."""
    base, port = address.rsplit(":", 1)
    return f"{base}:{int(port) + MANAGEMENT_PORT_OFFSET}"


def _ready(url: str) -> bool:
    try:
        with urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (URLError, OSError):
        return False


class LocalService:
    """One service as local processes: one, or ``processes`` sharing the port (SO_REUSEPORT, see
    ``FLIGHTLOG_HTTP_REUSE_PORT``), each with its pid file and log (``gateway``, ``gateway.2``,
    ...). Several processes keep their metrics in one prometheus_client multiprocess directory
    under the state folder, emptied at start, so a scrape that reaches any of them sees them all.
    """

    def __init__(
        self,
        name: str,
        port: int,
        state_dir: Path,
        env: Mapping[str, str] | None = None,
        instance: str = "",
        processes: int = 1,
    ) -> None:
        self.name = name
        self.port = port
        # A local process is development: it may use the repository's built-in secrets.
        self.env = {"FLIGHTLOG_ENVIRONMENT": "development", "FLIGHTLOG_HTTP_PORT": str(port), **(env or {})}
        label = f"{name}{instance}"
        self.metrics_dir: Path | None = None
        if processes > 1:
            self.metrics_dir = state_dir / "metrics" / label
            self.env |= {"FLIGHTLOG_HTTP_REUSE_PORT": "true", MULTIPROCESS_DIR: str(self.metrics_dir)}
        self.procs = [
            ManagedProcess(
                label if n == 1 else f"{label}.{n}",
                state_dir / "services" / f"{label if n == 1 else f'{label}.{n}'}.pid",
                state_dir / "logs" / f"{label if n == 1 else f'{label}.{n}'}.log",
                f"services.{name}",
            )
            for n in range(1, processes + 1)
        ]
        self.proc = self.procs[0]

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def management_address(self) -> str:
        """/metrics, and the gateway's docs and admin routes (the service's default management port)."""
        return management_address(self.address)

    def ready(self) -> bool:
        return _ready(f"{self.address}/readyz")

    def running(self) -> bool:
        return all(p.running() for p in self.procs)

    def start(self, *, wait_s: float = 60) -> None:
        if self.metrics_dir is not None and not any(p.running() for p in self.procs):
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.metrics_dir.mkdir(parents=True)
        for proc in self.procs:
            proc.start([sys.executable, "-m", f"services.{self.name}"], env=self.env, cwd=REPO_ROOT)
        if wait_s:
            self.wait_ready(wait_s)

    def stop(self, *, timeout_s: float = 40) -> bool:
        """Stop every process (SIGTERM, then wait); whether any was running."""
        return any([p.stop(timeout_s=timeout_s) for p in reversed(self.procs)])

    def wait_ready(self, wait_s: float = 60) -> None:
        def check() -> bool:
            for proc in self.procs:
                if not proc.running():
                    raise StackError(f"{self.name} exited during start-up:\n{proc.log_tail(30)}")
            if len(self.procs) == 1:
                return self.ready()
            # each new connection goes to one of the processes: ask until every one said ready
            pids = {p.pid() for p in self.procs}
            for _ in range(4 * len(self.procs)):
                ready_pids.add(_ready_pid(f"{self.address}/readyz"))
            return pids <= ready_pids

        ready_pids: set[int | None] = set()
        try:
            wait_until(check, wait_s, f"{self.name} to be ready on {self.address}")
        except ProcessError as exc:
            raise StackError(f"{exc}\n{self.proc.log_tail(30)}") from None


def _ready_pid(url: str) -> int | None:
    """The pid of the process that answered ready, None if none did."""
    try:
        with urlopen(url, timeout=1) as resp:
            pid = json.loads(resp.read()).get("pid")
            return pid if resp.status == 200 and isinstance(pid, int) else None
    except (URLError, OSError, ValueError):
        return None


class LocalServices:
    def __init__(self, settings: StackSettings | None = None, env: Mapping[str, str] | None = None) -> None:
        settings = settings or StackSettings()
        self.services = {
            n: LocalService(
                n, p, settings.state_dir, env, processes=settings.gateway_processes if n == "gateway" else 1
            )
            for n, p in SERVICE_PORTS.items()
        }

    def up(self, step: Step = quiet) -> None:
        # all four start at once; then each is awaited in turn, and shown as it becomes ready
        for svc in self.services.values():
            svc.start(wait_s=0)
        for svc in self.services.values():
            with step(f"{svc.name} ready on {svc.address}"):
                svc.wait_ready()

    def down(self) -> list[str]:
        return [name for name, svc in reversed(self.services.items()) if svc.stop(timeout_s=40)]

    def status(self) -> list[tuple[str, str, str]]:
        rows = []
        for name, svc in self.services.items():
            state = ("ready" if svc.ready() else "running, not ready") if svc.running() else "down"
            rows.append((name, svc.address, state))
        return rows
