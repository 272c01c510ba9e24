-- Every shard of a job, whatever its status or role. Finishing a job cancels its unfinished
-- shards (`WHERE job_id = $1 AND status IN (...)`); the partial indexes by job cover only
-- pending shards or primaries, so without this one that statement read the whole table, and
-- each job's cost grew with every job before it.
CREATE INDEX shards_by_job ON shards (job_id);
