-- Standard Webhooks (docs/api.md): a message per event a job's webhook chose, each with its
-- own id, signed per endpoint, retried on the specification's schedule; every attempt is kept
-- for `GET /v1/jobs/{id}/deliveries`.

-- An account's registered endpoints: a URL, the events it wants and its own HMAC secret
-- (`whsec_...`). A job whose `webhook` is such a URL is signed with that secret; any other URL
-- is signed with the gateway's ed25519 key (`v1a`).
CREATE TABLE webhook_endpoints (
    id          uuid PRIMARY KEY,
    account_id  uuid NOT NULL REFERENCES accounts(id),
    url         text NOT NULL,
    events      text[] NOT NULL,
    secret      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- Set when a receiver answered 410 Gone: nothing more is sent to it.
    disabled_at timestamptz,
    UNIQUE (account_id, url)
);

-- The outbox: written in the transaction of the state change it reports, so no crash loses
-- it. `data` is the event as it happened (a partial's rows); NULL for `completed`, whose body
-- is the job as it ended, read at delivery.
CREATE TABLE webhook_messages (
    id              uuid PRIMARY KEY,
    job_id          uuid NOT NULL REFERENCES jobs(id),
    url             text NOT NULL,
    endpoint_id     uuid REFERENCES webhook_endpoints(id),
    event           text NOT NULL,
    data            jsonb,
    attempts        int NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    -- Given up: out of attempts, or the receiver answered 410 Gone.
    abandoned_at    timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_messages_due ON webhook_messages (next_attempt_at)
    WHERE delivered_at IS NULL AND abandoned_at IS NULL;
CREATE INDEX webhook_messages_job ON webhook_messages (job_id, created_at);

CREATE TABLE webhook_attempts (
    message_id  uuid NOT NULL REFERENCES webhook_messages(id),
    attempt     int NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    -- The receiver's HTTP status, NULL when no answer came (refused, timed out).
    status      int,
    error       text,
    duration_ms int NOT NULL,
    PRIMARY KEY (message_id, attempt)
);

-- Deliveries still owed move over as `completed` messages.
INSERT INTO webhook_messages (id, job_id, url, event, attempts, next_attempt_at, delivered_at,
                              last_error, created_at)
SELECT gen_random_uuid(), job_id, url, 'completed', attempts, next_attempt_at, delivered_at,
       last_error, created_at
FROM webhook_deliveries;
DROP TABLE webhook_deliveries;
