//! What HTTP handlers run on, cheap to clone into each: the job scheduler's handles plus what
//! only the edge needs (tokens, key status, the rate guard's Redis, the event feed, broker health). Nothing
//! below `http/` sees this type; each domain call gets the values it uses.

use std::ops::Deref;
use std::sync::Arc;

use sqlx::PgPool;

use crate::broker::Broker;
use crate::config::Config;
use crate::events::EventHub;
use crate::http::auth::JwtKeys;
use crate::http::credentials::Credentials;
use crate::jobs::Scheduler;
use crate::metrics::Metrics;
use crate::presence::RedisPresence;
use crate::shutdown::Shutdown;
use crate::transfers::TransferUrls;

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub config: Config,
    pub db: PgPool,
    /// The rate guard's counters and the readiness check.
    pub redis: redis::aio::ConnectionManager,
    /// For readiness only: handlers never send to nodes.
    pub broker: Broker,
    /// Local subscriptions to every replica's job events (SSE, WebSocket).
    pub events: EventHub,
    pub presence: RedisPresence,
    pub scheduler: Scheduler,
    pub metrics: Metrics,
    pub jwt: JwtKeys,
    /// API keys' status, cached for a second: what every credential is checked against.
    pub credentials: Credentials,
    /// Object storage for uploaded files, job outputs and shard transfers.
    pub files: Arc<dyn object_store::ObjectStore>,
    /// Checks the URLs workers fetch inputs from and upload outputs to.
    pub transfers: TransferUrls,
    /// Fired when the server stops accepting requests; long-lived streams close on it.
    pub shutdown: Shutdown,
}

impl AppState {
    pub fn new(inner: Inner) -> Self {
        Self(Arc::new(inner))
    }
}

impl Deref for AppState {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}
