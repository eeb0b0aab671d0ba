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
import re
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from cli.procs import ManagedProcess, ProcessError, port_answers, wait_until
from cli.progress import Step, quiet
from libs.config import REPO_ROOT, StackSettings

__all__ = [
    "Dovecot",
    "Kafka",
    "KafkaSaslSsl",
    "MariaDB",
    "OAuthServer",
    "Part",
    "Postfix",
    "ServerTls",
    "Stack",
    "StackError",
]

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
# The replicas' login on their primary (replication only), on every server so that a promoted
# replica can be a primary to the next one.
# The administrative login (migrations, failover, fencing): it alone may create schemas, set
# read_only and change replication. Its defaults are libs.config.AdminDatabaseSettings'.
ADMIN_USER = "flightlog_admin"
ADMIN_PASSWORD = "flightlog-admin"
REPL_USER = "flightlog_repl"
REPL_PASSWORD = "flightlog-repl"
IMAP_TEST_PASSWORD = "flightlog"
IMAPS_PORT_OFFSET = 850  # Dovecot's implicit-TLS port: 1143 -> 1993
# The token server's clients (development secrets): the mail client flightlog's generic OAuth2
# provider is configured with, and the resource server (the OAuth2 Dovecot) that introspects.
OAUTH_CLIENT_ID = "flightlog"
OAUTH_CLIENT_SECRET = "flightlog-oauth-secret"
OAUTH_INTROSPECTION_CLIENT = ("dovecot", "dovecot-introspection-secret")
OAUTH_DOVECOT_PORT_OFFSET = 2  # the OAuth2 Dovecot: 1143 -> 1145
# The stack's mail domain: the Dovecot users' addresses, delivered over LMTP.
MAIL_DOMAIN = "flightlog.test"


class StackError(RuntimeError):
    pass


