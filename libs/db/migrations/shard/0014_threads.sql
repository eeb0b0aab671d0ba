-- Threads (issue 18): one row per (account, thread_key), the aggregate of the thread's messages
-- that are not deleted. persist recomputes a thread from its messages in the transaction that
-- changes one of them (services/persist/threads.py), so a replay recomputes the same values and
-- changes nothing. ``version`` counts the thread's real changes (1 when created);
-- ``change_token`` is the token of the write that last changed the aggregate, which is how that
-- write tells its own changes from the rows it left alone (RETURNING cannot show the old row).
-- ``content_mark`` (BIT_XOR of the messages' content versions) makes a late content fill of a
-- message a change of its thread too (participants are read from the messages). Ids carry the
-- shard like every id here (the migrator sets the AUTO_INCREMENT start).
CREATE TABLE IF NOT EXISTS threads (
    id              BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    account_id      BIGINT UNSIGNED NOT NULL,
    thread_key      VARCHAR(64)     NOT NULL,
    message_count   INT UNSIGNED    NOT NULL,
    unread_count    INT UNSIGNED    NOT NULL,
    last_message_at DATETIME(6)     NULL,
    subject         VARCHAR(998)    NULL,
    content_mark    BIGINT UNSIGNED NOT NULL,
    version         BIGINT UNSIGNED NOT NULL,
    change_token    BIGINT UNSIGNED NOT NULL,
    updated_at      DATETIME(6)     NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    UNIQUE KEY ux_threads_account_key (account_id, thread_key),
    KEY ix_threads_account_time (account_id, last_message_at, id)
) ENGINE = InnoDB;

-- The counter's start must be set before the backfill below takes ids (the migrator sets it only
-- after the whole file): (shard << 48) + 1, the shard read from the schema's name
-- (flightlog_shard_NNNN, libs.db.shard_schema).
SET @threads_auto_increment = CONCAT(
    'ALTER TABLE threads AUTO_INCREMENT = ', (CAST(SUBSTRING_INDEX(DATABASE(), '_', -1) AS UNSIGNED) << 48) + 1);
PREPARE threads_auto_increment FROM @threads_auto_increment;
EXECUTE threads_auto_increment;
DEALLOCATE PREPARE threads_auto_increment;

-- The threads of messages written before this migration (no change rows: nothing changed).
-- Safe to run again: INSERT IGNORE keeps rows already there.
INSERT IGNORE INTO threads
    (account_id, thread_key, message_count, unread_count, last_message_at, subject, content_mark, version, change_token)
SELECT account_id, thread_key, SUM(deleted = 0), SUM(unread AND deleted = 0),
    MAX(IF(deleted, NULL, occurred_at)),
    SUBSTRING(MIN(IF(deleted, NULL, CONCAT(DATE_FORMAT(occurred_at, '%Y%m%d%H%i%s%f'), subject))), 21),
    BIT_XOR(IF(deleted, 0, content_version)), 1, 0
FROM messages WHERE thread_key IS NOT NULL GROUP BY account_id, thread_key;
