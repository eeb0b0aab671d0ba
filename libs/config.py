"""Typed settings read from ``FLIGHTLOG_*`` environment variables.

Every service builds one settings object at start-up; a malformed value fails loudly there, not
on first use. Defaults are the local stack's addresses (docs/architecture.md); every variable
is listed in docs/configuration.md.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Final, Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "MIN_KEY_CHARS",
    "AdminDatabaseSettings",
    "DatabaseSettings",
    "InsecureSettings",
    "KafkaSettings",
    "ServiceSettings",
    "Settings",
    "StackSettings",
    "insecure_secrets",
]

REPO_ROOT = Path(__file__).resolve().parent.parent


class _Base(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLIGHTLOG_", extra="ignore", frozen=True)


class KafkaSettings(_Base):
    """How every producer, consumer and admin client reaches Kafka.

    ``kafka_bootstrap_servers`` is a comma-separated ``host:port`` list; ``kafka_request_timeout_ms``
    bounds each request of any client; ``kafka_linger_ms`` and ``kafka_max_batch_bytes`` are the
    producers' ``linger_ms`` and ``max_batch_size``.
    """

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_request_timeout_ms: int = 30_000
    # Replicas of each topic `flightlog topics create` makes, and min.insync.replicas of every
    # topic: unset, 3 and 2 (acks=all then survives one broker down), or what a smaller cluster
    # can hold (the local stack's one broker: 1 and 1).
    kafka_topic_replication_factor: int | None = Field(default=None, ge=1)
    kafka_topic_min_insync_replicas: int | None = Field(default=None, ge=1)
    # Partitions of each topic `flightlog topics create` makes; a stage runs at most as many
    # instances as its input topic has partitions. Unset: libs.kafka.PRODUCTION_PARTITIONS (48)
    # on a cluster of 3 or more brokers, the catalogue's small counts on a smaller one (the local
    # stack's one broker: 6, imap-accounts 12). transform's changelog always takes inflight's
    # count (partition N of one holds the states of the other's partition N). An existing topic
    # with another count is reported, never changed (docs/topics.md says how to grow one).
    kafka_inflight_partitions: int | None = Field(default=None, ge=1)
    # flightlog.postflight: persist's instances at most (unset: 48 / 6, as inflight's).
    kafka_postflight_partitions: int | None = Field(default=None, ge=1)
    # flightlog.changes: the webhook dispatcher's and downstream consumers' (unset: 48 / 6).
    kafka_changes_partitions: int | None = Field(default=None, ge=1)
    # flightlog.persist-retry: persist's retry consumers' (unset: 48 / 6).
    kafka_persist_retry_partitions: int | None = Field(default=None, ge=1)
    # flightlog.imap-accounts: ingest instances that sync IMAP accounts (unset: 48 / 12).
    kafka_imap_accounts_partitions: int | None = Field(default=None, ge=1)
    # One partition: the DLQ is read by `flightlog dlq` only, in order.
    kafka_dlq_partitions: int | None = Field(default=None, ge=1)
    # One partition: flightlog.erasures is small and every transform reads it whole.
    kafka_erasures_partitions: int | None = Field(default=None, ge=1)
    kafka_linger_ms: int = 5
    kafka_max_batch_bytes: int = 1_048_576
    # How every producer, consumer and admin client (the services' and the CLI's) talks to the
    # brokers: PLAINTEXT (the local stack), SSL, SASL_PLAINTEXT or SASL_SSL.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    # TLS (SSL, SASL_SSL): the brokers' certificates are always verified, against this CA bundle
    # (PEM; unset: the system's CAs) and, unless this is false, the broker's host name.
    kafka_tls_ca_file: Path | None = None
    kafka_tls_verify_hostname: bool = True
    # A client certificate and its key (PEM), for brokers that require mutual TLS.
    kafka_tls_cert_file: Path | None = None
    kafka_tls_key_file: Path | None = None
    # SASL (SASL_PLAINTEXT, SASL_SSL): the mechanism and the login. PLAIN sends the password
    # itself: only over TLS (SASL_SSL).
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = ""

    @model_validator(mode="after")
    def _kafka_security(self) -> Self:
        if self.kafka_security_protocol.startswith("SASL") and not self.kafka_sasl_username:
            raise ValueError(
                f"FLIGHTLOG_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs"
                " FLIGHTLOG_KAFKA_SASL_USERNAME and FLIGHTLOG_KAFKA_SASL_PASSWORD"
            )
        if (self.kafka_tls_cert_file is None) != (self.kafka_tls_key_file is None):
            raise ValueError("FLIGHTLOG_KAFKA_TLS_CERT_FILE and FLIGHTLOG_KAFKA_TLS_KEY_FILE go together")
        return self


class DatabaseSettings(_Base):
    """Where the global schema lives and how to log in to every cluster.

    Shard schemas are found through the shard map in the global schema, so only the global
    schema's address is configured; clusters share the credentials.
    """

    db_user: str = "flightlog"
    db_password: str = "flightlog"
    global_db_host: str = "127.0.0.1"
    global_db_port: int = 3307
    global_db_name: str = "flightlog_global"
    db_pool_min_size: int = 1
    db_pool_max_size: int = 8
    db_connect_timeout_s: float = 5.0
    # TLS to every MariaDB/MySQL server (the services' pools, the migrations, the shard
    # operations). The server's certificate is always verified, against this CA bundle (PEM;
    # unset: the system's CAs) and, unless this is false, the server's host name.
    db_tls: bool = False
    db_tls_ca_file: Path | None = None
    db_tls_verify_hostname: bool = True
    # A client certificate and its key (PEM), for users created with REQUIRE X509 / SUBJECT.
    db_tls_cert_file: Path | None = None
    db_tls_key_file: Path | None = None

    @model_validator(mode="after")
    def _db_tls(self) -> Self:
        if (self.db_tls_cert_file is None) != (self.db_tls_key_file is None):
            raise ValueError("FLIGHTLOG_DB_TLS_CERT_FILE and FLIGHTLOG_DB_TLS_KEY_FILE go together")
        return self

    shard_map_reload_interval_s: float = 10.0


class AdminDatabaseSettings(DatabaseSettings):
    """The administrative login, for what the services' user may not do: the migrations
    (``flightlog db migrate``, ``flightlog shards create``) and the shard operations (fencing,
    failover, moves).

    The migrations create the services' user, ``db_user`` at ``db_user_host`` with
    ``db_password``, on the global server and every cluster primary, and give it SELECT, INSERT,
    UPDATE and DELETE on the global schema and on every shard schema, nothing else: it cannot
    create or drop a schema or a table, and ``read_only`` fences it (libs.db.migrate).
    """

    # The login of the migrations and the shard operations: it creates schemas, tables and the
    # services' user, and grants (the local stack's flightlog_admin; root in docker-compose.yml
    # and the Kubernetes init Job).
    admin_db_user: str = "flightlog_admin"
    admin_db_password: str = "flightlog-admin"
    # The host part of the services' user the migrations create: "%" (any address, what a
    # Kubernetes pod's changing address needs), or a network such as "10.%".
    db_user_host: str = "%"

    def admin(self, *, connect_timeout_s: float | None = None) -> DatabaseSettings:
        """These settings with the administrative login (and a shorter connect timeout)."""
        update: dict[str, object] = {"db_user": self.admin_db_user, "db_password": self.admin_db_password}
        if connect_timeout_s is not None:
            update["db_connect_timeout_s"] = connect_timeout_s
        return DatabaseSettings.model_validate(
            {**self.model_dump(include=set(DatabaseSettings.model_fields)), **update}
        )


class ServiceSettings(KafkaSettings, DatabaseSettings):
    """What every service reads: its HTTP address for health and metrics, logging, draining.

    ``environment``: in ``production`` (the default) a service refuses to start while a secret
    it uses has the value this repository ships or is too short (:func:`insecure_secrets`);
    ``development`` (set by ``flightlog dev``, the tests and the bench) allows them.
    """

    environment: Literal["production", "development"] = "production"
    http_host: str = "127.0.0.1"
    http_port: int = 0  # 0 means "the service's default port"
    # The management port: /metrics of every service, and the gateway's /docs, /openapi.json and
    # /v1/admin/*. The public port answers 404 for them, and this one 404 for everything else
    # (/healthz and /readyz answer on both). Keep it off the internet: the Kubernetes
    # NetworkPolicies let only the monitoring namespace and the operators' namespace reach it.
    management_host: str = "127.0.0.1"
    # 0 means the HTTP port plus libs.service.MANAGEMENT_PORT_OFFSET (1000): 9080 for the gateway.
    management_port: int = Field(default=0, ge=0)
    # Several processes of the service listen on the one port (SO_REUSEPORT) and the kernel
    # spreads the connections among them: how a host runs more than one gateway process.
    http_reuse_port: bool = False
    # A request's line and headers must arrive within this long of their first byte (or of the
    # connection's opening); else 408 and the connection is closed: slow-loris (libs.http).
    http_head_timeout_s: float = Field(default=10.0, gt=0)
    # A request's body must arrive within this long of its handler's start; else 408 and the
    # connection is closed (libs.http.body_deadline).
    http_body_timeout_s: float = Field(default=30.0, gt=0)
    # An idle keep-alive connection is closed after this long. Keep it above the idle timeout of
    # a proxy in front (60 s for most), or the proxy may reuse a connection as it is being closed.
    http_keepalive_timeout_s: float = Field(default=75.0, gt=0)
    # Failed authentications (an unknown, revoked or malformed API key; a wrong admin key) a
    # client address may make at once, in ingest and the gateway. An address that spent them is
    # answered 429 with Retry-After, without a look-up, until its bucket refills; a key this
    # process knows already is never refused. Behind a proxy every client has the proxy's
    # address, so their failures count together (libs.authn).
    auth_failure_burst: int = Field(default=20, ge=1)
    # How fast an address's failed authentications are forgiven (its bucket refills).
    auth_failure_rate_per_s: float = Field(default=0.5, gt=0)
    # Client addresses whose failures are remembered; past it the least recent is forgotten.
    auth_failure_tracked_addresses_max: int = Field(default=100_000, ge=1)
    log_format: Literal["json", "console"] = "json"
    log_level: str = "INFO"
    drain_timeout_s: float = 25.0  # below the Kubernetes grace period of 30 s
    # Then closing the resources (a producer flushing to a Kafka that is down would wait for
    # ever): drain and close together stay below the grace period.
    close_timeout_s: float = 4.0
    admin_api_key: str = "flightlog-dev-admin-key"
    # Stable per replica and unique among replicas: transform's transactional id is derived from
    # it, and Kafka fences a dead or hung predecessor only for a successor with the same id. The
    # host name is stable for a local process; containers get theirs changed on every restart, so
    # the deployments set it (a StatefulSet pod's name, a fixed name in docker-compose.yml).
    # Empty would give every replica one shared id, each fencing the others in turn.
    instance_id: str = Field(default_factory=socket.gethostname, min_length=1)


Settings = ServiceSettings

# The shortest key, token secret or admin key accepted in production (a 32-character random
# string; Fernet keys are 44 characters by construction).
MIN_KEY_CHARS: Final = 32


class InsecureSettings(Exception):
    """A production service was given a built-in or short secret."""


def insecure_secrets(secrets: Iterable[tuple[BaseSettings, str]]) -> list[str]:
    """What is wrong with each ``(settings, field)`` secret: its value is the built-in default
    (the repository's development value, public to anyone), contains it (one of a comma-separated
    list of keys), or a key is shorter than :data:`MIN_KEY_CHARS`. The password of the database
    user is only checked against its default: its strength is the database's business."""
    problems = []
    for settings, name in secrets:
        value = str(getattr(settings, name))
        builtin = type(settings).model_fields[name].default
        variable = f"FLIGHTLOG_{name.upper()}"
        keys = [k.strip() for k in value.split(",") if k.strip()]
        if value == builtin or builtin in keys:
            problems.append(f"{variable} is the built-in development value; set a secret of your own")
        elif name != "db_password" and any(len(k) < MIN_KEY_CHARS for k in keys or [""]):
            problems.append(f"{variable} is shorter than {MIN_KEY_CHARS} characters")
    return problems


