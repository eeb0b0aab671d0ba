-- IMAP accounts that log in with OAuth2 (issue 20): the provider, the SASL mechanism (NULL: the
-- server's choice, OAUTHBEARER when offered, else XOAUTH2), the refresh token and the last access
-- token, both encrypted like password_enc (libs.crypto), and when that access token expires
-- (NULL: not known). A password account keeps auth_method 'password' and these columns NULL.
-- Token sizes: libs.oauth.MAX_REFRESH_TOKEN_CHARS (4,096) and MAX_ACCESS_TOKEN_CHARS (8,192),
-- encrypted with Fernet (about 4/3 of the length plus 100 bytes).
ALTER TABLE imap_accounts
    ADD COLUMN IF NOT EXISTS auth_method ENUM('password', 'oauth2') NOT NULL DEFAULT 'password',
    ADD COLUMN IF NOT EXISTS oauth_provider VARCHAR(16) NULL,
    ADD COLUMN IF NOT EXISTS sasl_mechanism VARCHAR(16) NULL,
    ADD COLUMN IF NOT EXISTS refresh_token_enc VARBINARY(6144) NULL,
    ADD COLUMN IF NOT EXISTS access_token_enc VARBINARY(12288) NULL,
    ADD COLUMN IF NOT EXISTS access_token_expires_at DATETIME(6) NULL;
