-- One logical shard. Every AUTO_INCREMENT here starts at (shard_id << 48) + 1; the migrator sets
-- it after creating the tables and the insert path checks the shard bits of every id it gets.
CREATE TABLE IF NOT EXISTS accounts (
    id             BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    application_id BIGINT UNSIGNED NOT NULL,
    email          VARCHAR(320)    NOT NULL,
    provider       VARCHAR(32)     NOT NULL DEFAULT 'events',
    created_at     DATETIME(6)     NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    KEY ix_accounts_application (application_id, id)
) ENGINE = InnoDB;

CREATE TABLE IF NOT EXISTS messages (
    id           BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    account_id   BIGINT UNSIGNED NOT NULL,
    message_key  VARBINARY(255)  NOT NULL,
    version      BIGINT UNSIGNED NOT NULL,
    created_at   DATETIME(6)     NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at   DATETIME(6)     NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    UNIQUE KEY ux_messages_account_key (account_id, message_key)
) ENGINE = InnoDB;

-- The transaction log of the shard (the Nylas "transaction table"): one row per change that
-- really altered an object, written in the same transaction as the change itself.
CREATE TABLE IF NOT EXISTS changes (
    id          BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    account_id  BIGINT UNSIGNED NOT NULL,
    object_type VARCHAR(16)     NOT NULL,
    object_id   BIGINT UNSIGNED NOT NULL,
    change_type VARCHAR(16)     NOT NULL,
    version     BIGINT UNSIGNED NOT NULL,
    created_at  DATETIME(6)     NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    KEY ix_changes_account (account_id, id)
) ENGINE = InnoDB;
