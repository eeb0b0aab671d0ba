-- What persist's upsert found in a row before it wrote it: the upsert assigns these first, from
-- the stored values, and returns them (RETURNING), so the writer knows each row's state before
-- its batch (what changed, from which status, out of which thread) without reading the rows
-- first. prev_version NULL in a returned row: the statement inserted it. Written only by that
-- statement and read only from its RETURNING: between two writes they say nothing.
-- Additive and instant (0012's reason), in one ALTER (0002's reason), safe to run again.
ALTER TABLE messages
    ADD COLUMN IF NOT EXISTS prev_version         BIGINT UNSIGNED NULL,
    ADD COLUMN IF NOT EXISTS prev_content_version BIGINT UNSIGNED NULL,
    ADD COLUMN IF NOT EXISTS prev_redacted        TINYINT(1)      NULL,
    ADD COLUMN IF NOT EXISTS prev_deleted         TINYINT(1)      NULL,
    ADD COLUMN IF NOT EXISTS prev_thread_key      VARCHAR(64)     NULL,
    ADD COLUMN IF NOT EXISTS prev_status          VARCHAR(16)     NULL,
    ALGORITHM = INSTANT;
