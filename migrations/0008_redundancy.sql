-- Verification by redundancy (issue 5). A replica is a second (or, after a disagreement, third)
-- run of a primary shard on another node; it earns no fee (the caller pays once) but counts as
-- work done in the node's power score. A primary whose result awaits its replicas is 'verifying'.
ALTER TABLE shards ADD COLUMN replica_of uuid REFERENCES shards(id);
ALTER TABLE shards DROP CONSTRAINT shards_job_id_idx_key;
CREATE UNIQUE INDEX shards_primary_by_idx ON shards (job_id, idx) WHERE replica_of IS NULL;
CREATE INDEX shards_by_primary ON shards (replica_of) WHERE replica_of IS NOT NULL;
ALTER TABLE shards DROP CONSTRAINT shards_status_check;
ALTER TABLE shards ADD CONSTRAINT shards_status_check
    CHECK (status IN ('pending', 'assigned', 'verifying', 'done', 'canceled', 'failed'));

ALTER TABLE node_failures DROP CONSTRAINT node_failures_reason_check;
ALTER TABLE node_failures ADD CONSTRAINT node_failures_reason_check
    CHECK (reason IN ('lease_lapsed', 'bad_result', 'disputed'));

-- A disagreement settled by a third run: who was outvoted, by whom. Also sealed into the ledger
-- as a 'challenge' record.
CREATE TABLE challenges (
    id          uuid PRIMARY KEY,
    job_id      uuid NOT NULL REFERENCES jobs(id),
    shard_id    uuid NOT NULL REFERENCES shards(id),
    loser       text NOT NULL REFERENCES nodes(id),
    winners     text[] NOT NULL,
    detail      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX challenges_by_loser ON challenges (loser, created_at);

ALTER TABLE chain_records DROP CONSTRAINT chain_records_kind_check;
ALTER TABLE chain_records ADD CONSTRAINT chain_records_kind_check
    CHECK (kind IN ('capability', 'assignment', 'challenge'));
