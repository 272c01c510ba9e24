//! Job events, fanned out through Redis pub/sub so a WebSocket or SSE stream on any gateway
//! replica sees events produced by any other.
//!
//! Each replica publishes to one channel and runs one subscriber that feeds a local broadcast;
//! streams filter it by job. Events are a live feed, not a log: a client that reconnects reads
//! the job's current state first and then follows the feed.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::jobs::Job;
use crate::shutdown::Shutdown;

/// A server → client event about one job (SSE `data`, and WebSocket frames).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum JobEvent {
    /// Shards finished so far.
    Progress {
        job_id: Uuid,
        status: crate::jobs::JobStatus,
        shards_done: i32,
        shards_total: i32,
    },
    /// One shard's slice of the output as soon as it is verified: `rows` start at row `offset`.
    Partial {
        job_id: Uuid,
        shard: i32,
        offset: i32,
        #[schema(value_type = Vec<Vec<f64>>)]
        rows: serde_json::Value,
    },
    Succeeded {
        job: Box<Job>,
    },
    Failed {
        job: Box<Job>,
    },
    Canceled {
        job: Box<Job>,
    },
}

impl JobEvent {
    pub fn job_id(&self) -> Uuid {
        match self {
            JobEvent::Progress { job_id, .. } | JobEvent::Partial { job_id, .. } => *job_id,
            JobEvent::Succeeded { job } | JobEvent::Failed { job } | JobEvent::Canceled { job } => {
                job.id
            }
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            JobEvent::Succeeded { .. } | JobEvent::Failed { .. } | JobEvent::Canceled { .. }
        )
    }

    /// The terminal event for a finished job.
    pub fn finished(job: Job) -> Option<Self> {
        use crate::jobs::JobStatus::*;
        let job = Box::new(job);
        match job.status {
            Succeeded => Some(JobEvent::Succeeded { job }),
            Failed => Some(JobEvent::Failed { job }),
            Canceled => Some(JobEvent::Canceled { job }),
            Queued | Running => None,
        }
    }
}

/// An event with its owner, as carried on the Redis channel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Published {
    pub account_id: Uuid,
    pub event: JobEvent,
}

/// Publishes to Redis and hands out local subscriptions to what Redis delivers back.
#[derive(Clone)]
pub struct EventHub {
    channel: String,
    redis: redis::aio::ConnectionManager,
    local: broadcast::Sender<Arc<Published>>,
}

impl EventHub {
    pub fn new(redis: redis::aio::ConnectionManager, prefix: &str) -> Self {
        let (local, _) = broadcast::channel(16_384);
        Self {
            channel: format!("{prefix}:events"),
            redis,
            local,
        }
    }

    /// Publishes best-effort: events are a live feed, and a lost one is recovered by reading
    /// the job. A Redis outage must not fail the state change that produced the event.
    pub async fn publish(&self, account_id: Uuid, event: JobEvent) {
        let payload =
            serde_json::to_string(&Published { account_id, event }).expect("events serialize");
        let mut conn = self.redis.clone();
        let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH")
            .arg(&self.channel)
            .arg(payload)
            .query_async(&mut conn)
            .await;
        if let Err(e) = sent {
            tracing::warn!(error = %e, "publishing a job event to Redis failed");
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Published>> {
        self.local.subscribe()
    }

    /// Feeds the local broadcast from the Redis channel until `shutdown`, reconnecting with
    /// back-off when Redis goes away.
    pub async fn run_subscriber(self, client: redis::Client, shutdown: Shutdown) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let attempt = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&self.channel).await?;
                let mut messages = pubsub.on_message();
                backoff = Duration::from_millis(100);
                while let Some(msg) = messages.next().await {
                    let Ok(payload) = msg.get_payload::<String>() else {
                        continue;
                    };
                    match serde_json::from_str::<Published>(&payload) {
                        Ok(p) => {
                            let _ = self.local.send(Arc::new(p));
                        }
                        Err(e) => tracing::warn!(error = %e, "undecodable job event"),
                    }
                }
                Ok::<_, redis::RedisError>(())
            };
            tokio::select! {
                result = attempt => {
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "Redis event subscription lost; reconnecting");
                    }
                }
                _ = shutdown.wait() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.wait() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}
