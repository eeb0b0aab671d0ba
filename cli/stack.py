"""The local stack: Kafka (KRaft), MariaDB clusters and Dovecot as plain processes.

No Docker engine is needed: Kafka runs from the official jars that Maven resolves from
``deploy/kafka/pom.xml``; MariaDB and Dovecot come from Debian packages, installed with apt-get
when missing. All state, logs and generated configs live under ``StackSettings.state_dir``
(``.state/`` by default, git-ignored). ``up`` is idempotent; ``down`` stops only the processes
whose pid files ``up`` wrote.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import imaplib
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from cli.procs import ManagedProcess, ProcessError, port_answers, wait_until
from cli.progress import Step, quiet
from libs.config import REPO_ROOT, StackSettings

__all__ = ["Dovecot", "Kafka", "MariaDB", "Part", "Stack", "StackError"]

HOST = "127.0.0.1"
# Dovecot 2.3's capabilities after login, less CONDSTORE and QRESYNC.
PLAIN_IMAP_CAPABILITY = (
    "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SORT=DISPLAY THREAD=REFERENCES THREAD=REFS"
    " THREAD=ORDEREDSUBJECT MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN NAMESPACE UIDPLUS"
    " LIST-EXTENDED I18NLEVEL=1 ESEARCH ESORT SEARCHRES WITHIN CONTEXT=SEARCH LIST-STATUS BINARY MOVE"
    " SNIPPET=FUZZY PREVIEW=FUZZY PREVIEW STATUS=SIZE SAVEDATE LITERAL+ NOTIFY SPECIAL-USE"
)
DB_USER = "flightlog"
DB_PASSWORD = "flightlog"
IMAP_TEST_PASSWORD = "flightlog"
IMAPS_PORT_OFFSET = 850  # Dovecot's implicit-TLS port: 1143 -> 1993


class StackError(RuntimeError):
    pass


def _run(argv: list[str], what: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise StackError(
            f"{what} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}"
        )
    return result  # type: ignore[no-any-return]


def ensure_debian_packages(binaries: dict[str, str], step: Step = quiet) -> None:
    """Install the Debian packages whose binaries are missing (``binary -> package``)."""
    missing = sorted({pkg for binary, pkg in binaries.items() if shutil.which(binary) is None})
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise StackError(
            f"missing Debian packages {missing}: install them (apt-get install {' '.join(missing)}) "
            "or run `flightlog stack up` as root so it can"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with step("apt-get update"):
        _run(["apt-get", "update", "-qq"], "apt-get update", env=env)
    with step(f"apt-get install {' '.join(missing)}"):
        _run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            "apt-get install",
            env=env,
        )


@dataclass(frozen=True, slots=True)
class Status:
    name: str
    address: str
    running: bool
    answers: bool


class Part:
    name: str
    proc: ManagedProcess

    def up(self, step: Step = quiet) -> None:
        raise NotImplementedError

    def down(self) -> bool:
        raise NotImplementedError

    def status(self) -> Status:
        raise NotImplementedError


class Kafka(Part):
    """A single KRaft node (broker and controller in one JVM)."""

    name = "kafka"

    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.dir = settings.state_dir / "kafka"
        self.proc = ManagedProcess("kafka", self.dir / "kafka.pid", self.dir / "kafka.out", str(self.dir))
        self.pom = REPO_ROOT / "deploy" / "kafka" / "pom.xml"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.settings.kafka_port}"

    def classpath(self, step: Step = quiet) -> str:
        """Resolve the broker's jars with Maven once per version of the pom."""
        cp_file = self.dir / "classpath.txt"
        stamp = self.dir / "classpath.pom-sha256"
        digest = hashlib.sha256(self.pom.read_bytes()).hexdigest()
        if not (cp_file.exists() and stamp.exists() and stamp.read_text() == digest):
            for tool in ("java", "mvn"):
                if shutil.which(tool) is None:
                    raise StackError(f"{tool} is not installed: Kafka needs Java 17 and Maven")
            self.dir.mkdir(parents=True, exist_ok=True)
            with step("resolving Kafka's jars with Maven (first run only)"):
                _run(
                    [
                        "mvn",
                        "-q",
                        "-B",
                        "-f",
                        str(self.pom),
                        "dependency:build-classpath",
                        f"-Dmdep.outputFile={cp_file}",
                    ],
                    "mvn dependency:build-classpath",
                )
            stamp.write_text(digest)
        return cp_file.read_text().strip()

    def _write_config(self) -> Path:
        s = self.settings
        data = self.dir / "data"
        props = self.dir / "server.properties"
        props.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.bootstrap.servers={HOST}:{s.kafka_controller_port}",
                    f"listeners=PLAINTEXT://{HOST}:{s.kafka_port},CONTROLLER://{HOST}:{s.kafka_controller_port}",
                    f"advertised.listeners=PLAINTEXT://{HOST}:{s.kafka_port}",
                    "controller.listener.names=CONTROLLER",
                    "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                    f"log.dirs={data}",
                    "num.partitions=6",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=6",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "transaction.state.log.num.partitions=6",
                    "group.initial.rebalance.delay.ms=0",
                    "auto.create.topics.enable=false",
                    "log.retention.check.interval.ms=60000",
                    "",
                ]
            )
        )
        (self.dir / "log4j2.properties").write_text(
            "\n".join(
                [
                    "status = warn",
                    "appender.file.type = RollingFile",
                    "appender.file.name = file",
                    f"appender.file.fileName = {self.dir}/server.log",
                    f"appender.file.filePattern = {self.dir}/server.log.%i",
                    "appender.file.layout.type = PatternLayout",
                    "appender.file.layout.pattern = [%d] %p %m (%c)%n",
                    "appender.file.policies.type = Policies",
                    "appender.file.policies.size.type = SizeBasedTriggeringPolicy",
                    "appender.file.policies.size.size = 20MB",
                    "appender.file.strategy.type = DefaultRolloverStrategy",
                    "appender.file.strategy.max = 3",
                    "rootLogger.level = INFO",
                    "rootLogger.appenderRef.file.ref = file",
                    "",
                ]
            )
        )
        return props

    def _java(self, main: str, *args: str, heap_mb: int = 256) -> list[str]:
        return [
            "java",
            f"-Xms{min(heap_mb, 256)}m",
            f"-Xmx{heap_mb}m",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
            "-cp",
            self.classpath(),
            main,
            *args,
        ]

    def up(self, step: Step = quiet) -> None:
        if self.proc.running():
            return
        if port_answers(HOST, self.settings.kafka_port):
            raise StackError(
                f"port {self.settings.kafka_port} is taken by a process this stack did not start"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        self.classpath(step)  # Maven's step first, so the steps below find the jars resolved
        props = self._write_config()
        if not (self.dir / "data" / "meta.properties").exists():
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            with step("kafka: formatting its storage"):
                _run(
                    self._java(
                        "kafka.tools.StorageTool",
                        "format",
                        "-t",
                        cluster_id,
                        "-c",
                        str(props),
                        "--standalone",
                    ),
                    "kafka storage format",
                )
        with step(f"starting kafka on {self.address}"):
            self.proc.start(self._java("kafka.Kafka", str(props), heap_mb=self.settings.kafka_heap_mb))
            try:
                wait_until(self._answers, 90, f"Kafka on {self.address}")
            except ProcessError as exc:
                raise StackError(f"{exc}\n{self.proc.log_tail()}") from None
        self.proc.detach()

    def _answers(self) -> bool:
        if not self.proc.running():
            raise StackError(f"Kafka exited during start-up:\n{self.proc.log_tail()}")
        return port_answers(HOST, self.settings.kafka_port)

    def down(self) -> bool:
        return self.proc.stop(timeout_s=60)

    def status(self) -> Status:
        return Status(
            self.name, self.address, self.proc.running(), port_answers(HOST, self.settings.kafka_port)
        )


class MariaDB(Part):
    """One MariaDB server process: one "physical cluster" of the shard map."""

    def __init__(self, settings: StackSettings, index: int) -> None:
        self.settings = settings
        self.index = index
        self.port = settings.mariadb_ports[index]
        self.name = f"mariadb-c{index + 1}"
        self.cluster_name = f"c{index + 1}"
        self.dir = settings.state_dir / "mariadb" / self.cluster_name
        self.socket = self.dir / "mysqld.sock"
        self.proc = ManagedProcess(self.name, self.dir / "mysqld.pid", self.dir / "mysqld.out", str(self.dir))

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def _client(self, sql: str) -> str:
        return _run(
            ["mariadb", "--no-defaults", f"--socket={self.socket}", "-uroot", "-N", "-B", "-e", sql],
            f"{self.name}: {sql[:60]}",
        ).stdout

    def _ping(self) -> bool:
        if not self.proc.running():
            raise StackError(
                f"{self.name} exited during start-up:\n{self.proc.log_tail()}\n{self._error_log_tail()}"
            )
        result = subprocess.run(
            ["mariadb-admin", "--no-defaults", f"--socket={self.socket}", "-uroot", "ping"],
            capture_output=True,
            check=False,
        )
        return result.returncode == 0

    def _error_log_tail(self) -> str:
        try:
            return "\n".join((self.dir / "error.log").read_text(errors="replace").splitlines()[-15:])
        except FileNotFoundError:
            return ""

    def up(self, step: Step = quiet) -> None:
        ensure_debian_packages(
            {
                "mariadbd": "mariadb-server",
                "mariadb-install-db": "mariadb-server",
                "mariadb": "mariadb-client",
                "mariadb-admin": "mariadb-client",
            },
            step,
        )
        if not self.proc.running():
            self._start(step)
        self._grant()

    def _start(self, step: Step) -> None:
        if port_answers(HOST, self.port):
            raise StackError(f"port {self.port} is taken by a process this stack did not start")
        data = self.dir / "data"
        if not (data / "mysql").is_dir():
            data.mkdir(parents=True, exist_ok=True)
            with step(f"{self.name}: creating its data directory"):
                self._install_db(data)
        with step(f"starting {self.name} on {self.address}"):
            self._run_server(data)

    def _install_db(self, data: Path) -> None:
        _run(
            [
                "mariadb-install-db",
                "--no-defaults",
                f"--datadir={data}",
                "--user=root",
                "--auth-root-authentication-method=socket",
                "--skip-test-db",
            ],
            f"{self.name}: mariadb-install-db",
        )

    def _run_server(self, data: Path) -> None:
        self.proc.start(
            [
                "mariadbd",
                "--no-defaults",
                f"--datadir={data}",
                "--user=root",
                f"--port={self.port}",
                f"--bind-address={HOST}",
                f"--socket={self.socket}",
                f"--pid-file={self.dir / 'mariadbd.pid'}",
                f"--log-error={self.dir / 'error.log'}",
                "--skip-name-resolve",
                "--character-set-server=utf8mb4",
                "--collation-server=utf8mb4_bin",
                f"--innodb-buffer-pool-size={self.settings.mariadb_buffer_pool_mb}M",
                "--innodb-log-file-size=256M",
                "--max-connections=1000",
                "--max-allowed-packet=64M",
                "--innodb-autoinc-lock-mode=2",
                "--transaction-isolation=READ-COMMITTED",
            ]
        )
        wait_until(self._ping, 60, f"{self.name} on {self.address}")
        self.proc.detach()

    def _grant(self) -> None:
        # The services log in over TCP with a password; root stays socket-only.
        self._client(
            f"CREATE USER IF NOT EXISTS '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{DB_PASSWORD}';"
            f"CREATE USER IF NOT EXISTS '{DB_USER}'@'localhost' IDENTIFIED BY '{DB_PASSWORD}';"
            f"GRANT ALL PRIVILEGES ON *.* TO '{DB_USER}'@'127.0.0.1' WITH GRANT OPTION;"
            f"GRANT ALL PRIVILEGES ON *.* TO '{DB_USER}'@'localhost' WITH GRANT OPTION;"
        )

    def down(self) -> bool:
        return self.proc.stop(timeout_s=60)

    def kill(self) -> bool:
        return self.proc.kill()

    def status(self) -> Status:
        return Status(self.name, self.address, self.proc.running(), port_answers(HOST, self.port))


def write_self_signed_cert(cert: Path, key: Path, host: str, days: int = 3650) -> None:
    """A self-signed certificate for ``host`` (an IP address), for the local Dovecot's TLS; the
    IMAP sync trusts it through ``FLIGHTLOG_IMAP_TLS_CA_FILE``."""
    import ipaddress
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    cert.parent.mkdir(parents=True, exist_ok=True)
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key.chmod(0o600)
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


class Dovecot(Part):
    """Dovecot IMAP on loopback with a passwd-file of test users (maildirs in the state folder)."""

    name = "dovecot"

    def __init__(
        self,
        settings: StackSettings,
        *,
        name: str = "dovecot",
        port: int | None = None,
        capability: str | None = None,
    ) -> None:
        """:param capability: an ``imap_capability`` replacing Dovecot's own list (the second,
        CONDSTORE/QRESYNC-less instance); None keeps Dovecot's."""
        self.settings = settings
        self.name = name
        self.port = settings.imap_port if port is None else port
        self.capability = capability
        # The server with Dovecot's own capabilities also speaks TLS: STARTTLS on ``port`` and
        # implicit TLS on ``imaps_port``, with a self-signed certificate for 127.0.0.1.
        self.tls = capability is None
        self.imaps_port = self.port + IMAPS_PORT_OFFSET if self.tls else None
        self.dir = settings.state_dir / name
        self.conf = self.dir / "dovecot.conf"
        self.users = self.dir / "users"
        self.tls_cert = self.dir / "tls" / "cert.pem"
        self.tls_key = self.dir / "tls" / "key.pem"
        self.proc = ManagedProcess(
            "dovecot", self.dir / "run" / "master.pid", self.dir / "dovecot.out", "dovecot"
        )

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def add_user(self, username: str, password: str = IMAP_TEST_PASSWORD, *, wait: bool = True) -> None:
        """Add or replace a user in the passwd-file (see :meth:`add_users`)."""
        self.add_users([username], password, wait=wait)

    def add_users(
        self, usernames: list[str], password: str = IMAP_TEST_PASSWORD, *, wait: bool = True
    ) -> None:
        """Add or replace users in the passwd-file.

        The file is rewritten under an exclusive lock and swapped in atomically, so concurrent
        callers (test workers, the bench) neither lose each other's users nor let Dovecot read a
        half-written file. Dovecot stats the file at most once a second, so with ``wait`` (and a
        running server) this returns only once the last user's credentials log in.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        names = set(usernames)
        with open(self.dir / "users.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            lines = self.users.read_text().splitlines() if self.users.exists() else []
            lines = [line for line in lines if line.split(":", 1)[0] not in names]
            lines += [f"{name}:{{PLAIN}}{password}::::::" for name in usernames]
            tmp = self.users.with_suffix(".tmp")
            tmp.write_text("\n".join(lines) + "\n")
            tmp.replace(self.users)
        if wait and usernames and self.proc.running():
            last = usernames[-1]
            wait_until(lambda: self._logs_in(last, password), 10, f"Dovecot to accept {last}")

    def _logs_in(self, username: str, password: str) -> bool:
        try:
            with imaplib.IMAP4(HOST, self.port, timeout=5) as imap:
                imap.login(username, password)
                imap.logout()
        except imaplib.IMAP4.error:
            return False
        return True

    def _write_config(self) -> None:
        d = self.dir
        for sub in ("run", "state", "mail"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(d / "mail", "mail", "mail")
        if not self.users.exists():
            for i in range(1, 4):
                self.add_user(f"user{i}@flightlog.test", wait=False)
        if self.tls and not self.tls_cert.exists():
            write_self_signed_cert(self.tls_cert, self.tls_key, HOST)
        tls = (
            f"ssl = yes\nssl_cert = <{self.tls_cert}\nssl_key = <{self.tls_key}\n"
            if self.tls
            else "ssl = no\n"
        )
        self.conf.write_text(
            f"""# Generated by `flightlog stack up`; edits are overwritten.
protocols = imap
listen = {HOST}
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
{tls}disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:{d}/mail/%d/%n/Maildir
mail_uid = mail
mail_gid = mail
first_valid_uid = 8
mail_max_userip_connections = 2000
default_process_limit = 2000
default_client_limit = 4000
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.users}
}}
userdb {{
  driver = static
  args = uid=mail gid=mail home={d}/mail/%d/%n
}}
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Drafts {{
    special_use = \\Drafts
    auto = subscribe
  }}
  mailbox Sent {{
    special_use = \\Sent
    auto = subscribe
  }}
  mailbox Trash {{
    special_use = \\Trash
    auto = subscribe
  }}
  mailbox Junk {{
    special_use = \\Junk
    auto = subscribe
  }}
  mailbox Archive {{
    special_use = \\Archive
    auto = create
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = {HOST}
    port = {self.port}
  }}
  inet_listener imaps {{
    address = {HOST}
    port = {self.imaps_port or 0}
  }}
  service_count = 0
  process_min_avail = 1
}}
service imap {{
  process_limit = 2000
}}
protocol imap {{
  imap_idle_notify_interval = 2 mins
}}
"""
            + (f"imap_capability = {self.capability}\n" if self.capability else "")
        )

    def up(self, step: Step = quiet) -> None:
        ensure_debian_packages({"dovecot": "dovecot-imapd", "doveadm": "dovecot-core"}, step)
        if self.proc.running():
            return
        if port_answers(HOST, self.port):
            raise StackError(f"port {self.port} is taken by a process this stack did not start")
        with step(f"starting {self.name} on {self.address}"):
            self._write_config()  # a first run writes a TLS certificate
            # dovecot daemonizes itself and writes run/master.pid, which is our pid file. Its output
            # goes to a file: a daemon holding our pipes open would block us forever.
            with open(self.proc.log_file, "ab") as log:
                result = subprocess.run(
                    ["dovecot", "-c", str(self.conf)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    check=False,
                )
            if result.returncode != 0:
                raise StackError(f"dovecot failed to start:\n{self.proc.log_tail()}")
            wait_until(lambda: port_answers(HOST, self.port), 30, f"Dovecot on {self.address}")

    def down(self) -> bool:
        return self.proc.stop(timeout_s=30)

    def status(self) -> Status:
        return Status(self.name, self.address, self.proc.running(), port_answers(HOST, self.port))


class Stack:
    """All parts of the local stack, in start order."""

    def __init__(self, settings: StackSettings | None = None) -> None:
        self.settings = settings or StackSettings()
        self.kafka = Kafka(self.settings)
        self.mariadb = [MariaDB(self.settings, i) for i in range(len(self.settings.mariadb_ports))]
        self.dovecot = Dovecot(self.settings)
        # The same server without CONDSTORE and QRESYNC, for the sync's UID-list fallback.
        self.dovecot_plain = Dovecot(
            self.settings,
            name="dovecot-plain",
            port=self.settings.imap_port + 1,
            capability=PLAIN_IMAP_CAPABILITY,
        )

    @property
    def parts(self) -> list[Part]:
        return [*self.mariadb, self.kafka, self.dovecot, self.dovecot_plain]

    def up(self, step: Step = quiet) -> None:
        """Start the parts that are not running; ``step`` shows each one that takes a while."""
        for part in self.parts:
            part.up(step)

    def down(self) -> list[str]:
        return [part.name for part in reversed(self.parts) if part.down()]

    def status(self) -> list[Status]:
        return [part.status() for part in self.parts]

    def clusters(self) -> list[tuple[str, str, int]]:
        """The MariaDB servers as shard-map clusters: (name, host, port)."""
        return [(m.cluster_name, HOST, m.port) for m in self.mariadb]
