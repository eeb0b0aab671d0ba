-- Every failover of a cluster's primary (libs.shardops.failover), written in the transaction that
-- publishes the new shard map version. The old primary leaves `clusters` (the promoted replica
-- takes its place and the cluster has no replica until one is rebuilt), so this is where it is
-- still named: whether it was fenced (reachable and set read_only) or was dead, and the GTID
-- position the promoted server started from, for rebuilding it as a replica. A cluster with a
-- failover on record keeps the map's addresses when `db migrate` registers clusters again.
CREATE TABLE IF NOT EXISTS cluster_failovers (
    id                BIGINT UNSIGNED   NOT NULL AUTO_INCREMENT PRIMARY KEY,
    cluster_id        SMALLINT UNSIGNED NOT NULL,
    old_primary_host  VARCHAR(255)      NOT NULL,
    old_primary_port  SMALLINT UNSIGNED NOT NULL,
    new_primary_host  VARCHAR(255)      NOT NULL,
    new_primary_port  SMALLINT UNSIGNED NOT NULL,
    fenced            TINYINT(1)        NOT NULL,
    gtid_position     VARCHAR(4096)     NOT NULL,
    reason            VARCHAR(1000)     NOT NULL,
    shard_map_version BIGINT UNSIGNED   NOT NULL,
    started_at        DATETIME(6)       NOT NULL,
    finished_at       DATETIME(6)       NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    KEY ix_cluster_failovers_cluster (cluster_id, id),
    CONSTRAINT fk_cluster_failovers_cluster FOREIGN KEY (cluster_id) REFERENCES clusters (cluster_id)
) ENGINE = InnoDB;