class StackSettings(_Base):
    """The local stack: the servers that ``flightlog stack up`` runs as plain processes."""

    state_dir: Path = Field(default=REPO_ROOT / ".state")
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    kafka_heap_mb: int = 1024
    mariadb_ports: tuple[int, ...] = (3307, 3308)
    mariadb_buffer_pool_mb: int = 256
    # One GTID replica per cluster, on the primary's port plus this offset (3317, 3318).
    mariadb_replicas: bool = True
    mariadb_replica_port_offset: int = 10
    # How long a primary waits for its replica's acknowledgement before it commits without one
    # (semi-sync falls back to asynchronous replication). Long enough that a busy replica is not
    # dropped to asynchronous by a short stall (an acknowledged commit is then on the replica);
    # short enough that a hung replica stalls writes only once, for this long.
    mariadb_semi_sync_timeout_ms: int = 2000
    imap_port: int = 1143
    # The OAuth2 token server the stack runs for its OAuth2 Dovecot (on imap_port + 2).
    oauth_server_port: int = 1180
    # The main Dovecot's LMTP (Postfix delivers into it) and SASL (Postfix authenticates against
    # it) listeners, both on 127.0.0.1.
    lmtp_port: int = 1124
    dovecot_auth_port: int = 1125
    # Postfix: submission with STARTTLS and with implicit TLS, both requiring AUTH.
    submission_port: int = 2587
    smtps_port: int = 2465
    shard_count: int = 16
    # Gateway processes `flightlog services up` / `flightlog dev` start, sharing port 8080.
    gateway_processes: int = Field(default=1, ge=1, le=64)
