-- Nodes that rejected a shard or returned a result that failed its checks: they never get it
-- again while a live node that holds its model has not had it. (excluded_nodes also holds the
-- nodes that merely lost it, which are only avoided: a restarted node may take its work back.)
ALTER TABLE shards ADD COLUMN rejected_by text[] NOT NULL DEFAULT '{}';

-- Nodes that said a shard's input itself cannot be processed (undecodable, not what the task
-- names). Two different nodes saying so fail the job at once instead of after every attempt.
ALTER TABLE shards ADD COLUMN input_refused_by text[] NOT NULL DEFAULT '{}';

-- The uploaded files an unfinished job still reads (a video job's original, for its join).
-- Such a file cannot be deleted, by its owner or by retention, until the job ends.
ALTER TABLE jobs ADD COLUMN input_files uuid[] NOT NULL DEFAULT '{}';
CREATE INDEX jobs_unfinished_input_files ON jobs USING gin (input_files)
    WHERE status IN ('queued', 'running');

-- A shard's excluded nodes hold each node once, so the list is bounded by the nodes that ever
-- had the shard (and those by its attempt cap), however often one of them rejects it.
CREATE FUNCTION array_add_once(list text[], item text) RETURNS text[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT CASE WHEN item = ANY(list) THEN list ELSE array_append(list, item) END $$;
