"""Production refuses the repository's secrets: a service started with ``FLIGHTLOG_ENVIRONMENT``
production (the default) and a built-in or short key exits at once, naming the variables; in
development the same settings start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cryptography.fernet import Fernet

from libs.config import MIN_KEY_CHARS, InsecureSettings, ServiceSettings, insecure_secrets
from libs.crypto import DEV_SECRETS_KEY, SecretsSettings
from libs.service import check_secrets
from services.gateway.service import DEFINITION as GATEWAY
from services.gateway.settings import GatewaySettings
from services.gateway.webhooks.settings import WebhookSettings

STRONG = "x" * MIN_KEY_CHARS


def good_env() -> dict[str, str]:
    return {
        "FLIGHTLOG_DB_PASSWORD": "a-password-of-the-operator",
        "FLIGHTLOG_ADMIN_API_KEY": STRONG,
        "FLIGHTLOG_GATEWAY_TOKEN_SECRET": STRONG,
        "FLIGHTLOG_SECRETS_KEY": Fernet.generate_key().decode(),
        "FLIGHTLOG_WEBHOOKS_SECRET_KEY": Fernet.generate_key().decode(),
    }


def test_every_built_in_secret_is_named() -> None:
    settings, secrets, webhooks = ServiceSettings(), SecretsSettings(), WebhookSettings()
    problems = insecure_secrets(
        [(settings, "db_password"), (settings, "admin_api_key"), (secrets, "secrets_key"),
         (webhooks, "webhooks_secret_key"), (GatewaySettings(), "gateway_token_secret")]
    )  # fmt: skip
    named = " ".join(problems)
    for variable in (
        "DB_PASSWORD",
        "ADMIN_API_KEY",
        "SECRETS_KEY",
        "WEBHOOKS_SECRET_KEY",
        "GATEWAY_TOKEN_SECRET",
    ):
        assert f"FLIGHTLOG_{variable} is the built-in development value" in named
    assert len(problems) == 5


def test_short_keys_and_a_built_in_key_kept_for_rotation_are_refused() -> None:
    short = ServiceSettings(admin_api_key="x" * (MIN_KEY_CHARS - 1), db_password="short")
    assert insecure_secrets([(short, "admin_api_key"), (short, "db_password")]) == [
        f"FLIGHTLOG_ADMIN_API_KEY is shorter than {MIN_KEY_CHARS} characters"
    ]  # the database password's strength is the database's business; only the default is refused
    rotated = SecretsSettings(secrets_key=f"{Fernet.generate_key().decode()},{DEV_SECRETS_KEY}")
    assert "built-in" in insecure_secrets([(rotated, "secrets_key")])[0]
    fresh = SecretsSettings(secrets_key=f"{Fernet.generate_key().decode()},{Fernet.generate_key().decode()}")
    assert insecure_secrets([(fresh, "secrets_key")]) == []


def test_the_check_names_the_gateways_secrets_and_development_allows_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in good_env().items():
        monkeypatch.setenv(name, value)
    check_secrets(GATEWAY, ServiceSettings())  # all set: starts
    monkeypatch.delenv("FLIGHTLOG_GATEWAY_TOKEN_SECRET")
    with pytest.raises(InsecureSettings, match="FLIGHTLOG_GATEWAY_TOKEN_SECRET") as refused:
        check_secrets(GATEWAY, ServiceSettings())
    assert "FLIGHTLOG_ENVIRONMENT=development" in str(refused.value)
    monkeypatch.setenv("FLIGHTLOG_ENVIRONMENT", "development")
    check_secrets(GATEWAY, ServiceSettings())


@pytest.mark.parametrize("service", ["gateway", "ingest", "transform", "persist", "gateway.webhooks"])
def test_a_service_process_with_the_built_in_secrets_exits_at_once_naming_them(service: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLIGHTLOG_")}
    env["FLIGHTLOG_LOG_FORMAT"] = "console"
    done = subprocess.run(
        [sys.executable, "-m", f"services.{service}"], env=env, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "refuses to start in production" in done.stdout + done.stderr
    assert "FLIGHTLOG_DB_PASSWORD is the built-in development value" in done.stdout + done.stderr
