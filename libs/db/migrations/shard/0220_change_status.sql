-- The message status a change moved its message to (sent, delivered, undelivered, failed,
-- received, ...), NULL when the change left the status as it was or is not a message's: the
-- webhooks message.sent, message.delivered, message.undelivered and message.failed are told from
-- it, and the delta feed shows it. Additive and instant (0012's reason).
ALTER TABLE changes
    ADD COLUMN status VARCHAR(16) NULL,
    ALGORITHM = INSTANT;
