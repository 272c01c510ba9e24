-- A job that runs another account's published model pays that account its royalty (the
-- manifest's royalty_per_row times the rows) when it succeeds, as it pays the gateway's fee.
ALTER TABLE jobs ADD COLUMN royalty_account uuid REFERENCES accounts(id);
ALTER TABLE jobs ADD COLUMN royalty bigint NOT NULL DEFAULT 0 CHECK (royalty >= 0);
