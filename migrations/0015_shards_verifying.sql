-- Results held for a check, by when they arrived: the sweep looks for those that waited too
-- long every second. Without this index that look read the whole shards table (150 ms a
-- second once a million jobs had run).
CREATE INDEX shards_verifying ON shards (completed_at) WHERE status = 'verifying';
