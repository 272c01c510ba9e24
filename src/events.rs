//! Job events, fanned out through Redis pub/sub so a WebSocket or SSE stream on any gateway
//! replica sees events produced by any other: the adapter behind the domain's [`EventSink`].
//!
//! Each replica publishes to one channel and runs one subscriber that feeds a local broadcast;
//! streams filter it by job. Events are a live feed, not a log: a client that reconnects reads
//! the job's current state first and then follows the feed.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::jobs::{EventSink, JobEvent};
use crate::shutdown::Shutdown;

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
        self.publish_all(vec![(account_id, event)]).await
    }

    /// Publishes each event to its owner, in order, in one round trip.
    pub async fn publish_all(&self, events: Vec<(Uuid, JobEvent)>) {
        if events.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for (account_id, event) in events {
            let payload =
                serde_json::to_string(&Published { account_id, event }).expect("events serialize");
            pipe.cmd("PUBLISH").arg(&self.channel).arg(payload).ignore();
        }
        let mut conn = self.redis.clone();
        let sent: redis::RedisResult<()> = pipe.query_async(&mut conn).await;
        if let Err(e) = sent {
            tracing::warn!(error = %e, "publishing job events to Redis failed");
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

impl EventSink for EventHub {
    fn publish(&self, account: Uuid, event: JobEvent) -> BoxFuture<'_, ()> {
        Box::pin(EventHub::publish(self, account, event))
    }

    fn publish_all(&self, events: Vec<(Uuid, JobEvent)>) -> BoxFuture<'_, ()> {
        Box::pin(EventHub::publish_all(self, events))
    }
}