def _run(argv: list[str], what: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise StackError(
            f"{what} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}"
        )
    return result  # type: ignore[no-any-return]


def ensure_debian_packages(
    binaries: dict[str, str], step: Step = quiet, *, debconf: tuple[str, ...] = ()
) -> None:
    """Install the Debian packages whose binaries are missing (``binary -> package``).

    A binary is a name on PATH or an absolute path (a daemon outside PATH). ``debconf`` holds
    ``debconf-set-selections`` lines answered before the install (Postfix asks questions).
    """
    missing = sorted(
        {
            pkg
            for binary, pkg in binaries.items()
            if (not Path(binary).exists() if binary.startswith("/") else shutil.which(binary) is None)
        }
    )
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
    if debconf:
        _run(["debconf-set-selections"], "debconf-set-selections", input="\n".join(debconf) + "\n")
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


@dataclass(frozen=True, slots=True)
class ServerTls:
    """A server's certificate chain and key (PEM); ``ca`` verifies client certificates."""

    cert: Path
    key: Path
    ca: Path


def _kafka_cluster_id() -> str:
    """A random cluster id as Kafka writes one (``kafka-storage random-uuid``): URL-safe base64 of
    16 bytes, never starting with "-", which the storage tool's argument parser takes for an
    option (one fresh stack in 64 failed to format its storage)."""
    while (cluster_id := base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")).startswith("-"):
        pass
    return cluster_id


@dataclass(frozen=True, slots=True)
class KafkaSaslSsl:
    """A SASL_SSL listener on ``port``: TLS with ``tls``, SCRAM-SHA-512 and PLAIN for ``users``
    (name -> password; SCRAM credentials are written when the storage is formatted)."""

    port: int
    tls: ServerTls
    users: tuple[tuple[str, str], ...]


class Kafka(Part):
    """A single KRaft node (broker and controller in one JVM).

    The stack's has a PLAINTEXT listener only. ``dir`` and ``sasl_ssl`` make another node (tests
    of TLS and SASL start one of their own): its state in ``dir``, the same jars (resolved once,
    under the stack's state directory), a SASL_SSL listener besides the PLAINTEXT one, which the
    node uses to reach itself.
    """

    name = "kafka"

    def __init__(
        self, settings: StackSettings, *, dir: Path | None = None, sasl_ssl: KafkaSaslSsl | None = None
    ) -> None:
        self.settings = settings
        self.classpath_dir = settings.state_dir / "kafka"
        self.dir = dir or self.classpath_dir
        self.sasl_ssl = sasl_ssl
        self.proc = ManagedProcess("kafka", self.dir / "kafka.pid", self.dir / "kafka.out", str(self.dir))
        self.pom = REPO_ROOT / "deploy" / "kafka" / "pom.xml"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.settings.kafka_port}"

    def classpath(self, step: Step = quiet) -> str:
        """Resolve the broker's jars with Maven once per version of the pom."""
        cp_file = self.classpath_dir / "classpath.txt"
        stamp = self.classpath_dir / "classpath.pom-sha256"
        digest = hashlib.sha256(self.pom.read_bytes()).hexdigest()
        if not (cp_file.exists() and stamp.exists() and stamp.read_text() == digest):
            for tool in ("java", "mvn"):
                if shutil.which(tool) is None:
                    raise StackError(f"{tool} is not installed: Kafka needs Java 17 and Maven")
            self.classpath_dir.mkdir(parents=True, exist_ok=True)
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

    def _listeners(self) -> list[str]:
        s = self.settings
        plain = f"PLAINTEXT://{HOST}:{s.kafka_port}"
        controller = f"CONTROLLER://{HOST}:{s.kafka_controller_port}"
        if self.sasl_ssl is None:
            return [
                f"listeners={plain},{controller}",
                f"advertised.listeners={plain}",
                "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            ]
        secure = self.sasl_ssl
        # Kafka reads a PEM key store as one file: the key (PKCS#8), then the certificate.
        keystore = self.dir / "keystore.pem"
        keystore.write_text(secure.tls.key.read_text() + secure.tls.cert.read_text())
        keystore.chmod(0o600)
        plain_users = " ".join(f'user_{name}="{password}"' for name, password in secure.users)
        listener = f"SASL_SSL://{HOST}:{secure.port}"
        return [
            f"listeners={plain},{controller},{listener}",
            f"advertised.listeners={plain},{listener}",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL",
            "inter.broker.listener.name=PLAINTEXT",
            "sasl.enabled.mechanisms=SCRAM-SHA-512,PLAIN",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "listener.name.sasl_ssl.plain.sasl.jaas.config="
            f"org.apache.kafka.common.security.plain.PlainLoginModule required {plain_users};",
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={keystore}",
            "ssl.client.auth=none",
        ]

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
                    *self._listeners(),
                    "controller.listener.names=CONTROLLER",
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
            cluster_id = _kafka_cluster_id()
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
                        *self._scram_users(),
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

    def _scram_users(self) -> list[str]:
        """``kafka-storage format`` arguments that write the SCRAM credentials (KRaft keeps them
        in its metadata log)."""
        if self.sasl_ssl is None:
            return []
        return [
            arg
            for name, password in self.sasl_ssl.users
            for arg in ("--add-scram", f"SCRAM-SHA-512=[name={name},password={password}]")
        ]

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
    """One MariaDB server process: a "physical cluster"'s primary, or with ``primary`` its replica.

    Every server writes a GTID binary log and has semi-synchronous replication enabled both ways
    (as a source and as a replica), so either of a cluster's two servers can be promoted and take
    the other as its replica without a restart. A replica follows its primary with
    ``MASTER_USE_GTID=slave_pos``, seeded from a consistent dump of the primary the first time
    (:meth:`replicate`), and runs ``read_only``.
    """

    def __init__(
        self,
        settings: StackSettings,
        index: int,
        *,
        primary: MariaDB | None = None,
        tls: ServerTls | None = None,
    ) -> None:
        self.settings = settings
        self.index = index
        self.primary = primary
        # With ``tls``, every TCP connection must use TLS (tests of the clients' TLS start one).
        self.tls = tls
        self.cluster_name = f"c{index + 1}"
        if primary is None:
            self.port = settings.mariadb_ports[index]
            self.name = f"mariadb-{self.cluster_name}"
            self.dir = settings.state_dir / "mariadb" / self.cluster_name
        else:
            self.port = primary.port + settings.mariadb_replica_port_offset
            self.name = f"mariadb-{self.cluster_name}-replica"
            self.dir = settings.state_dir / "mariadb" / f"{self.cluster_name}-replica"
        # Unique within a cluster (GTIDs carry it): 1, 3, 5 ... for primaries, +1 for replicas.
        self.server_id = 2 * index + (2 if primary is not None else 1)
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

    def query(self, sql: str) -> list[list[str]]:
        """Rows of a statement run as root over the socket, as tab-separated strings."""
        return [line.split("\t") for line in self._client(sql).splitlines()]

    def slave_status(self) -> dict[str, str]:
        """SHOW SLAVE STATUS by column name; empty when the server follows no primary."""
        out = _run(
            [
                "mariadb",
                "--no-defaults",
                f"--socket={self.socket}",
                "-uroot",
                "-B",
                "-e",
                "SHOW SLAVE STATUS",
            ],
            f"{self.name}: SHOW SLAVE STATUS",
        ).stdout.splitlines()
        if len(out) < 2:
            return {}
        return dict(zip(out[0].split("\t"), out[1].split("\t"), strict=False))

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
        fresh = False
        if not self.proc.running():
            fresh = self._start(step)
        self._grant()
        if self.primary is not None:
            self._follow(step, fresh=fresh)

    def _start(self, step: Step) -> bool:
        """Start the server; returns whether its data directory is new."""
        if port_answers(HOST, self.port):
            raise StackError(f"port {self.port} is taken by a process this stack did not start")
        data = self.dir / "data"
        fresh = not (data / "mysql").is_dir()
        if fresh:
            data.mkdir(parents=True, exist_ok=True)
            with step(f"{self.name}: creating its data directory"):
                self._install_db(data)
        with step(f"starting {self.name} on {self.address}"):
            self._run_server(data)
        return fresh

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
            # its own temporary directory: bootstrapping in a /tmp that others clean or fill
            # failed once with "Could not remove temporary table"
            env={**os.environ, "TMPDIR": str(self._tmpdir())},
        )

    def _tmpdir(self) -> Path:
        tmp = self.dir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp

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
                f"--tmpdir={self._tmpdir()}",
                "--skip-name-resolve",
                "--character-set-server=utf8mb4",
                "--collation-server=utf8mb4_bin",
                f"--innodb-buffer-pool-size={self.settings.mariadb_buffer_pool_mb}M",
                "--innodb-log-file-size=256M",
                "--max-connections=1000",
                "--max-allowed-packet=64M",
                "--innodb-autoinc-lock-mode=2",
                "--transaction-isolation=READ-COMMITTED",
                *self._replication_args(),
                *self._tls_args(),
            ]
        )
        wait_until(self._ping, 60, f"{self.name} on {self.address}")
        self.proc.detach()

    def _tls_args(self) -> list[str]:
        if self.tls is None:
            return []
        return [
            f"--ssl-cert={self.tls.cert}",
            f"--ssl-key={self.tls.key}",
            f"--ssl-ca={self.tls.ca}",
            "--require-secure-transport=ON",  # the socket counts as secure: _client still works
        ]

    def _replication_args(self) -> list[str]:
        return [
            f"--server-id={self.server_id}",
            "--log-bin=mariadb-bin",
            "--log-slave-updates",  # a promoted replica's binlog holds everything, for its own replica
            "--binlog-format=ROW",
            "--gtid-strict-mode=ON",
            "--relay-log=relay-bin",
            "--rpl-semi-sync-master-enabled=ON",
            "--rpl-semi-sync-slave-enabled=ON",
            f"--rpl-semi-sync-master-timeout={self.settings.mariadb_semi_sync_timeout_ms}",
            # AFTER_SYNC: no session sees a commit before the replica has it (lossless semi-sync)
            "--rpl-semi-sync-master-wait-point=AFTER_SYNC",
            # A primary with no replica connected (a promoted one, or one whose replica died)
            # commits at once instead of waiting out the timeout first.
            "--rpl-semi-sync-master-wait-no-slave=OFF",
            # A replica notices a silent primary within seconds and retries it every second.
            "--slave-net-timeout=4",
            "--expire-logs-days=2",
        ]

    def _grant(self) -> None:
        # The services log in over TCP with a password; root stays socket-only. Users are each
        # server's own (sql_log_bin=0): a replica seeded after them would otherwise replay them as
        # errant transactions. READ_ONLY ADMIN (part of ALL PRIVILEGES) is taken back so that
        # read_only fences the services' user: with it, a fenced primary would still take writes.
        self._client(
            "SET SESSION sql_log_bin = 0;"
            f"CREATE USER IF NOT EXISTS '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{DB_PASSWORD}';"
            f"CREATE USER IF NOT EXISTS '{DB_USER}'@'localhost' IDENTIFIED BY '{DB_PASSWORD}';"
            f"GRANT ALL PRIVILEGES ON *.* TO '{DB_USER}'@'127.0.0.1' WITH GRANT OPTION;"
            f"GRANT ALL PRIVILEGES ON *.* TO '{DB_USER}'@'localhost' WITH GRANT OPTION;"
            f"REVOKE READ_ONLY ADMIN ON *.* FROM '{DB_USER}'@'127.0.0.1';"
            f"REVOKE READ_ONLY ADMIN ON *.* FROM '{DB_USER}'@'localhost';"
            f"CREATE USER IF NOT EXISTS '{ADMIN_USER}'@'127.0.0.1' IDENTIFIED BY '{ADMIN_PASSWORD}';"
            # WITH GRANT OPTION: the migrations, run as this user, grant the services' user its rows
            f"GRANT ALL PRIVILEGES ON *.* TO '{ADMIN_USER}'@'127.0.0.1' WITH GRANT OPTION;"
            f"CREATE USER IF NOT EXISTS '{REPL_USER}'@'127.0.0.1' IDENTIFIED BY '{REPL_PASSWORD}';"
            f"GRANT REPLICATION SLAVE, REPLICATION SLAVE ADMIN ON *.* TO '{REPL_USER}'@'127.0.0.1';"
        )

    def binlog_enabled(self) -> bool:
        return self.query("SELECT @@log_bin")[0][0] == "1"

    def _follow(self, step: Step, *, fresh: bool) -> None:
        """Make a new replica follow its primary; a known one resumes by itself (master.info).

        A replica that follows no primary and is not new was promoted by a failover: it is a
        primary now and is left alone (rejoining the old primary as its replica is another step).
        """
        if self.slave_status():
            self._client("SET GLOBAL read_only = ON")  # not kept over a restart
            return
        if not fresh and self.primary is not None:
            # A copy that failed before loading anything (the dump itself failing) leaves no
            # schema, while a promoted replica holds every shard: only the first follows now.
            # A load that failed part-way is not told apart: remove its data directory.
            system = {"mysql", "information_schema", "performance_schema", "sys"}
            fresh = not [row for row in self.query("SHOW DATABASES") if row[0] not in system]
        if not fresh or self.primary is None:
            return
        if not self.primary.binlog_enabled():
            raise StackError(
                f"{self.primary.name} runs without a binary log (started before replicas existed):"
                " restart it (`flightlog stack down && flightlog stack up`) to give it a replica,"
                " or set FLIGHTLOG_MARIADB_REPLICAS=false"
            )
        with step(f"{self.name}: copying {self.primary.name} and following it"):
            self.replicate()

    def replicate(self) -> None:
        """Seed this replica from a consistent dump of the primary's schemas, then follow it by GTID.

        The dump and its GTID position come from one snapshot (``--single-transaction --gtid
        --master-data=2``), so replication starts right after what was copied. Nothing of the
        load goes to this server's binlog: its GTIDs must stay a prefix of the primary's, or
        strict mode refuses to promote it later.
        """
        primary = self.primary
        if primary is None:
            raise StackError(f"{self.name} is a primary")
        system = {"mysql", "information_schema", "performance_schema", "sys"}
        schemas = [row[0] for row in primary.query("SHOW DATABASES") if row[0] not in system]
        if schemas:
            dump = _run(
                [
                    "mariadb-dump",
                    "--no-defaults",
                    f"--socket={primary.socket}",
                    "-uroot",
                    "--single-transaction",
                    "--gtid",
                    "--master-data=2",
                    "--routines",
                    "--triggers",
                    "--hex-blob",  # compressed bodies and binary keys, as text the pipe can carry
                    "--databases",
                    *schemas,
                ],
                f"{primary.name}: mariadb-dump",
            ).stdout
            match = re.search(r"gtid_slave_pos='([^']*)'", dump)
            if match is None:
                raise StackError(f"{primary.name}: the dump carries no GTID position")
            position = match[1]
            _run(
                ["mariadb", "--no-defaults", f"--socket={self.socket}", "-uroot"],
                f"{self.name}: loading the dump",
                input="SET SESSION sql_log_bin = 0;\n" + dump,
            )
        else:
            # Nothing to copy, so nothing can land between reading the position and following it.
            position = primary.query("SELECT @@gtid_binlog_pos")[0][0]
        self._client(
            "STOP SLAVE; RESET SLAVE ALL;"
            f"SET GLOBAL gtid_slave_pos = '{position}';"
            f"CHANGE MASTER TO MASTER_HOST = '{HOST}', MASTER_PORT = {primary.port},"
            f" MASTER_USER = '{REPL_USER}', MASTER_PASSWORD = '{REPL_PASSWORD}',"
            " MASTER_USE_GTID = slave_pos, MASTER_CONNECT_RETRY = 1;"
            "START SLAVE; SET GLOBAL read_only = ON;"
        )
        wait_until(self._replicating, 30, f"{self.name} to follow {primary.name}")

    def _replicating(self) -> bool:
        status = self.slave_status()
        error = status.get("Last_IO_Error") or status.get("Last_SQL_Error")
        if error:
            raise StackError(f"{self.name} cannot replicate: {error}")
        return status.get("Slave_IO_Running") == "Yes" and status.get("Slave_SQL_Running") == "Yes"

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
        oauth: OAuthServer | None = None,
    ) -> None:
        """:param capability: an ``imap_capability`` replacing Dovecot's own list (the second,
        CONDSTORE/QRESYNC-less instance); None keeps Dovecot's.
        :param oauth: also accept XOAUTH2 and OAUTHBEARER, with Dovecot's oauth2 passdb asking
            this token server's introspection endpoint (RFC 7662) about every token; passwords
            still log in (LOGIN, PLAIN), so tests can put mail in."""
        self.settings = settings
        self.name = name
        self.port = settings.imap_port if port is None else port
        self.capability = capability
        self.oauth = oauth
        # The server with Dovecot's own capabilities also speaks TLS: STARTTLS on ``port`` and
        # implicit TLS on ``imaps_port``, with a self-signed certificate for 127.0.0.1.
        self.tls = capability is None and oauth is None
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
            imap = imaplib.IMAP4(HOST, self.port, timeout=5)
        except OSError:
            return False
        try:
            imap.login(username, password)
        except (imaplib.IMAP4.error, OSError):  # refused, or not answered in time: asked again
            return False
        finally:
            imap.shutdown()
        return True

    def _write_config(self) -> bool:
        """Write the config (and what it names); returns whether the config changed."""
        d = self.dir
        for sub in ("run", "state", "mail"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(d / "mail", "mail", "mail")
        # Dovecot (as mail) creates a user's folder here on a first login or LMTP delivery.
        (d / "mail" / MAIL_DOMAIN).mkdir(exist_ok=True)
        shutil.chown(d / "mail" / MAIL_DOMAIN, "mail", "mail")
        if not self.users.exists():
            for i in range(1, 4):
                self.add_user(f"user{i}@{MAIL_DOMAIN}", wait=False)
        if self.tls and not self.tls_cert.exists():
            write_self_signed_cert(self.tls_cert, self.tls_key, HOST)
        if self.oauth is not None:
            client, secret = OAUTH_INTROSPECTION_CLIENT
            self._oauth_conf.write_text(
                f"introspection_mode = post\n"
                f"introspection_url = https://{client}:{secret}@{self.oauth.address}/introspect\n"
                "force_introspection = yes\n"
                "username_attribute = username\n"
                "active_attribute = active\n"
                "active_value = true\n"
                f"tls_ca_cert_file = {self.oauth.tls_cert}\n"
            )
            self._oauth_conf.chmod(0o600)
        text = self._config_text()
        if self.conf.exists() and self.conf.read_text() == text:
            return False
        self.conf.write_text(text)
        return True

    @property
    def _oauth_conf(self) -> Path:
        return self.dir / "dovecot-oauth2.conf.ext"

    def _config_text(self) -> str:
        d = self.dir
        tls = (
            f"ssl = yes\nssl_cert = <{self.tls_cert}\nssl_key = <{self.tls_key}\n"
            if self.tls
            else "ssl = no\n"
        )
        # Tests refuse logins on purpose (wrong passwords, revoked tokens): no delay after a
        # failure, and no penalty per client address (up to 15 s; every test client is 127.0.0.1,
        # so one test's refusals slowed every other's logins past their timeouts), as Dovecot's
        # docs disable it.
        no_penalty = (
            "auth_failure_delay = 0\n"
            "service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n"
        )
        mechanisms, oauth_passdb = "plain login", ""
        if self.oauth is not None:
            mechanisms += " xoauth2 oauthbearer"
            oauth_passdb = (
                "passdb {\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n"
                f"  args = {self._oauth_conf}\n}}\n"
            )
        # The TLS server is also the stack's mail store: Postfix delivers into it over LMTP and
        # checks SMTP AUTH against its users. The static userdb has no allow_all_users, so LMTP
        # asks the passdb whether a user exists and refuses an unknown one (Postfix bounces it).
        mta = (
            f"""service lmtp {{
  process_limit = 32
  inet_listener lmtp {{
    address = {HOST}
    port = {self.settings.lmtp_port}
  }}
}}
service auth {{
  client_limit = 4100
  inet_listener auth-postfix {{
    address = {HOST}
    port = {self.settings.dovecot_auth_port}
  }}
}}
protocol lmtp {{
  postmaster_address = postmaster@{MAIL_DOMAIN}
}}
"""
            if self.tls
            else ""
        )
        return f"""# Generated by `flightlog stack up`; edits are overwritten.
protocols = imap{" lmtp" if self.tls else ""}
listen = {HOST}
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
{tls}disable_plaintext_auth = no
auth_mechanisms = {mechanisms}
mail_location = maildir:{d}/mail/%d/%n/Maildir
mail_uid = mail
mail_gid = mail
first_valid_uid = 8
mail_max_userip_connections = 2000
default_process_limit = 2000
default_client_limit = 4000
{no_penalty}{oauth_passdb}passdb {{
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
{mta}""" + (f"imap_capability = {self.capability}\n" if self.capability else "")

    def up(self, step: Step = quiet) -> None:
        packages = {"dovecot": "dovecot-imapd", "doveadm": "dovecot-core"}
        if self.tls:
            packages["/usr/lib/dovecot/lmtp"] = "dovecot-lmtpd"
        ensure_debian_packages(packages, step)
        if self.proc.running():
            # A server started from an older config (before LMTP) takes the new one on a reload,
            # which keeps its IMAP sessions.
            if self._write_config():
                with step(f"{self.name}: reloading its changed config"):
                    _run(["dovecot", "-c", str(self.conf), "reload"], f"{self.name} reload")
            return
        if port_answers(HOST, self.port):
            raise StackError(f"port {self.port} is taken by a process this stack did not start")
        with step(f"starting {self.name} on {self.address}"):
            self._write_config()  # a first run writes a TLS certificate
            # no anvil-auth-penalty socket: one left by an earlier config has auth wait 5 s for it
            (self.dir / "run" / "anvil-auth-penalty").unlink(missing_ok=True)
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


class OAuthServer(Part):
    """The OAuth2 authorization server of the stack (:mod:`cli.oauth_server`), over TLS with a
    self-signed certificate for 127.0.0.1: what a mail provider's token service is to the OAuth2
    Dovecot and to IMAP accounts of the ``generic`` provider."""

    name = "oauth-server"

    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.port = settings.oauth_server_port
        self.dir = settings.state_dir / "oauth-server"
        self.tls_cert = self.dir / "tls" / "cert.pem"
        self.tls_key = self.dir / "tls" / "key.pem"
        self.proc = ManagedProcess(
            self.name, self.dir / "oauth-server.pid", self.dir / "oauth-server.out", "cli.oauth_server"
        )

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"https://{self.address}"

    def up(self, step: Step = quiet) -> None:
        if self.proc.running():
            return
        if port_answers(HOST, self.port):
            raise StackError(f"port {self.port} is taken by a process this stack did not start")
        if not self.tls_cert.exists():
            write_self_signed_cert(self.tls_cert, self.tls_key, HOST)
        with step(f"starting {self.name} on {self.address}"):
            self.proc.start(
                [
                    sys.executable, "-m", "cli.oauth_server", "--host", HOST, "--port", str(self.port),
                    "--cert", str(self.tls_cert), "--key", str(self.tls_key),
                    "--client", f"{OAUTH_CLIENT_ID}:{OAUTH_CLIENT_SECRET}",
                    "--resource-server", ":".join(OAUTH_INTROSPECTION_CLIENT),
                ],
                cwd=REPO_ROOT,
            )  # fmt: skip
            try:
                wait_until(self._answers, 30, f"the OAuth2 server on {self.address}")
            except ProcessError as exc:
                raise StackError(f"{exc}\n{self.proc.log_tail()}") from None
        self.proc.detach()

    def _answers(self) -> bool:
        if not self.proc.running():
            raise StackError(f"the OAuth2 server exited during start-up:\n{self.proc.log_tail()}")
        return port_answers(HOST, self.port)

    def down(self) -> bool:
        return self.proc.stop(timeout_s=10)

    def status(self) -> Status:
        return Status(self.name, self.url, self.proc.running(), port_answers(HOST, self.port))


# Postfix's daemons, none chrooted (the state folder holds everything they read).
POSTFIX_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""
POSTFIX_DAEMON_DIR = Path("/usr/lib/postfix/sbin")
# Largest message Postfix accepts (its default, written down).
POSTFIX_MESSAGE_SIZE_LIMIT_BYTES = 10_240_000


class Postfix(Part):
    """Postfix as the stack's MTA: submission with AUTH (STARTTLS, and implicit TLS) on loopback,
    delivering ``@flightlog.test`` into the main Dovecot over LMTP.

    Its master runs in the foreground (``master -d``) with its own config, queue and data
    folders under the state folder. SASL is Dovecot's (the IMAP users and passwords) and TLS uses
    the main Dovecot's self-signed certificate, so one CA file verifies both servers. A
    recipient is not checked while the client talks (``smtpd_reject_unlisted_recipient = no``):
    Dovecot refuses an unknown one over LMTP and Postfix returns a DSN to the sender, as a
    remote server would. Other domains bounce at once: the stack reaches no other server.
    """

    name = "postfix"

    def __init__(self, settings: StackSettings, dovecot: Dovecot) -> None:
        self.settings = settings
        self.dovecot = dovecot
        self.dir = settings.state_dir / "postfix"
        self.conf_dir = self.dir / "etc"
        self.queue_dir = self.dir / "queue"
        self.proc = ManagedProcess(
            "postfix", self.dir / "master.pid", self.dir / "postfix.out", str(self.conf_dir)
        )

    @property
    def address(self) -> str:
        return f"{HOST}:{self.settings.submission_port}"

    def _write_config(self) -> None:
        s = self.settings
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        self.queue_dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        shutil.chown(self.dir / "data", "postfix", "postfix")
        main = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.dir / "data"),
            "daemon_directory": str(POSTFIX_DAEMON_DIR),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            # Postfix's postlogd writes to the master's stdout, the process's log file.
            "maillog_file": "/dev/stdout",
            "myhostname": f"mta.{MAIL_DOMAIN}",
            "mydomain": MAIL_DOMAIN,
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": HOST,
            "inet_protocols": "ipv4",
            "mynetworks": f"{HOST}/32",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            "message_size_limit": str(POSTFIX_MESSAGE_SIZE_LIMIT_BYTES),
            "virtual_mailbox_domains": MAIL_DOMAIN,
            "virtual_transport": f"lmtp:inet:{HOST}:{s.lmtp_port}",
            "smtpd_reject_unlisted_recipient": "no",
            "default_transport": f"error:5.1.2 this local stack delivers only to {MAIL_DOMAIN}",
            "relay_transport": "$default_transport",
            "smtpd_relay_restrictions": "permit_sasl_authenticated, reject_unauth_destination",
            "smtpd_recipient_restrictions": "permit_sasl_authenticated, reject",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": f"inet:{HOST}:{s.dovecot_auth_port}",
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_tls_auth_only": "yes",
            "smtpd_tls_cert_file": str(self.dovecot.tls_cert),
            "smtpd_tls_key_file": str(self.dovecot.tls_key),
            "smtpd_tls_security_level": "encrypt",
            # Retry a deferred message soon: tests and the bench wait on it.
            "queue_run_delay": "10s",
            "minimal_backoff_time": "10s",
            "maximal_backoff_time": "60s",
        }
        (self.conf_dir / "main.cf").write_text(
            "# Generated by `flightlog stack up`; edits are overwritten.\n"
            + "".join(f"{key} = {value}\n" for key, value in main.items())
        )
        listeners = (
            f"{HOST}:{s.submission_port} inet n - n - - smtpd\n"
            "  -o syslog_name=postfix/submission\n"
            f"{HOST}:{s.smtps_port} inet n - n - - smtpd\n"
            "  -o syslog_name=postfix/smtps\n"
            "  -o smtpd_tls_wrappermode=yes\n"
        )
        (self.conf_dir / "master.cf").write_text(
            "# Generated by `flightlog stack up`; edits are overwritten.\n" + listeners + POSTFIX_SERVICES
        )

    def up(self, step: Step = quiet) -> None:
        ensure_debian_packages(
            {"postfix": "postfix", str(POSTFIX_DAEMON_DIR / "master"): "postfix"},
            step,
            # Installed without a system instance: the stack runs its own.
            debconf=("postfix postfix/main_mailer_type select No configuration",),
        )
        if self.proc.running():
            return
        for port in (self.settings.submission_port, self.settings.smtps_port):
            if port_answers(HOST, port):
                raise StackError(f"port {port} is taken by a process this stack did not start")
        with step(f"starting postfix on {self.address}"):
            self._write_config()
            # Creates the queue folders with their owners and modes (and checks the config).
            _run(["postfix", "-c", str(self.conf_dir), "check"], "postfix check")
            self.proc.start([str(POSTFIX_DAEMON_DIR / "master"), "-c", str(self.conf_dir), "-d"])
            try:
                wait_until(self._answers, 30, f"Postfix on {self.address}")
            except ProcessError as exc:
                raise StackError(f"{exc}\n{self.proc.log_tail()}") from None
        self.proc.detach()

    def _answers(self) -> bool:
        if not self.proc.running():
            raise StackError(f"Postfix exited during start-up:\n{self.proc.log_tail()}")
        return port_answers(HOST, self.settings.submission_port) and port_answers(
            HOST, self.settings.smtps_port
        )

    def down(self) -> bool:
        return self.proc.stop(timeout_s=30)

    def status(self) -> Status:
        return Status(
            self.name,
            self.address,
            self.proc.running(),
            port_answers(HOST, self.settings.submission_port),
        )


