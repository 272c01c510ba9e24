//! Node presence in Redis: the adapter behind [`crate::nodes::Presence`].
//!
//! A verified heartbeat sets the node's liveness key (expiring after `XPAND_NODE_TTL_SECS`) and
//! the bit of the current slot in its uptime bitmap for the epoch, in one round trip. Dispatch
//! reads liveness; the epoch closer reads the bitmaps. Keys live under the configured prefix, so
//! gateways of one deployment share them and tests keep theirs apart.

use std::time::Duration;

use chrono::Utc;
use futures::future::BoxFuture;

use crate::epochs::EpochClock;
use crate::nodes::Presence;

#[derive(Clone)]
pub struct RedisPresence {
    redis: redis::aio::ConnectionManager,
    prefix: String,
    ttl: Duration,
    clock: EpochClock,
}

impl RedisPresence {
    pub fn new(
        redis: redis::aio::ConnectionManager,
        prefix: &str,
        ttl: Duration,
        clock: EpochClock,
    ) -> Self {
        Self {
            redis,
            prefix: prefix.to_string(),
            ttl,
            clock,
        }
    }

    fn alive_key(&self, node_id: &str) -> String {
        format!("{}:node-alive:{node_id}", self.prefix)
    }

    fn uptime_key(&self, epoch: i64, node_id: &str) -> String {
        format!("{}:uptime:{epoch}:{node_id}", self.prefix)
    }

    /// Proof of life: `node_id` is alive for one TTL, and up in the current slot.
    pub async fn beat(&self, node_id: &str) -> redis::RedisResult<()> {
        let (epoch, slot) = self.clock.locate(Utc::now());
        let uptime = self.uptime_key(epoch, node_id);
        let mut conn = self.redis.clone();
        redis::pipe()
            .cmd("SET")
            .arg(self.alive_key(node_id))
            .arg(1)
            .arg("PX")
            .arg(self.ttl.as_millis() as u64)
            .ignore()
            .cmd("SETBIT")
            .arg(&uptime)
            .arg(slot)
            .arg(1)
            .ignore()
            .cmd("EXPIRE")
            .arg(&uptime)
            .arg(3 * self.clock.length.as_secs().max(60))
            .ignore()
            .query_async(&mut conn)
            .await
    }

    /// Ends `node_id`'s liveness now, as if its heartbeats had lapsed.
    pub async fn forget(&self, node_id: &str) -> redis::RedisResult<()> {
        let mut conn = self.redis.clone();
        redis::cmd("DEL")
            .arg(self.alive_key(node_id))
            .query_async(&mut conn)
            .await
    }
}

impl Presence for RedisPresence {
    fn alive<'a>(&'a self, nodes: &'a [String]) -> BoxFuture<'a, anyhow::Result<Vec<bool>>> {
        Box::pin(async move {
            if nodes.is_empty() {
                return Ok(Vec::new());
            }
            let mut conn = self.redis.clone();
            let keys: Vec<String> = nodes.iter().map(|n| self.alive_key(n)).collect();
            let values: Vec<Option<String>> =
                redis::cmd("MGET").arg(keys).query_async(&mut conn).await?;
            Ok(values.into_iter().map(|v| v.is_some()).collect())
        })
    }

    fn uptime_slots<'a>(
        &'a self,
        epoch: i64,
        nodes: &'a [String],
    ) -> BoxFuture<'a, anyhow::Result<Vec<i64>>> {
        Box::pin(async move {
            if nodes.is_empty() {
                return Ok(Vec::new());
            }
            let mut conn = self.redis.clone();
            let mut pipe = redis::pipe();
            for node in nodes {
                pipe.cmd("BITCOUNT").arg(self.uptime_key(epoch, node));
            }
            Ok(pipe.query_async(&mut conn).await?)
        })
    }
}
