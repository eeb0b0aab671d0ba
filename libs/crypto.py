"""Secrets encrypted at rest (IMAP passwords): Fernet (AES-128-CBC + HMAC-SHA256) with key rotation.

``FLIGHTLOG_SECRETS_KEY`` holds one or more url-safe base64 Fernet keys separated by commas; the
first encrypts, all of them decrypt (``MultiFernet``), so a key is rotated by putting the new key
first and re-encrypting at leisure. The default key is for development and tests only: it is in
the repository, so anything encrypted with it is as good as plain text. Production sets its own
(``python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'``).

Exceptions::

    CryptoError
     └── UndecryptableSecret  (wrong key, or tampered ciphertext; not retriable)
"""

from __future__ import annotations

from typing import Final

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEV_SECRETS_KEY", "CryptoError", "SecretBox", "SecretsSettings", "UndecryptableSecret"]

DEV_SECRETS_KEY: Final = "kq0hS3Kc3F8cU4H3a0q2l7QvO0p0x4uV3Wm1n5bX8Zs="


class CryptoError(Exception):
    retriable = False


class UndecryptableSecret(CryptoError):
    """The ciphertext was not made by any of the configured keys, or was altered."""


class SecretsSettings(BaseSettings):
    """``secrets_key``: comma-separated Fernet keys that encrypt IMAP passwords at rest.

    The first key encrypts, every key decrypts, so a key is rotated by putting the new one first.
    The default is for development only.
    """

    model_config = SettingsConfigDict(env_prefix="FLIGHTLOG_", extra="ignore", frozen=True)

    secrets_key: str = DEV_SECRETS_KEY


class SecretBox:
    """Encrypts and decrypts short secrets.

    :param keys: comma-separated Fernet keys; the first one encrypts.
    """

    def __init__(self, keys: str) -> None:
        parts = [k.strip() for k in keys.split(",") if k.strip()]
        if not parts:
            raise CryptoError("no secrets key configured (FLIGHTLOG_SECRETS_KEY)")
        self._fernet = MultiFernet([Fernet(k.encode()) for k in parts])

    @classmethod
    def from_settings(cls, settings: SecretsSettings | None = None) -> SecretBox:
        return cls((settings or SecretsSettings()).secrets_key)

    def encrypt(self, plaintext: str) -> bytes:
        return self._fernet.encrypt(plaintext.encode())

    def decrypt(self, token: bytes) -> str:
        try:
            return self._fernet.decrypt(bytes(token)).decode()
        except InvalidToken as exc:
            raise UndecryptableSecret("secret cannot be decrypted with the configured keys") from exc
