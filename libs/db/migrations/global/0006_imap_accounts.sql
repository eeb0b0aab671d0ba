-- IMAP accounts and their per-folder sync state. The account itself lives in its shard
-- (`accounts`, provider 'imap'); this is what the sync workers need to log in and resume.
-- Passwords are encrypted at rest (libs.crypto, FLIGHTLOG_SECRETS_KEY) and never returned.
-- credentials_version grows with every credentials change: a worker stopped by an
-- authentication failure starts again only for a higher version.
CREATE TABLE IF NOT EXISTS imap_accounts (
    account_id          BIGINT UNSIGNED  NOT NULL PRIMARY KEY,
    application_id      BIGINT UNSIGNED  NOT NULL,
    host                VARCHAR(255)     NOT NULL,
    port                SMALLINT UNSIGNED NOT NULL,
    tls_mode            ENUM('implicit', 'starttls', 'none') NOT NULL,
    username            VARCHAR(320)     NOT NULL,
    password_enc        VARBINARY(1024)  NOT NULL,
    credentials_version INT UNSIGNED     NOT NULL DEFAULT 1,
    state               VARCHAR(16)      NOT NULL DEFAULT 'pending',
    last_error          VARCHAR(1000)    NULL,
    last_sync_at        DATETIME(6)      NULL,
    created_at          DATETIME(6)      NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at          DATETIME(6)      NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    KEY ix_imap_accounts_application (application_id, account_id)
) ENGINE = InnoDB;

-- One row per folder seen on the server. id is stable across renames (a rename is detected by
-- an unchanged UIDVALIDITY), and message keys are derived from it, so a renamed folder's
-- messages keep their keys. deleted folders keep their row with deleted = 1.
CREATE TABLE IF NOT EXISTS imap_folders (
    id             BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    account_id     BIGINT UNSIGNED NOT NULL,
    name           VARCHAR(1000)   NOT NULL,
    role           VARCHAR(16)     NULL,
    uidvalidity    BIGINT UNSIGNED NULL,
    highestmodseq  BIGINT UNSIGNED NULL,
    uidnext        BIGINT UNSIGNED NULL,
    state          VARCHAR(16)     NOT NULL DEFAULT 'initial',
    message_count  INT UNSIGNED    NOT NULL DEFAULT 0,
    last_sync_at   DATETIME(6)     NULL,
    last_error     VARCHAR(1000)   NULL,
    deleted        TINYINT(1)      NOT NULL DEFAULT 0,
    KEY ix_imap_folders_account (account_id, id)
) ENGINE = InnoDB;
