-- API keys an owner manages: a name to tell them apart, the scopes each may use, and when each
-- was last used (to the minute). Existing keys keep every scope, as before.
ALTER TABLE api_keys
    ADD COLUMN name         text        NOT NULL DEFAULT 'default',
    ADD COLUMN scopes       text[]      NOT NULL DEFAULT ARRAY['jobs:read', 'jobs:write', 'account:read'],
    ADD COLUMN last_used_at timestamptz;

-- An account's keys, listed by the owner.
CREATE INDEX api_keys_by_account ON api_keys (account_id, id);
