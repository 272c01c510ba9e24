-- Jobs whose reduce step runs outside the result transaction (video: joining segments takes
-- seconds). A replica claims the reduce by setting this; a claim older than the reduce lease
-- is taken over, so a gateway that crashed mid-reduce does not strand the job.
ALTER TABLE jobs ADD COLUMN reduce_claimed_at timestamptz;
