-- What MIME parsing adds to a message (libs.mime): thread key, true size, attachment metadata
-- and parse warnings. One ALTER, so it applies whole or not at all.
ALTER TABLE messages
    ADD COLUMN thread_key     VARCHAR(64)     NULL,
    ADD COLUMN size_bytes     BIGINT UNSIGNED NULL,
    ADD COLUMN attachments    JSON            NULL,
    ADD COLUMN parse_warnings JSON            NULL,
    ADD KEY ix_messages_thread (account_id, thread_key);
