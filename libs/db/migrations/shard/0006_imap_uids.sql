-- The messages of each synced IMAP folder as the sync last saw them: which UID is which message
-- key, and its flags (for servers without CONDSTORE, where flags are compared). A row is written
-- only after Kafka acknowledged the message's synced event, so a restarted or moved sync resumes
-- from here without duplicating or missing a message.
CREATE TABLE IF NOT EXISTS imap_uids (
    account_id  BIGINT UNSIGNED NOT NULL,
    folder_id   BIGINT UNSIGNED NOT NULL,
    uid         INT UNSIGNED    NOT NULL,
    message_key VARBINARY(255)  NOT NULL,
    flags       VARCHAR(500)    NOT NULL DEFAULT '',
    PRIMARY KEY (account_id, folder_id, uid)
) ENGINE = InnoDB;
