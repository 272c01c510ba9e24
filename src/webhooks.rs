//! Webhooks: when a job with a `webhook` URL ends, the job is POSTed there.
//!
//! Delivery is at least once. The outbox row is written in the transaction that ends the job
//! (`jobs::store::enqueue_webhook`), so neither a crash nor a Redis outage loses it; any
//! replica's deliverer claims due rows by pushing their next attempt into the future (a lease),
//! POSTs, and records the outcome, retrying with exponential back-off. Receivers deduplicate on
//! `X-Xpand-Delivery`.
//!
//! Each request is signed with the gateway key: `X-Xpand-Signature` is the base64 ed25519
//! signature of `{X-Xpand-Timestamp}.{body}`, verifiable with the key `xpand gateway-key` prints.
//!
//! The gateway only calls public addresses ([`crate::egress`]): checked at submit, and again
//! on the addresses the URL resolves to at each delivery. Redirects are not followed.

use std::time::Duration;

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use ed25519_dalek::Signer;
use sqlx::PgPool;
use uuid::Uuid;
use xpand_protocol::NodeKey;

use crate::egress::EgressPolicy;
use crate::egress::PolicyResolver;
use crate::jobs::store::fetch_row;
use crate::jobs::Job;
use crate::shutdown::Shutdown;

/// Attempts before a delivery is given up (about 70 minutes of back-off in all).
pub const MAX_ATTEMPTS: i32 = 12;
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

async fn deliver_due(hooks: &Deliverer, client: &reqwest::Client) -> anyhow::Result<()> {
    let claimed: Vec<(Uuid, String, i32)> = sqlx::query_as(
        "WITH due AS (
             SELECT job_id FROM webhook_deliveries
             WHERE delivered_at IS NULL AND attempts < $1 AND next_attempt_at <= now()
             ORDER BY next_attempt_at LIMIT 16 FOR UPDATE SKIP LOCKED)
         UPDATE webhook_deliveries w
         SET attempts = w.attempts + 1, next_attempt_at = now() + $2 * interval '1 second'
         FROM due WHERE w.job_id = due.job_id
         RETURNING w.job_id, w.url, w.attempts",
    )
    .bind(MAX_ATTEMPTS)
    .bind(CLAIM.as_secs_f64())
    .fetch_all(&hooks.db)
    .await?;
    let deliveries = claimed
        .into_iter()
        .map(|(job_id, url, attempt)| async move {
            let outcome = deliver(hooks, client, job_id, &url).await;
            record(hooks, job_id, attempt, outcome).await
        });
    for result in futures::future::join_all(deliveries).await {
        result?;
    }
    Ok(())
}

async fn deliver(
    hooks: &Deliverer,
    client: &reqwest::Client,
    job_id: Uuid,
    url: &str,
) -> Result<(), String> {
    // An address literal never reaches the resolver: check it (and a name, early) here.
    hooks
        .egress
        .check_url(url)
        .await
        .map_err(|why| format!("refused: the URL {why}"))?;
    let mut conn = hooks.db.acquire().await.map_err(|e| e.to_string())?;
    let job: Job = fetch_row(&mut conn, job_id)
        .await
        .map_err(|e| e.to_string())?
        .into();
    drop(conn);
    let body = serde_json::to_vec(&job).expect("jobs serialize");
    let timestamp = chrono::Utc::now().timestamp().to_string();
    let mut signed = Vec::with_capacity(timestamp.len() + 1 + body.len());
    signed.extend_from_slice(timestamp.as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(&body);
    let signature = hooks.key.signing_key().sign(&signed);
    let response = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("X-Xpand-Event", format!("job.{}", job.status.as_str()))
        .header("X-Xpand-Delivery", job_id.to_string())
        .header("X-Xpand-Timestamp", &timestamp)
        .header("X-Xpand-Signature", B64.encode(signature.to_bytes()))
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("the receiver answered {}", response.status()))
    }
}

/// Marks a delivery done, or schedules the next attempt: 1 s, 2 s, 4 s, ... capped at 1 h.
async fn record(
    hooks: &Deliverer,
    job_id: Uuid,
    attempt: i32,
    outcome: Result<(), String>,
) -> sqlx::Result<()> {
    match outcome {
        Ok(()) => {
            sqlx::query(
                "UPDATE webhook_deliveries SET delivered_at = now(), last_error = NULL
                 WHERE job_id = $1",
            )
            .bind(job_id)
            .execute(&hooks.db)
            .await?;
        }
        Err(error) => {
            let backoff = 2f64.powi(attempt - 1).min(3600.0);
            tracing::warn!(job = %job_id, attempt, %error, "webhook delivery failed");
            sqlx::query(
                "UPDATE webhook_deliveries
                 SET last_error = $2, next_attempt_at = now() + $3 * interval '1 second'
                 WHERE job_id = $1",
            )
            .bind(job_id)
            .bind(error)
            .bind(backoff)
            .execute(&hooks.db)
            .await?;
        }
    }
    Ok(())
}
