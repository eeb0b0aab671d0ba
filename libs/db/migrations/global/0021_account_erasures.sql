-- Account erasures (libs.erasure): one row per account erased or being erased. It is the job's
-- state (an erasure interrupted halfway is finished by the next DELETE) and what answers for the
-- account once its own row is gone: ids, counts and times, nothing the account held.
CREATE TABLE IF NOT EXISTS account_erasures (
    account_id     BIGINT UNSIGNED NOT NULL PRIMARY KEY,
    application_id BIGINT UNSIGNED NOT NULL,
    state          ENUM('running', 'done') NOT NULL DEFAULT 'running',
    erased         JSON            NULL,
    requested_at   DATETIME(6)     NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    finished_at    DATETIME(6)     NULL,
    KEY ix_account_erasures_application (application_id, account_id)
) ENGINE = InnoDB;

-- An application's message retention (services.gateway.retention): messages older than this are
-- erased; NULL keeps them for ever. An account may override it (shard migration 0022).
ALTER TABLE applications
    ADD COLUMN IF NOT EXISTS message_retention_s BIGINT UNSIGNED NULL;

-- An erasure finds an account's deliveries by account (the lanes' index leads with the endpoint).
ALTER TABLE webhook_deliveries
    ADD INDEX IF NOT EXISTS ix_webhook_deliveries_account (account_id, id);
