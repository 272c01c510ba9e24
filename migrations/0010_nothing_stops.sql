-- Nothing stops (issue 9): unverified acceptance, and shards lost with a node.
-- A held result nobody could check (no eligible second node within XPAND_VERIFY_WAIT_SECS, or
-- its only checker died) is accepted as it is and marked unverified, on the shard and on the
-- job, whose output then lists the unverified shards.
ALTER TABLE shards ADD COLUMN unverified boolean NOT NULL DEFAULT false;
ALTER TABLE jobs ADD COLUMN unverified_shards int[] NOT NULL DEFAULT '{}';

-- Shards taken back from a node whose heartbeats stopped or that restarted (it had lost them).
ALTER TABLE node_failures DROP CONSTRAINT node_failures_reason_check;
ALTER TABLE node_failures ADD CONSTRAINT node_failures_reason_check
    CHECK (reason IN ('lease_lapsed', 'bad_result', 'disputed', 'node_lost'));
