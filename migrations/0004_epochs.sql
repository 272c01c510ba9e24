-- Epochs, power scores and the reward pool (README "Power score").

-- The network's start: epoch n covers [genesis + n·len, genesis + (n+1)·len).
CREATE TABLE network (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    genesis    timestamptz NOT NULL DEFAULT now()
);
INSERT INTO network DEFAULT VALUES;

-- Failures a node is charged with, timestamped so each epoch counts its own.
CREATE TABLE node_failures (
    id        bigserial PRIMARY KEY,
    node_id   text NOT NULL REFERENCES nodes(id),
    shard_id  uuid,
    reason    text NOT NULL CHECK (reason IN ('lease_lapsed', 'bad_result')),
    at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX node_failures_by_time ON node_failures (at);

CREATE TABLE epochs (
    number          bigint PRIMARY KEY CHECK (number >= 0),
    starts_at       timestamptz NOT NULL,
    ends_at         timestamptz NOT NULL,
    -- newly issued for the pool, and the share of the epoch's gateway fees added to it
    issuance        bigint NOT NULL CHECK (issuance >= 0),
    fee_share       bigint NOT NULL CHECK (fee_share >= 0),
    pool            bigint NOT NULL CHECK (pool = issuance + fee_share),
    -- the node that received the rounding remainder
    remainder_node  text REFERENCES nodes(id),
    closed_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE epoch_scores (
    epoch         bigint NOT NULL REFERENCES epochs(number),
    node_id       text NOT NULL REFERENCES nodes(id),
    alive_slots   int NOT NULL,
    total_slots   int NOT NULL,
    capacity      int NOT NULL,
    shards_done   bigint NOT NULL,
    failures      bigint NOT NULL,
    score         bigint NOT NULL,
    reward        bigint NOT NULL CHECK (reward >= 0),
    PRIMARY KEY (epoch, node_id)
);

ALTER TABLE ledger_transactions ADD COLUMN epoch bigint;
ALTER TABLE ledger_transactions DROP CONSTRAINT ledger_transactions_kind_check;
ALTER TABLE ledger_transactions ADD CONSTRAINT ledger_transactions_kind_check
    CHECK (kind IN ('deposit', 'escrow_hold', 'escrow_release', 'epoch_reward'));
-- An epoch's pool is paid once, whatever replicas race to close it.
CREATE UNIQUE INDEX ledger_transactions_once_per_epoch ON ledger_transactions (epoch, kind) WHERE epoch IS NOT NULL;
