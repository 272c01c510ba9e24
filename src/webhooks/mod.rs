//! Webhooks, per Standard Webhooks: the events a job's webhook chose (`start`, `progress`,
//! `partial`, `completed`) are POSTed to its URL, each a message with its own `webhook-id`, a
//! `webhook-timestamp` and a `webhook-signature` ([`signature`]). The body is `{"type": "job.<event>", "timestamp", "data"}`: `data` is the
//! event, or for `completed` the job as it ended.
//!
//! Delivery is at least once. The message is written in the transaction of the change it
//! reports (`jobs::store::enqueue_webhook`), so neither a crash nor a Redis outage loses it; any
//! replica's deliverer claims due messages by pushing their next attempt into the future (a
//! lease), POSTs, and records the attempt. A failure is retried on the specification's
//! schedule ([`SCHEDULE`]); a 410 Gone stops it, and disables a registered endpoint. Receivers
//! deduplicate on `webhook-id`. Every attempt is kept for `GET /v1/jobs/{id}/deliveries`.
//!
//! The gateway only calls public addresses ([`crate::egress`]): checked at submit and at
//! registration, and again on the addresses the URL resolves to at each delivery. Redirects are
//! not followed.

pub mod endpoints;
pub mod signature;

use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;
use xpand_protocol::NodeKey;

use crate::egress::EgressPolicy;
use crate::egress::PolicyResolver;
use crate::jobs::store::fetch_row;
use crate::jobs::Job;
use crate::shutdown::Shutdown;

/// When each attempt is made, counted from the one before: at once, then after 5 s, 5 min,
/// 30 min, 2 h, 5 h, 10 h and 10 h (the specification's schedule, about 28 hours in all).
pub const SCHEDULE: [u64; 8] = [0, 5, 300, 1800, 7200, 18000, 36000, 36000];
/// Attempts before a message is given up.
pub const MAX_ATTEMPTS: i32 = SCHEDULE.len() as i32;
/// How long a claimed delivery is reserved for the replica that claimed it.
const CLAIM: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What delivering webhooks takes: the jobs to read, the key that signs, the egress policy.
pub struct Deliverer {
    pub db: PgPool,
    pub key: NodeKey,
    pub egress: EgressPolicy,
}

/// Delivers due webhooks until `shutdown`.
pub async fn run_deliverer(hooks: Deliverer, shutdown: Shutdown) {
    let policy = std::sync::Arc::new(hooks.egress.clone());
    let client = match reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(std::sync::Arc::new(PolicyResolver(policy)))
        .user_agent(concat!("xpand/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook HTTP client; webhooks are off");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.wait() => return,
        }
        if let Err(e) = deliver_due(&hooks, &client).await {
            tracing::warn!(error = ?e, "webhook round failed");
        }
    }
}

/// A message claimed for one attempt.
#[derive(sqlx::FromRow)]
struct Claimed {
    id: Uuid,
    job_id: Uuid,
    url: String,
    endpoint_id: Option<Uuid>,
    secret: Option<String>,
    event: String,
    data: Option<Value>,
    attempts: i32,
    /// When the event happened: the body's `timestamp`, the same in every attempt.
    created_at: chrono::DateTime<chrono::Utc>,
}

async fn deliver_due(hooks: &Deliverer, client: &reqwest::Client) -> anyhow::Result<()> {
    let claimed: Vec<Claimed> = sqlx::query_as(
        "WITH due AS (
             SELECT id FROM webhook_messages
             WHERE delivered_at IS NULL AND abandoned_at IS NULL AND next_attempt_at <= now()
             ORDER BY next_attempt_at LIMIT 16 FOR UPDATE SKIP LOCKED)
         UPDATE webhook_messages m
         SET attempts = m.attempts + 1, next_attempt_at = now() + $1 * interval '1 second'
         FROM due WHERE m.id = due.id
         RETURNING m.id, m.job_id, m.url, m.endpoint_id, m.event, m.data, m.attempts, m.created_at,
                   (SELECT secret FROM webhook_endpoints e WHERE e.id = m.endpoint_id) AS secret",
    )
    .bind(CLAIM.as_secs_f64())
    .fetch_all(&hooks.db)
    .await?;
    let deliveries = claimed.into_iter().map(|message| async move {
        let started = std::time::Instant::now();
        let outcome = deliver(hooks, client, &message).await;
        record(hooks, &message, started.elapsed(), outcome).await
    });
    for result in futures::future::join_all(deliveries).await {
        result?;
    }
    Ok(())
}

