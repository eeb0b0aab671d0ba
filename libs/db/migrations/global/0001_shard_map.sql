-- The shard map: which physical cluster holds each logical shard. Every service caches it and
-- reloads it when `shard_map_version.version` changes; moving a shard is an update here.
CREATE TABLE IF NOT EXISTS clusters (
    cluster_id   SMALLINT UNSIGNED NOT NULL PRIMARY KEY,
    name         VARCHAR(64)       NOT NULL UNIQUE,
    primary_host VARCHAR(255)      NOT NULL,
    primary_port SMALLINT UNSIGNED NOT NULL,
    replica_host VARCHAR(255)      NULL,
    replica_port SMALLINT UNSIGNED NULL
) ENGINE = InnoDB;

CREATE TABLE IF NOT EXISTS shards (
    shard_id   SMALLINT UNSIGNED NOT NULL PRIMARY KEY,
    cluster_id SMALLINT UNSIGNED NOT NULL,
    state      ENUM('active', 'readonly') NOT NULL DEFAULT 'active',
    CONSTRAINT fk_shards_cluster FOREIGN KEY (cluster_id) REFERENCES clusters (cluster_id)
) ENGINE = InnoDB;

CREATE TABLE IF NOT EXISTS shard_map_version (
    id      TINYINT UNSIGNED NOT NULL PRIMARY KEY,
    version BIGINT UNSIGNED  NOT NULL
) ENGINE = InnoDB;

INSERT IGNORE INTO shard_map_version (id, version) VALUES (1, 1);
