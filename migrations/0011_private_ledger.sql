-- Nothing leaks (issue 10): the sealed ledger commits to entries and records without showing
-- them. Each new entry and record gets a random salt; its leaf is the hash of the salt and its
-- content (v2), so the public leaf list reveals nothing, while the owner, given the salt, can
-- prove the entry against the signed root.
--
-- Cut-over: rows that exist when this migration runs keep salt NULL and stay v1 leaves (the
-- hash of their content), so every block sealed before it verifies exactly as before. Only the
-- auditor can read their content now.
ALTER TABLE ledger_entries ADD COLUMN salt text;
ALTER TABLE ledger_entries ALTER COLUMN salt SET DEFAULT replace(gen_random_uuid()::text, '-', '');

-- New records keep the sha256 of the envelope, not the envelope: an assignment's envelope
-- carries the customer's rows. The node holds the envelope and can match the digest.
ALTER TABLE chain_records ADD COLUMN salt text;
ALTER TABLE chain_records ALTER COLUMN salt SET DEFAULT replace(gen_random_uuid()::text, '-', '');
ALTER TABLE chain_records ADD COLUMN digest text;
ALTER TABLE chain_records ALTER COLUMN envelope DROP NOT NULL;
ALTER TABLE chain_records ADD CONSTRAINT chain_records_v1_or_v2
    CHECK ((salt IS NULL AND envelope IS NOT NULL) OR (salt IS NOT NULL AND digest IS NOT NULL));
CREATE INDEX chain_records_by_node ON chain_records (node_id, id);
-- A challenge's signed envelope is kept with the challenge (the ledger holds its digest).
ALTER TABLE challenges ADD COLUMN envelope text;
