"""Client TLS contexts for the servers flightlog connects to (MariaDB/MySQL, Kafka).

A context always verifies the server's certificate: against the given CA bundle (else the system's
CAs) and, unless told otherwise, the server's host name. There is no setting that turns
verification off. A client certificate is optional (servers that ask for mutual TLS).
"""

from __future__ import annotations

import functools
import ssl
from pathlib import Path

__all__ = ["TlsSettingsError", "client_context"]


class TlsSettingsError(ValueError):
    """A client certificate without its key, or the other way round."""


def client_context(
    ca_file: Path | None,
    *,
    verify_hostname: bool = True,
    cert_file: Path | None = None,
    key_file: Path | None = None,
) -> ssl.SSLContext:
    """A verifying client context (TLS 1.2 at least); cached, since every new connection of a
    pool asks for one and loading a CA bundle costs milliseconds."""
    if (cert_file is None) != (key_file is None):
        raise TlsSettingsError("a client certificate needs both its certificate file and its key file")
    return _context(ca_file, verify_hostname, cert_file, key_file)


@functools.lru_cache(maxsize=16)
def _context(
    ca_file: Path | None, verify_hostname: bool, cert_file: Path | None, key_file: Path | None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = verify_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    if cert_file is not None and key_file is not None:
        context.load_cert_chain(str(cert_file), str(key_file))
    return context
