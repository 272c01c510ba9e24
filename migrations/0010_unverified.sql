-- A held result nobody could check (no eligible second node within XPAND_VERIFY_WAIT_SECS, or
-- its only checker died) is accepted as it is and marked unverified, on the shard and on the
-- job, whose output then lists the unverified shards.
ALTER TABLE shards ADD COLUMN unverified boolean NOT NULL DEFAULT false;
ALTER TABLE jobs ADD COLUMN unverified_shards int[] NOT NULL DEFAULT '{}';
