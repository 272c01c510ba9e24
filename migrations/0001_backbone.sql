-- Accounts, API keys, worker nodes, jobs and shards, and the double-entry ledger.

CREATE TABLE accounts (
    id          uuid PRIMARY KEY,
    name        text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('customer', 'node', 'system')),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The system account owns issuance (where deposits come from) and revenue (gateway fees).
INSERT INTO accounts (id, name, kind) VALUES ('00000000-0000-0000-0000-000000000000', 'system', 'system');

CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    account_id  uuid NOT NULL REFERENCES accounts(id),
    -- sha256 of the key: keys are 256-bit random, so a fast hash is enough and lookups stay O(1).
    key_hash    bytea NOT NULL UNIQUE,
    prefix      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- Ledger accounts: one per (owner, purpose). Only issuance may go negative.
CREATE TABLE ledger_accounts (
    id          bigserial PRIMARY KEY,
    owner       uuid NOT NULL REFERENCES accounts(id),
    purpose     text NOT NULL CHECK (purpose IN ('available', 'held', 'earnings', 'issuance', 'revenue')),
    balance     bigint NOT NULL DEFAULT 0,
    UNIQUE (owner, purpose),
    CONSTRAINT ledger_accounts_non_negative CHECK (balance >= 0 OR purpose = 'issuance')
);

INSERT INTO ledger_accounts (owner, purpose) VALUES
    ('00000000-0000-0000-0000-000000000000', 'issuance'),
    ('00000000-0000-0000-0000-000000000000', 'revenue');

CREATE TABLE ledger_transactions (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('deposit', 'escrow_hold', 'escrow_release')),
    job_id      uuid,
    memo        text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- A job's escrow is held once and released once, whatever retries or replicas do.
CREATE UNIQUE INDEX ledger_transactions_once_per_job ON ledger_transactions (job_id, kind) WHERE job_id IS NOT NULL;

CREATE TABLE ledger_entries (
    id                 bigserial PRIMARY KEY,
    tx_id              bigint NOT NULL REFERENCES ledger_transactions(id),
    ledger_account_id  bigint NOT NULL REFERENCES ledger_accounts(id),
    amount             bigint NOT NULL CHECK (amount <> 0),
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_entries_by_account ON ledger_entries (ledger_account_id, id);
CREATE INDEX ledger_entries_by_tx ON ledger_entries (tx_id);

-- Defence in depth: whatever the code does, a transaction whose entries do not sum to zero
-- cannot commit.
CREATE FUNCTION ledger_tx_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    total numeric;
BEGIN
    SELECT COALESCE(sum(amount), 0) INTO total FROM ledger_entries WHERE tx_id = NEW.tx_id;
    IF total <> 0 THEN
        RAISE EXCEPTION 'ledger transaction % does not balance (sum %)', NEW.tx_id, total
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER ledger_entries_balanced
    AFTER INSERT ON ledger_entries DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION ledger_tx_balanced();

CREATE TABLE nodes (
    -- hex of the node's ed25519 public key
    id             text PRIMARY KEY,
    name           text NOT NULL,
    account_id     uuid NOT NULL REFERENCES accounts(id),
    status         text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'banned')),
    -- the last signed capability statement (an Announce body)
    capabilities   jsonb,
    announced_at   timestamptz,
    -- signing time (unix ms) of the stored statement: an older, replayed one never replaces it
    announced_ts   bigint,
    registered_at  timestamptz NOT NULL DEFAULT now(),
    shards_done    bigint NOT NULL DEFAULT 0,
    shards_failed  bigint NOT NULL DEFAULT 0
);

CREATE TABLE jobs (
    id               uuid PRIMARY KEY,  -- UUIDv7: time-ordered, so it doubles as the list cursor
    account_id       uuid NOT NULL REFERENCES accounts(id),
    kind             text NOT NULL,
    status           text NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')),
    input            jsonb NOT NULL,
    params           jsonb NOT NULL,
    output           jsonb,
    error            jsonb,
    quote            bigint NOT NULL CHECK (quote >= 0),
    max_fee          bigint NOT NULL,
    escrow           bigint NOT NULL CHECK (escrow >= 0),
    -- the gateway's share of the quote; the rest is the shards' fees, earned by workers
    gateway_fee      bigint NOT NULL CHECK (gateway_fee >= 0),
    cost             bigint,
    shards_total     int NOT NULL,
    shards_done      int NOT NULL DEFAULT 0,
    webhook          text,
    idempotency_key  text,
    request_hash     text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz
);
CREATE UNIQUE INDEX jobs_idempotency ON jobs (account_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_by_account ON jobs (account_id, id DESC);
CREATE INDEX jobs_unfinished ON jobs (created_at) WHERE status IN ('queued', 'running');

CREATE TABLE shards (
    id                uuid PRIMARY KEY,
    job_id            uuid NOT NULL REFERENCES jobs(id),
    idx               int NOT NULL,
    row_offset        int NOT NULL,
    row_count         int NOT NULL,
    model             text NOT NULL,
    task              jsonb NOT NULL,
    fee               bigint NOT NULL CHECK (fee >= 0),
    status            text NOT NULL CHECK (status IN ('pending', 'assigned', 'done', 'canceled', 'failed')),
    node_id           text REFERENCES nodes(id),
    assignment_id     uuid UNIQUE,
    attempts          int NOT NULL DEFAULT 0,
    -- nodes that rejected or lost this shard; it is not offered to them again
    excluded_nodes    text[] NOT NULL DEFAULT '{}',
    lease_expires_at  timestamptz,
    assigned_at       timestamptz,
    -- the current attempt's last progress report: chunks done and the hash chain over them
    progress_done     int NOT NULL DEFAULT 0,
    progress_chain    text,
    output            jsonb,
    output_sha256     text,
    completed_at      timestamptz,
    UNIQUE (job_id, idx)
);
CREATE INDEX shards_pending ON shards (job_id, idx) WHERE status = 'pending';
CREATE INDEX shards_leased ON shards (lease_expires_at) WHERE status = 'assigned';
CREATE INDEX shards_by_node ON shards (node_id) WHERE status = 'assigned';
