//! Long-lived streams (WebSockets and SSE event streams) under the same rules as requests:
//! how many one account may hold open, counted across every replica in Redis, and the watch
//! that ends a stream once its credential ends (the token expires, the key is revoked, the
//! account is no longer a customer's).
//!
//! Each account's open streams are a Redis sorted set of stream ids scored by when their lease
//! lapses. Opening prunes lapsed entries and adds one if the set is below the cap (one Lua
//! script, so replicas cannot race past it); a live stream renews its lease; closing removes
//! it. A replica that crashes leaves entries that lapse on their own within [`LEASE`].

use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::Script;
use uuid::Uuid;

use crate::error::AppError;
use crate::http::auth::Caller;
use crate::http::state::AppState;

/// How long a stream's place is held without renewal.
const LEASE: Duration = Duration::from_secs(30);
/// How often a live stream renews its place.
const RENEW: Duration = Duration::from_secs(10);
/// How often an open stream re-checks its credential.
pub const CHECK: Duration = Duration::from_secs(1);

const OPEN: &str = r"
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// One stream's place among its account's open streams; given back when dropped.
pub struct StreamSlot {
    redis: ConnectionManager,
    set: String,
    id: String,
    renewed: Instant,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Takes a place for a new stream of `caller`'s account, or refuses with a 429 problem when the
/// account holds `XPAND_MAX_STREAMS_PER_ACCOUNT` already. Redis being down lets the stream
/// open, as with the rate limit.
pub async fn open(state: &AppState, caller: &Caller) -> Result<StreamSlot, AppError> {
    let limit = state.config.limits.max_streams_per_account;
    let slot = StreamSlot {
        redis: state.redis.clone(),
        set: format!(
            "{}:streams:{}",
            state.config.redis_prefix, caller.account_id
        ),
        id: Uuid::new_v4().to_string(),
        renewed: Instant::now(),
    };
    let taken: redis::RedisResult<i64> = Script::new(OPEN)
        .key(&slot.set)
        .arg(now_ms())
        .arg(limit)
        .arg(LEASE.as_millis() as i64)
        .arg(&slot.id)
        .invoke_async(&mut slot.redis.clone())
        .await;
    match taken {
        Ok(0) => Err(AppError::TooManyStreams { limit }),
        Ok(_) => Ok(slot),
        Err(e) => {
            tracing::warn!(error = %e, "the stream cap is off while Redis is unreachable");
            Ok(slot)
        }
    }
}

impl StreamSlot {
    async fn renew_if_due(&mut self) {
        if self.renewed.elapsed() < RENEW {
            return;
        }
        self.renewed = Instant::now();
        let lease = LEASE.as_millis() as i64;
        let renewed: redis::RedisResult<()> = redis::pipe()
            .cmd("ZADD")
            .arg(&self.set)
            .arg("XX")
            .arg(now_ms() + lease)
            .arg(&self.id)
            .ignore()
            .pexpire(&self.set, lease)
            .ignore()
            .query_async(&mut self.redis)
            .await;
        if let Err(e) = renewed {
            tracing::warn!(error = %e, "renewing a stream's place");
        }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let (mut redis, set, id) = (self.redis.clone(), self.set.clone(), self.id.clone());
        // Without a runtime (the process is ending) the lease lapses on its own.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _: redis::RedisResult<()> = redis::cmd("ZREM")
                    .arg(&set)
                    .arg(&id)
                    .query_async(&mut redis)
                    .await;
            });
        }
    }
}

/// Why a stream's credential ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The token's `exp` passed: reconnect with a fresh token.
    TokenExpired,
    /// The API key (or the key the token was minted from) was revoked, or the account is no
    /// longer a customer's.
    Revoked,
}

impl Ended {
    pub fn error(self) -> AppError {
        match self {
            Ended::TokenExpired => {
                AppError::Unauthorized("the token expired; reconnect with a fresh token")
            }
            Ended::Revoked => AppError::Unauthorized("the API key was revoked"),
        }
    }
}

/// Holds the stream's place and resolves when its credential ends: at the token's expiry, or at
/// the first check (every [`CHECK`], see [`ended`]) that finds the key revoked. Dropping the
/// returned future gives the place back.
pub async fn watch(state: AppState, caller: Caller, mut slot: StreamSlot) -> Ended {
    let expiry = token_expiry(&caller);
    tokio::pin!(expiry);
    let mut check = tokio::time::interval(CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut expiry => return Ended::TokenExpired,
            _ = check.tick() => {
                if let Some(ended) = ended(&state, &caller).await {
                    return ended;
                }
                slot.renew_if_due().await;
            }
        }
    }
}

/// Whether `caller`'s credential has ended, by the key cache (at most a second old). A database
/// error is not an ending: a blip must not drop every open stream.
pub async fn ended(state: &AppState, caller: &Caller) -> Option<Ended> {
    if caller
        .expires_at
        .is_some_and(|exp| exp <= jsonwebtoken::get_current_timestamp())
    {
        return Some(Ended::TokenExpired);
    }
    match caller.still_live(state).await {
        Ok(true) => None,
        Ok(false) => Some(Ended::Revoked),
        Err(e) => {
            tracing::warn!(error = %e, "re-checking a stream's credential");
            None
        }
    }
}

/// Resolves when the caller's token expires (never for an API key).
async fn token_expiry(caller: &Caller) {
    match caller.expires_at {
        Some(exp) => {
            let now = jsonwebtoken::get_current_timestamp();
            tokio::time::sleep(Duration::from_secs(exp.saturating_sub(now))).await;
        }
        None => std::future::pending().await,
    }
}
