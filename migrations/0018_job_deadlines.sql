-- A caller's deadline for a job: still unfinished when it passes, the job is canceled with the
-- usual payouts and refund (jobs::sweep). The index serves the sweep's look for overdue jobs.
ALTER TABLE jobs ADD COLUMN deadline timestamptz;
CREATE INDEX jobs_deadline_due ON jobs (deadline)
    WHERE deadline IS NOT NULL AND status IN ('queued', 'running');
