-- How an endpoint orders deliveries around an event its receiver refuses permanently (a 4xx other
-- than 408 and 429). skip_refused (the default, existing endpoints included): after
-- webhooks_refused_max_attempts refusals in a row the delivery is marked failed, stays in the log
-- and can be replayed, and the account's later events go on. strict: the refused event holds its
-- account back, retried like any failure until the retry window ends and the endpoint is disabled.
ALTER TABLE webhook_endpoints
    ADD COLUMN IF NOT EXISTS ordering ENUM('skip_refused', 'strict') NOT NULL DEFAULT 'skip_refused';

-- Permanent refusals in a row of one delivery (reset by any other failure), which bound its
-- attempts under skip_refused. A replay starts again from 0.
ALTER TABLE webhook_deliveries
    ADD COLUMN IF NOT EXISTS refusals INT UNSIGNED NOT NULL DEFAULT 0;