/// How one attempt went.
enum Attempt {
    Delivered(u16),
    /// The receiver answered 410 Gone: it wants no more.
    Gone,
    /// Another status, or no answer (`None`), with what went wrong.
    Failed(Option<u16>, String),
}

async fn deliver(hooks: &Deliverer, client: &reqwest::Client, message: &Claimed) -> Attempt {
    // An address literal never reaches the resolver: check it (and a name, early) here.
    if let Err(why) = hooks.egress.check_url(&message.url).await {
        return Attempt::Failed(None, format!("refused: the URL {why}"));
    }
    let body = match body(hooks, message).await {
        Ok(body) => body,
        Err(e) => return Attempt::Failed(None, format!("reading the job: {e}")),
    };
    let id = message.id.to_string();
    let timestamp = chrono::Utc::now().timestamp();
    let signature = signature::sign(message.secret.as_deref(), &hooks.key, &id, timestamp, &body);
    let sent = client
        .post(&message.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("webhook-id", &id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await;
    match sent {
        Ok(response) if response.status().is_success() => {
            Attempt::Delivered(response.status().as_u16())
        }
        Ok(response) if response.status() == reqwest::StatusCode::GONE => Attempt::Gone,
        Ok(response) => Attempt::Failed(
            Some(response.status().as_u16()),
            format!("the receiver answered {}", response.status()),
        ),
        Err(e) => Attempt::Failed(None, e.to_string()),
    }
}

/// The message's body: `{"type", "timestamp", "data"}`, `data` being the job as it is for
/// `completed` and the event recorded with the message otherwise. The same in every attempt.
async fn body(hooks: &Deliverer, message: &Claimed) -> anyhow::Result<Vec<u8>> {
    let data = match &message.data {
        Some(data) => data.clone(),
        None => {
            let mut conn = hooks.db.acquire().await?;
            let job: Job = fetch_row(&mut conn, message.job_id).await?.into();
            serde_json::to_value(job)?
        }
    };
    let envelope = serde_json::json!({
        "type": format!("job.{}", message.event),
        "timestamp": message.created_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "data": data,
    });
    Ok(serde_json::to_vec(&envelope)?)
}

/// Keeps the attempt, then marks the message delivered, schedules its next attempt, or gives it
/// up (out of attempts, or 410 Gone, which also disables a registered endpoint).
async fn record(
    hooks: &Deliverer,
    message: &Claimed,
    took: Duration,
    outcome: Attempt,
) -> sqlx::Result<()> {
    let (status, error) = match &outcome {
        Attempt::Delivered(status) => (Some(*status), None),
        Attempt::Gone => (
            Some(410),
            Some("the receiver answered 410 Gone".to_string()),
        ),
        Attempt::Failed(status, error) => (*status, Some(error.clone())),
    };
    let mut tx = hooks.db.begin().await?;
    sqlx::query(
        "INSERT INTO webhook_attempts (message_id, attempt, status, error, duration_ms)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
    )
    .bind(message.id)
    .bind(message.attempts)
    .bind(status.map(i32::from))
    .bind(&error)
    .bind(took.as_millis().min(i32::MAX as u128) as i32)
    .execute(&mut *tx)
    .await?;
    match outcome {
        Attempt::Delivered(_) => {
            sqlx::query(
                "UPDATE webhook_messages SET delivered_at = now(), last_error = NULL WHERE id = $1",
            )
            .bind(message.id)
            .execute(&mut *tx)
            .await?;
        }
        Attempt::Gone => {
            tracing::info!(job = %message.job_id, url = %message.url, "webhook receiver is gone");
            sqlx::query(
                "UPDATE webhook_messages SET abandoned_at = now(), last_error = $2 WHERE id = $1",
            )
            .bind(message.id)
            .bind(&error)
            .execute(&mut *tx)
            .await?;
            if let Some(endpoint) = message.endpoint_id {
                sqlx::query(
                    "UPDATE webhook_endpoints SET disabled_at = now()
                     WHERE id = $1 AND disabled_at IS NULL",
                )
                .bind(endpoint)
                .execute(&mut *tx)
                .await?;
            }
        }
        Attempt::Failed(..) => {
            let attempt = message.attempts;
            tracing::warn!(job = %message.job_id, attempt, error = ?error, "webhook delivery failed");
            let next = SCHEDULE.get(attempt as usize).copied();
            sqlx::query(
                "UPDATE webhook_messages
                 SET last_error = $2,
                     abandoned_at = CASE WHEN $3::float8 IS NULL THEN now() END,
                     next_attempt_at = now() + COALESCE($3, 0) * interval '1 second'
                 WHERE id = $1",
            )
            .bind(message.id)
            .bind(&error)
            .bind(next.map(|s| s as f64))
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await
}
