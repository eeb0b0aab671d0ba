-- Change rows must commit in id order, or a reader that tails `changes` by id (the relay, a delta
-- cursor) could pass an id whose transaction commits later and miss it for good. Every
-- transaction that writes change rows first locks this one row, so ids are handed out and
-- committed in the same order. The lock is taken just before the change rows are inserted and
-- held only until the commit.
CREATE TABLE IF NOT EXISTS changes_lock (
    id TINYINT UNSIGNED NOT NULL PRIMARY KEY
) ENGINE = InnoDB;

INSERT IGNORE INTO changes_lock (id) VALUES (1);
