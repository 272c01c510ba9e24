//! An account's webhook endpoints: a URL, the job events it wants, and its own signing secret,
//! shown once. A job whose `webhook` is a registered URL reports to it with these; and what was
//! sent to a job's webhook, attempt by attempt, is readable by the job's owner.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;

use super::signature;
use crate::egress::EgressPolicy;
use crate::error::{AppError, FieldError};

/// Events an endpoint may choose; `completed` when it chooses none.
pub const EVENTS: [&str; 4] = ["start", "progress", "partial", "completed"];
/// Most endpoints one account may register.
pub const MAX_PER_ACCOUNT: i64 = 32;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Endpoint {
    pub id: Uuid,
    pub url: String,
    /// Among `start`, `progress`, `partial`, `completed`.
    pub events: Vec<String>,
    pub created_at: DateTime<Utc>,
    /// Set when a receiver answered 410 Gone: nothing more is sent to it.
    pub disabled_at: Option<DateTime<Utc>>,
}

/// Registers `url` for `account`, or refuses naming the field. Returns the endpoint and its
/// secret, which is not kept anywhere the owner can read it again.
pub async fn register(
    db: &PgPool,
    egress: &EgressPolicy,
    account: Uuid,
    url: &str,
    events: Option<Vec<String>>,
) -> Result<(Endpoint, String), AppError> {
    let mut errors = Vec::new();
    if url.len() > 2048 {
        errors.push(FieldError::new("url", "must be at most 2048 characters"));
    } else if let Err(why) = egress.check_url(url).await {
        errors.push(FieldError::new("url", why));
    }
    let events = events.unwrap_or_else(|| vec!["completed".into()]);
    if events.is_empty() {
        errors.push(FieldError::new("events", "must name at least one event"));
    }
    for (i, event) in events.iter().enumerate() {
        if !EVENTS.contains(&event.as_str()) {
            let detail = format!("must be one of {}", EVENTS.join(", "));
            errors.push(FieldError::new(format!("events[{i}]"), detail));
        }
    }
    if !errors.is_empty() {
        return Err(AppError::Validation(errors));
    }
    let mut events = events;
    events.sort_by_key(|e| EVENTS.iter().position(|known| known == e));
    events.dedup();
    let mut tx = db.begin().await?;
    // Serializes one account's registrations, so the cap below cannot be raced past.
    sqlx::query("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE")
        .bind(account)
        .execute(&mut *tx)
        .await?;
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM webhook_endpoints WHERE account_id = $1")
            .bind(account)
            .fetch_one(&mut *tx)
            .await?;
    if count >= MAX_PER_ACCOUNT {
        return Err(AppError::Conflict(format!(
            "an account has at most {MAX_PER_ACCOUNT} webhook endpoints: delete one first"
        )));
    }
    let secret = signature::new_secret();
    let inserted: Result<Endpoint, sqlx::Error> = sqlx::query_as(
        "INSERT INTO webhook_endpoints (id, account_id, url, events, secret)
         VALUES ($1, $2, $3, $4, $5)
         RETURNING id, url, events, created_at, disabled_at",
    )
    .bind(Uuid::new_v4())
    .bind(account)
    .bind(url)
    .bind(&events)
    .bind(&secret)
    .fetch_one(&mut *tx)
    .await;
    let endpoint = match inserted {
        Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
            return Err(AppError::Conflict(
                "this URL is registered already: delete it to register it again".into(),
            ))
        }
        other => other?,
    };
    tx.commit().await?;
    Ok((endpoint, secret))
}

pub async fn list(db: &PgPool, account: Uuid) -> sqlx::Result<Vec<Endpoint>> {
    sqlx::query_as(
        "SELECT id, url, events, created_at, disabled_at FROM webhook_endpoints
         WHERE account_id = $1 ORDER BY created_at, id",
    )
    .bind(account)
    .fetch_all(db)
    .await
}

/// Deletes one of `account`'s endpoints. Messages already queued for it are still delivered,
/// signed by the gateway's key instead.
pub async fn delete(db: &PgPool, account: Uuid, id: Uuid) -> Result<(), AppError> {
    let mut tx = db.begin().await?;
    sqlx::query("UPDATE webhook_messages SET endpoint_id = NULL WHERE endpoint_id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    let deleted = sqlx::query("DELETE FROM webhook_endpoints WHERE id = $1 AND account_id = $2")
        .bind(id)
        .bind(account)
        .execute(&mut *tx)
        .await?;
    if deleted.rows_affected() == 0 {
        return Err(AppError::NotFound("webhook endpoint"));
    }
    tx.commit().await?;
    Ok(())
}

/// One message sent (or to be sent) to a job's webhook, with its attempts.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Delivery {
    /// The message's `webhook-id`.
    pub id: Uuid,
    /// `start`, `progress`, `partial` or `completed`.
    pub event: String,
    pub url: String,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    /// Set when it was given up: out of attempts, or the receiver answered 410 Gone.
    pub abandoned_at: Option<DateTime<Utc>>,
    /// When the next attempt is due, while neither delivered nor given up.
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub attempts: Vec<DeliveryAttempt>,
}

#[derive(sqlx::FromRow)]
struct AttemptRow {
    message_id: Uuid,
    #[sqlx(flatten)]
    attempt: DeliveryAttempt,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct DeliveryAttempt {
    pub attempt: i32,
    pub at: DateTime<Utc>,
    /// The receiver's HTTP status; none when no answer came.
    pub status: Option<i32>,
    pub error: Option<String>,
    pub duration_ms: i32,
}

/// The messages of one of `account`'s jobs, oldest first, or `None` if it has no such job.
pub async fn deliveries(
    db: &PgPool,
    account: Uuid,
    job_id: Uuid,
) -> sqlx::Result<Option<Vec<Delivery>>> {
    let owned: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM jobs WHERE id = $1 AND account_id = $2")
            .bind(job_id)
            .bind(account)
            .fetch_optional(db)
            .await?;
    if owned.is_none() {
        return Ok(None);
    }
    type Row = (
        Uuid,
        String,
        String,
        DateTime<Utc>,
        Option<DateTime<Utc>>,
        Option<DateTime<Utc>>,
        DateTime<Utc>,
    );
    let messages: Vec<Row> = sqlx::query_as(
        "SELECT id, event, url, created_at, delivered_at, abandoned_at, next_attempt_at
         FROM webhook_messages WHERE job_id = $1 ORDER BY created_at, id LIMIT 1000",
    )
    .bind(job_id)
    .fetch_all(db)
    .await?;
    let attempts: Vec<(Uuid, DeliveryAttempt)> = sqlx::query_as::<_, AttemptRow>(
        "SELECT a.message_id, a.attempt, a.at, a.status, a.error, a.duration_ms
         FROM webhook_attempts a JOIN webhook_messages m ON m.id = a.message_id
         WHERE m.job_id = $1 ORDER BY a.message_id, a.attempt",
    )
    .bind(job_id)
    .fetch_all(db)
    .await?
    .into_iter()
    .map(|row: AttemptRow| (row.message_id, row.attempt))
    .collect();
    let mut out = Vec::with_capacity(messages.len());
    for (id, event, url, created_at, delivered_at, abandoned_at, next) in messages {
        let pending = delivered_at.is_none() && abandoned_at.is_none();
        out.push(Delivery {
            id,
            event,
            url,
            created_at,
            delivered_at,
            abandoned_at,
            next_attempt_at: pending.then_some(next),
            attempts: attempts
                .iter()
                .filter(|(message, _)| *message == id)
                .map(|(_, attempt)| attempt.clone())
                .collect(),
        });
    }
    Ok(Some(out))
}
