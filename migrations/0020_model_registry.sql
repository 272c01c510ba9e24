-- The model registry: a name belongs to the account that first uploaded under it; each upload
-- is an immutable version addressed by the sha256 of its ONNX bytes (kept in object storage at
-- models/{name}/{sha256}). A model is private to its owner until published.
CREATE TABLE models (
    name        text PRIMARY KEY,
    account_id  uuid NOT NULL REFERENCES accounts(id),
    published   boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX models_by_account ON models (account_id);

CREATE TABLE model_versions (
    name        text NOT NULL REFERENCES models(name) ON DELETE CASCADE,
    sha256      text NOT NULL,
    account_id  uuid NOT NULL REFERENCES accounts(id),
    size        bigint NOT NULL CHECK (size > 0),
    manifest    jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, sha256)
);
CREATE INDEX model_versions_by_account ON model_versions (account_id);
