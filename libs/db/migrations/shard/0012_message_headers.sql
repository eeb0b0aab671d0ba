-- The fields mail clients show (issue 18): the Date header as sent_at, the threading headers, and
-- every participant with its display name. ``participants`` is a JSON object with a member per
-- role ("from", "to", "cc", "bcc", "reply_to": lists of {"name", "email"}); sender, to_addrs and
-- cc_addrs keep the bare addresses the list filters read, and rows written before this migration
-- have only those (the gateway reads them as participants without names).
-- Additive and online: ALGORITHM=INSTANT changes only the metadata on MariaDB 10.3+, whatever
-- the table's size, and it fails rather than copy the table if the server cannot do it instantly.
-- One ALTER, so the columns appear whole or not at all (0002's reason).
ALTER TABLE messages
    ADD COLUMN participants   JSON          NULL,
    ADD COLUMN sent_at        DATETIME(6)   NULL,
    ADD COLUMN rfc_message_id VARCHAR(998)  NULL,
    ADD COLUMN in_reply_to    VARCHAR(998)  NULL,
    ADD COLUMN reference_ids  JSON          NULL,
    ALGORITHM = INSTANT;
