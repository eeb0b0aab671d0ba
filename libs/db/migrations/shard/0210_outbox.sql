-- The outbox of sent mail (issue 21): one row per message an account sends, written by the
-- gateway before it answers 202 and worked through by the sender. The primary key makes the
-- idempotency key (part of message_key) send one message. ``state`` records the submission
-- before and after the SMTP conversation: 'pending' (not submitted; safe to submit),
-- 'submitting' (the end of DATA may have reached the server: never submitted again),
-- 'submitted' (the server answered 250, queue_id is its id), 'failed' (refused for good).
-- A sender claims a row by writing its lease (lease_owner, lease_until), so two senders never
-- work on one message at once.
CREATE TABLE IF NOT EXISTS outbox (
    account_id      BIGINT UNSIGNED  NOT NULL,
    message_key     VARBINARY(255)   NOT NULL,
    request         MEDIUMBLOB       NOT NULL,
    request_sha256  BINARY(32)       NOT NULL,
    state           ENUM('pending', 'submitting', 'submitted', 'failed') NOT NULL DEFAULT 'pending',
    attempts        INT UNSIGNED     NOT NULL DEFAULT 0,
    next_attempt_at DATETIME(6)      NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    lease_owner     VARCHAR(64)      NULL,
    lease_until     DATETIME(6)      NULL,
    queue_id        VARCHAR(255)     NULL,
    last_error      VARCHAR(1000)    NULL,
    created_at      DATETIME(6)      NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at      DATETIME(6)      NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    PRIMARY KEY (account_id, message_key),
    KEY ix_outbox_due (state, next_attempt_at)
) ENGINE = InnoDB;
