-- API keys an owner manages: a name to tell them apart and the scopes each may use. Existing
-- keys keep every scope, as before.
ALTER TABLE api_keys
    ADD COLUMN name   text   NOT NULL DEFAULT 'default',
    ADD COLUMN scopes text[] NOT NULL DEFAULT ARRAY['jobs:read', 'jobs:write', 'account:read'];

-- An account's keys, listed by the owner.
CREATE INDEX api_keys_by_account ON api_keys (account_id, id);
