-- Uploaded files (inputs such as videos, and job outputs). The bytes live in object storage
-- under files/{id}; this row says whose they are and what they hash to.
CREATE TABLE files (
    id            uuid PRIMARY KEY,
    account_id    uuid NOT NULL REFERENCES accounts(id),
    size          bigint NOT NULL CHECK (size > 0),
    sha256        text NOT NULL,
    content_type  text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX files_by_account ON files (account_id, id DESC);
