-- Webhook outbox: a row is written in the transaction that ends its job, so a delivery is never
-- lost to a crash; the deliverer claims rows with a short lease and retries with back-off.
CREATE TABLE webhook_deliveries (
    job_id           uuid PRIMARY KEY REFERENCES jobs(id),
    url              text NOT NULL,
    attempts         int NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE delivered_at IS NULL;
