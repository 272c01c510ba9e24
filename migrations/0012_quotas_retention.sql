-- Nothing leaks (issue 10): customer data has a lifetime. Files are deleted
-- XPAND_RETENTION_HOURS after they were stored (uploads, and job outputs when their job
-- ended); a finished job's input and output, and its shards' tasks and outputs, are erased the
-- same time after it finished. The job itself, its price and its ledger entries stay.
ALTER TABLE jobs ADD COLUMN data_expired_at timestamptz;
CREATE INDEX jobs_to_expire ON jobs (finished_at) WHERE data_expired_at IS NULL AND finished_at IS NOT NULL;
CREATE INDEX files_by_age ON files (created_at);
-- Unfinished jobs per account are counted at every submit (XPAND_MAX_UNFINISHED_JOBS).
CREATE INDEX jobs_unfinished_by_account ON jobs (account_id) WHERE status IN ('queued', 'running');
