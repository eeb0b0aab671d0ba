-- An account's own message retention, over its application's (global applications
-- .message_retention_s); NULL follows the application. On the account's row, so the retention job
-- of a shard reads it there and an erasure takes it with the row. Additive and instant (0012's
-- reason).
ALTER TABLE accounts
    ADD COLUMN message_retention_s BIGINT UNSIGNED NULL,
    ALGORITHM = INSTANT;

-- Accounts erased from this shard (libs.erasure): the id and when, nothing the account held. An
-- erasure writes it before it deletes the account's row, so a postflight record still in flight
-- for the account finds either the row (share-locked: the erasure waits for that write, then
-- erases what it wrote) or this, and is dropped (services.persist.writer).
CREATE TABLE IF NOT EXISTS erased_accounts (
    account_id BIGINT UNSIGNED NOT NULL PRIMARY KEY,
    erased_at  DATETIME(6)     NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
) ENGINE = InnoDB;
