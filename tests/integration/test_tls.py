"""TLS to MariaDB and TLS + SASL to Kafka, with the services' own connection code (libs.db,
libs.kafka, the CLI's admin client) against servers of this module's own: a MariaDB that requires
TLS for every TCP connection and a single-node KRaft Kafka with a SASL_SSL listener (SCRAM-SHA-512
and PLAIN), both started with the stack's own code (cli.stack) and certificates made by its helper.
A certificate no trusted CA signed is refused by both.
"""

from __future__ import annotations

import socket
import ssl
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncmy
import pytest
from aiokafka.errors import KafkaError

from cli.dlq import topic_partitions
from cli.stack import HOST, Kafka, KafkaSaslSsl, MariaDB, ServerTls, Stack, write_self_signed_cert
from libs.config import DatabaseSettings, KafkaSettings, StackSettings
from libs.db import connect, create_pool
from libs.kafka import TopicSpec, create_topics, make_consumer, make_producer

pytestmark = pytest.mark.integration

KAFKA_USER, KAFKA_PASSWORD = "flightlog-client", "sasl-test-password"
X509_USER, X509_PASSWORD = "x509_client", "x509-test-password"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class TlsServers:
    mariadb_port: int
    kafka_port: int  # the SASL_SSL listener
    ca: Path  # signed the servers' certificate
    other_ca: Path  # signed nothing the servers present
    client_cert: Path  # signed by ``ca``: a client certificate the MariaDB server accepts
    client_key: Path


@pytest.fixture(scope="module")
def tls_servers(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServers]:
    root = tmp_path_factory.mktemp("tls")
    ca, key = root / "server.pem", root / "server.key"
    write_self_signed_cert(ca, key, HOST)  # a CA certificate for 127.0.0.1 and localhost
    other_ca = root / "other.pem"
    write_self_signed_cert(other_ca, root / "other.key", HOST)
    tls = ServerTls(cert=ca, key=key, ca=ca)
    mariadb = MariaDB(
        StackSettings(
            state_dir=root, mariadb_ports=(_free_port(),), mariadb_replicas=False, mariadb_buffer_pool_mb=32
        ),
        0,
        tls=tls,
    )
    kafka_port = _free_port()
    kafka = Kafka(
        # the stack's state directory: Maven's classpath of the jars, resolved once
        StackSettings(
            state_dir=stack.settings.state_dir,
            kafka_port=_free_port(),
            kafka_controller_port=_free_port(),
            kafka_heap_mb=256,
        ),
        dir=root / "kafka",
        sasl_ssl=KafkaSaslSsl(port=kafka_port, tls=tls, users=((KAFKA_USER, KAFKA_PASSWORD),)),
    )
    try:
        with ThreadPoolExecutor(2) as pool:
            for started in [pool.submit(mariadb.up), pool.submit(kafka.up)]:
                started.result()
        mariadb.query(
            f"CREATE USER IF NOT EXISTS '{X509_USER}'@'%' IDENTIFIED BY '{X509_PASSWORD}' REQUIRE X509;"
            f"GRANT SELECT ON *.* TO '{X509_USER}'@'%'"
        )
        yield TlsServers(mariadb.port, kafka_port, ca, other_ca, client_cert=ca, client_key=key)
    finally:
        kafka.down()
        mariadb.down()


def _db(servers: TlsServers, **overrides: Any) -> DatabaseSettings:
    return DatabaseSettings(global_db_port=servers.mariadb_port, db_connect_timeout_s=10, **overrides)


async def _tls_version(settings: DatabaseSettings) -> str:
    async with connect(settings, HOST, settings.global_db_port) as conn, conn.cursor() as cur:
        await cur.execute("SHOW SESSION STATUS LIKE 'Ssl_version'")
        (_, version) = await cur.fetchone()
        return str(version)


