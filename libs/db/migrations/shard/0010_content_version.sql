-- Content has a version of its own (libs.events.PostflightRecord): transform drops a final
-- message's content from its state, so later records carry flags without content, and persist
-- writes content only over a lower content version. One ALTER, so the column appears whole or not
-- at all (0002's reason).
ALTER TABLE messages
    ADD COLUMN content_version BIGINT UNSIGNED NOT NULL DEFAULT 0 AFTER version;

-- Rows written before the column hold content set at their own version.
UPDATE messages SET content_version = version WHERE content_version = 0;
