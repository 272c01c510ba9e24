-- Speculative copies of stragglers (issue 5): a second run of a primary shard that is much slower
-- than its siblings; the first valid result wins and the other run is told to stop. Like
-- verification replicas they point at their primary (replica_of) and earn no fee themselves;
-- the winning run's node becomes the primary's node and is paid.
ALTER TABLE shards ADD COLUMN speculative boolean NOT NULL DEFAULT false;