def _verify_failed(exc: BaseException) -> bool:
    """Whether a certificate verification failure is among ``exc``'s causes or its message."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def test_mariadb_connections_use_verified_tls(tls_servers: TlsServers) -> None:
    verified = _db(tls_servers, db_tls=True, db_tls_ca_file=tls_servers.ca)
    assert (await _tls_version(verified)).startswith("TLSv1.")
    pool = await create_pool(verified, HOST, tls_servers.mariadb_port)
    try:
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
            assert (await cur.fetchone())[1]
    finally:
        pool.close()
        await pool.wait_closed()
    # the server refuses a connection without TLS
    with pytest.raises(asyncmy.errors.OperationalError):
        await _tls_version(_db(tls_servers))


async def test_mariadb_refuses_a_certificate_no_trusted_ca_signed(tls_servers: TlsServers) -> None:
    with pytest.raises(asyncmy.errors.OperationalError) as raised:
        await _tls_version(_db(tls_servers, db_tls=True, db_tls_ca_file=tls_servers.other_ca))
    assert _verify_failed(raised.value), repr(raised.value)


async def test_mariadb_client_certificate(tls_servers: TlsServers) -> None:
    """A user created with REQUIRE X509 gets in with the client certificate, not without."""
    login = {
        "db_user": X509_USER,
        "db_password": X509_PASSWORD,
        "db_tls": True,
        "db_tls_ca_file": tls_servers.ca,
    }
    with_cert = _db(
        tls_servers, **login, db_tls_cert_file=tls_servers.client_cert, db_tls_key_file=tls_servers.client_key
    )
    assert (await _tls_version(with_cert)).startswith("TLSv1.")
    with pytest.raises(asyncmy.errors.OperationalError) as raised:
        await _tls_version(_db(tls_servers, **login))
    assert raised.value.args[0] == 1045  # access denied


def _kafka(servers: TlsServers, **overrides: Any) -> KafkaSettings:
    options: dict[str, Any] = {
        "kafka_bootstrap_servers": f"{HOST}:{servers.kafka_port}",
        "kafka_request_timeout_ms": 10_000,
        "kafka_security_protocol": "SASL_SSL",
        "kafka_sasl_username": KAFKA_USER,
        "kafka_sasl_password": KAFKA_PASSWORD,
        "kafka_tls_ca_file": servers.ca,
    }
    return KafkaSettings(**{**options, **overrides})


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "PLAIN"])
async def test_kafka_clients_over_sasl_ssl(tls_servers: TlsServers, mechanism: str) -> None:
    settings = _kafka(tls_servers, kafka_sasl_mechanism=mechanism)
    topic = f"tls-{mechanism.lower()}-{uuid.uuid4().hex[:8]}"
    assert await create_topics(settings, (TopicSpec(topic, 2),)) == [topic]  # the admin client
    assert len(await topic_partitions(settings, topic)) == 2  # the CLI's admin client (flightlog dlq)
    async with make_producer(settings, transactional_id=f"{topic}-txn") as producer:
        async with producer.transaction():
            await producer.send(topic, b"over tls", key=b"k")
    async with make_consumer(settings, topic, group_id=f"{topic}-group") as consumer:
        record = await consumer.getone()
        assert record.value == b"over tls"
        await consumer.commit()


async def test_kafka_refuses_an_unverified_certificate_and_a_wrong_login(
    tls_servers: TlsServers, caplog: pytest.LogCaptureFixture
) -> None:
    """Each refused connection ends the same way for the caller ("Unable to bootstrap"); the
    client's log says why, and that is what is checked."""
    cases = {
        "CERTIFICATE_VERIFY_FAILED": _kafka(tls_servers, kafka_tls_ca_file=tls_servers.other_ca),
        "invalid credentials with SASL mechanism SCRAM-SHA-512": _kafka(
            tls_servers, kafka_sasl_password="wrong"
        ),
        "Invalid username or password": _kafka(
            tls_servers, kafka_sasl_mechanism="PLAIN", kafka_sasl_password="wrong"
        ),
    }
    for reason, settings in cases.items():
        caplog.clear()
        with pytest.raises(KafkaError):
            await create_topics(settings, (TopicSpec(f"tls-refused-{uuid.uuid4().hex[:8]}", 1),))
        assert reason in caplog.text, caplog.text
    # and a client without TLS gets nothing from the TLS listener
    with pytest.raises(KafkaError):
        await create_topics(
            _kafka(tls_servers, kafka_security_protocol="SASL_PLAINTEXT", kafka_request_timeout_ms=3_000),
            (TopicSpec(f"tls-refused-{uuid.uuid4().hex[:8]}", 1),),
        )


def test_settings_refuse_sasl_without_a_login() -> None:
    with pytest.raises(ValueError, match="FLIGHTLOG_KAFKA_SASL_USERNAME"):
        KafkaSettings(kafka_security_protocol="SASL_SSL")
    with pytest.raises(ValueError, match="go together"):
        DatabaseSettings(db_tls=True, db_tls_cert_file=Path("c.pem"))
