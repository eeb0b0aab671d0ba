-- How far the change log has been trimmed (services.gateway.retention): every change with
-- id <= trimmed_through may be gone. A delta cursor below it answers 410; the mark is raised in
-- the same transaction that deletes, so a reader sees either both or neither.
CREATE TABLE IF NOT EXISTS changes_retention (
    id              TINYINT UNSIGNED NOT NULL PRIMARY KEY,
    trimmed_through BIGINT UNSIGNED  NOT NULL,
    trimmed_at      DATETIME(6)      NULL
) ENGINE = InnoDB;

INSERT IGNORE INTO changes_retention (id, trimmed_through) VALUES (1, 0);
