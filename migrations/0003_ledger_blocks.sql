-- Commitment blocks: ledger entries sealed in id order under a Merkle root, hash-linked and
-- signed by the gateway key.
CREATE TABLE ledger_blocks (
    height          bigint PRIMARY KEY CHECK (height >= 1),
    first_entry_id  bigint NOT NULL,
    last_entry_id   bigint NOT NULL,
    entry_count     int NOT NULL CHECK (entry_count > 0),
    merkle_root     text NOT NULL,
    prev_hash       text NOT NULL,
    sealed_at       timestamptz NOT NULL,
    block_hash      text NOT NULL UNIQUE,
    signature       text NOT NULL,
    CHECK (first_entry_id <= last_entry_id)
);
CREATE INDEX ledger_blocks_by_range ON ledger_blocks (last_entry_id);
