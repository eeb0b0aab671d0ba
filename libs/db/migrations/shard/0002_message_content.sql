-- What a message says and where it is. One ALTER, so it applies whole or not at all (MySQL 8
-- has no ADD COLUMN IF NOT EXISTS). Bodies are stored as JSON {"text", "html"}, zlib-compressed
-- when that saves space (body_encoding 1), raw otherwise (0).
ALTER TABLE messages
    ADD COLUMN status        VARCHAR(16)      NULL,
    ADD COLUMN direction     VARCHAR(8)       NULL,
    ADD COLUMN channel       VARCHAR(32)      NULL,
    ADD COLUMN sender        VARCHAR(320)     NULL,
    ADD COLUMN to_addrs      JSON             NULL,
    ADD COLUMN cc_addrs      JSON             NULL,
    ADD COLUMN subject       VARCHAR(998)     NULL,
    ADD COLUMN snippet       VARCHAR(255)     NULL,
    ADD COLUMN body          MEDIUMBLOB       NULL,
    ADD COLUMN body_encoding TINYINT UNSIGNED NOT NULL DEFAULT 0,
    ADD COLUMN error_code    VARCHAR(64)      NULL,
    ADD COLUMN unread        TINYINT(1)       NOT NULL DEFAULT 1,
    ADD COLUMN starred       TINYINT(1)       NOT NULL DEFAULT 0,
    ADD COLUMN folder        VARCHAR(255)     NULL,
    ADD COLUMN labels        JSON             NULL,
    ADD COLUMN source        VARCHAR(64)      NULL,
    ADD COLUMN occurred_at   DATETIME(6)      NOT NULL DEFAULT '1970-01-01 00:00:01',
    ADD COLUMN final_at      DATETIME(6)      NULL,
    ADD COLUMN redacted      TINYINT(1)       NOT NULL DEFAULT 0,
    ADD COLUMN deleted       TINYINT(1)       NOT NULL DEFAULT 0,
    ADD KEY ix_messages_account_time (account_id, occurred_at, id);
