-- The change relay's durable position per shard: the highest `changes.id` of that shard whose
-- Kafka publication has been acknowledged. Moved forward only after the acks (at least once).
CREATE TABLE IF NOT EXISTS relay_positions (
    shard_id       SMALLINT UNSIGNED NOT NULL PRIMARY KEY,
    last_change_id BIGINT UNSIGNED   NOT NULL,
    updated_at     DATETIME(6)       NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6)
) ENGINE = InnoDB;

-- Webhook subscriptions of applications. Secrets are encrypted at rest (Fernet); during a rotation
-- the previous secret stays valid until previous_secret_expires_at and deliveries carry both
-- signatures. account_ids NULL means every account of the application.
CREATE TABLE IF NOT EXISTS webhook_endpoints (
    id                         BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    application_id             BIGINT UNSIGNED NOT NULL,
    url                        VARCHAR(2048)   NOT NULL,
    description                VARCHAR(500)    NOT NULL DEFAULT '',
    event_types                JSON            NOT NULL,
    account_ids                JSON            NULL,
    secret_enc                 VARBINARY(512)  NOT NULL,
    previous_secret_enc        VARBINARY(512)  NULL,
    previous_secret_expires_at DATETIME(6)     NULL,
    enabled                    TINYINT(1)      NOT NULL DEFAULT 1,
    disabled_reason            VARCHAR(1000)   NULL,
    disabled_at                DATETIME(6)     NULL,
    deleted                    TINYINT(1)      NOT NULL DEFAULT 0,
    created_at                 DATETIME(6)     NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at                 DATETIME(6)     NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    KEY ix_webhook_endpoints_application (application_id, id),
    CONSTRAINT fk_webhook_endpoints_application FOREIGN KEY (application_id) REFERENCES applications (id)
) ENGINE = InnoDB;

-- Bumped by every change to webhook_endpoints, so dispatchers reload their cache before routing
-- a change committed after the subscription (one primary-key read per consumed batch).
CREATE TABLE IF NOT EXISTS webhook_endpoints_version (
    id      TINYINT UNSIGNED NOT NULL PRIMARY KEY,
    version BIGINT UNSIGNED  NOT NULL
) ENGINE = InnoDB;

INSERT IGNORE INTO webhook_endpoints_version (id, version) VALUES (1, 1);

-- One row per (endpoint, event) to deliver, written before the dispatcher commits the Kafka offset
-- of the change; delivered from here. dedupe = change_id for the original (so re-consuming a
-- change after a crash inserts nothing), NULL for replays. webhook_id is the same on every attempt
-- and on replays. A lane (endpoint, account) is sent in change_id order: the shard's commit order.
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id              BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    endpoint_id     BIGINT UNSIGNED NOT NULL,
    account_id      BIGINT UNSIGNED NOT NULL,
    change_id       BIGINT UNSIGNED NOT NULL,
    dedupe          BIGINT UNSIGNED NULL,
    webhook_id      VARCHAR(64)     NOT NULL,
    event_type      VARCHAR(64)     NOT NULL,
    payload         MEDIUMBLOB      NOT NULL,
    state           ENUM('pending', 'delivered', 'failed', 'cancelled') NOT NULL DEFAULT 'pending',
    attempts        INT UNSIGNED    NOT NULL DEFAULT 0,
    next_attempt_at DATETIME(6)     NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    last_status     SMALLINT        NULL,
    last_error      VARCHAR(1000)   NULL,
    replay_of       BIGINT UNSIGNED NULL,
    created_at      DATETIME(6)     NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    event_at        DATETIME(6)     NOT NULL,
    finished_at     DATETIME(6)     NULL,
    UNIQUE KEY ux_webhook_deliveries_dedupe (endpoint_id, dedupe),
    KEY ix_webhook_deliveries_lane (endpoint_id, account_id, state, change_id, id),
    KEY ix_webhook_deliveries_pending (state, endpoint_id, account_id),
    KEY ix_webhook_deliveries_time (endpoint_id, created_at),
    KEY ix_webhook_deliveries_finished (finished_at)
) ENGINE = InnoDB;

-- The delivery log: every attempt with its outcome.
CREATE TABLE IF NOT EXISTS webhook_attempts (
    id               BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    delivery_id      BIGINT UNSIGNED NOT NULL,
    endpoint_id      BIGINT UNSIGNED NOT NULL,
    attempt          INT UNSIGNED    NOT NULL,
    started_at       DATETIME(6)     NOT NULL,
    latency_ms       INT UNSIGNED    NOT NULL,
    status_code      SMALLINT        NULL,
    error            VARCHAR(1000)   NULL,
    response_excerpt VARBINARY(1024) NULL,
    KEY ix_webhook_attempts_delivery (delivery_id, id),
    KEY ix_webhook_attempts_endpoint (endpoint_id, id)
) ENGINE = InnoDB;
