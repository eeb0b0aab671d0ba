-- Where an account sends its mail (issue 21): the SMTP submission server and, unless the
-- account reuses its IMAP login (username and password_enc NULL), its own credentials,
-- encrypted at rest like the IMAP password (libs.crypto) and never returned.
CREATE TABLE IF NOT EXISTS smtp_accounts (
    account_id      BIGINT UNSIGNED   NOT NULL PRIMARY KEY,
    application_id  BIGINT UNSIGNED   NOT NULL,
    host            VARCHAR(255)      NOT NULL,
    port            SMALLINT UNSIGNED NOT NULL,
    tls_mode        ENUM('implicit', 'starttls') NOT NULL,
    username        VARCHAR(320)      NULL,
    password_enc    VARBINARY(1024)   NULL,
    created_at      DATETIME(6)       NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at      DATETIME(6)       NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6)
) ENGINE = InnoDB;
