-- Applications (tenants) and their API keys. Keys are stored as SHA-256 digests: a key is shown
-- once, at creation. Accounts live in the shard schemas and name their application.
CREATE TABLE IF NOT EXISTS applications (
    id         BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    name       VARCHAR(200)    NOT NULL,
    created_at DATETIME(6)     NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
) ENGINE = InnoDB;

CREATE TABLE IF NOT EXISTS api_keys (
    id             BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    application_id BIGINT UNSIGNED NOT NULL,
    key_hash       BINARY(32)      NOT NULL,
    key_prefix     VARCHAR(16)     NOT NULL,
    created_at     DATETIME(6)     NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    revoked_at     DATETIME(6)     NULL,
    UNIQUE KEY ux_api_keys_hash (key_hash),
    KEY ix_api_keys_application (application_id),
    CONSTRAINT fk_api_keys_application FOREIGN KEY (application_id) REFERENCES applications (id)
) ENGINE = InnoDB;
