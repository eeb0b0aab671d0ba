"""Key rotation of secrets at rest: the first Fernet key of a list encrypts, every key decrypts.
IMAP passwords (FLIGHTLOG_SECRETS_KEY) and webhook endpoint secrets
(FLIGHTLOG_WEBHOOKS_SECRET_KEY) both go through :class:`libs.crypto.SecretBox`."""

from __future__ import annotations

from typing import Any, cast

import pytest
from cryptography.fernet import Fernet

from libs.crypto import SecretBox, UndecryptableSecret
from services.gateway.webhooks.store import WebhookStore


def test_a_new_key_first_still_decrypts_what_the_old_one_encrypted() -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    before = SecretBox(old).encrypt("imap password")
    rotated = SecretBox(f"{new},{old}")
    assert rotated.decrypt(before) == "imap password"
    after = rotated.encrypt("webhook secret")
    assert SecretBox(new).decrypt(after) == "webhook secret"  # encrypted with the new key
    with pytest.raises(UndecryptableSecret):
        SecretBox(new).decrypt(before)  # once the old key is dropped, its ciphertexts are gone


def test_the_webhook_store_takes_a_key_list() -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    store = WebhookStore(cast(Any, None), f"{new},{old}")  # the router is not used to build it
    assert store is not None
