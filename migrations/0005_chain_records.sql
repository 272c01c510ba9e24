-- What nodes and the gateway said, sealed beside the money (paper §3.5: nodes publish their
-- specifications and job assignments): every stored capability statement and every shard
-- assignment, as the exact signed envelope that travelled over MQTT.
CREATE TABLE chain_records (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('capability', 'assignment')),
    node_id     text NOT NULL,
    -- the envelope JSON: signed by the node (capability) or the gateway (assignment)
    envelope    text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Blocks now cover a range of records too; either range may be empty.
ALTER TABLE ledger_blocks
    ADD COLUMN first_record_id bigint NOT NULL DEFAULT 1,
    ADD COLUMN last_record_id  bigint NOT NULL DEFAULT 0,
    ADD COLUMN record_count    int NOT NULL DEFAULT 0,
    ADD COLUMN records_root    text NOT NULL DEFAULT '';
ALTER TABLE ledger_blocks DROP CONSTRAINT ledger_blocks_entry_count_check;
ALTER TABLE ledger_blocks DROP CONSTRAINT ledger_blocks_check;
ALTER TABLE ledger_blocks ADD CONSTRAINT ledger_blocks_ranges CHECK (
    entry_count >= 0 AND record_count >= 0 AND entry_count + record_count > 0
    AND first_entry_id <= last_entry_id + 1 AND first_record_id <= last_record_id + 1);
CREATE INDEX ledger_blocks_by_record ON ledger_blocks (last_record_id);