class Stack:
    """All parts of the local stack, in start order."""

    def __init__(self, settings: StackSettings | None = None) -> None:
        self.settings = settings or StackSettings()
        self.kafka = Kafka(self.settings)
        self.mariadb = [MariaDB(self.settings, i) for i in range(len(self.settings.mariadb_ports))]
        self.replicas = (
            [MariaDB(self.settings, m.index, primary=m) for m in self.mariadb]
            if self.settings.mariadb_replicas
            else []
        )
        self.dovecot = Dovecot(self.settings)
        # The same server without CONDSTORE and QRESYNC, for the sync's UID-list fallback.
        self.dovecot_plain = Dovecot(
            self.settings,
            name="dovecot-plain",
            port=self.settings.imap_port + 1,
            capability=PLAIN_IMAP_CAPABILITY,
        )
        # A third server whose accounts log in with OAuth2 tokens of the stack's token server
        # (and with passwords, for putting mail in), without TLS: its own config, its own users.
        self.oauth_server = OAuthServer(self.settings)
        self.dovecot_oauth = Dovecot(
            self.settings,
            name="dovecot-oauth",
            port=self.settings.imap_port + OAUTH_DOVECOT_PORT_OFFSET,
            oauth=self.oauth_server,
        )
        self.postfix = Postfix(self.settings, self.dovecot)

    @property
    def parts(self) -> list[Part]:
        # each replica after its primary: it copies and follows it
        return [
            *self.mariadb,
            *self.replicas,
            self.kafka,
            self.dovecot,
            self.dovecot_plain,
            self.oauth_server,
            self.dovecot_oauth,
            self.postfix,  # after the Dovecot it delivers to and authenticates against
        ]

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

    def replica_addresses(self) -> dict[str, tuple[str, int]]:
        """Each cluster's replica, by cluster name, for the shard map."""
        return {r.cluster_name: (HOST, r.port) for r in self.replicas}
