//! Shared application state, cheap to clone into every handler and background task.

use std::ops::Deref;
use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::Notify;

use crate::auth::JwtKeys;
use crate::broker::Broker;
use crate::config::Config;
use crate::events::EventHub;
use crate::metrics::Metrics;
use crate::nodes::{Liveness, NodeDirectory};
use crate::shutdown::Shutdown;

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub config: Config,
    pub db: PgPool,
    pub redis: redis::aio::ConnectionManager,
    pub broker: Broker,
    pub events: EventHub,
    pub liveness: Liveness,
    pub node_directory: Arc<NodeDirectory>,
    pub metrics: Metrics,
    pub jwt: JwtKeys,
    pub epoch_clock: crate::epochs::EpochClock,
    /// Object storage for uploaded files, job outputs and shard transfers.
    pub files: Arc<dyn object_store::ObjectStore>,
    /// Signs the URLs workers fetch inputs from and upload outputs to.
    pub transfers: crate::transfers::TransferUrls,
    /// Wakes the dispatcher: new pending shards or freed capacity.
    pub dispatch_wakeup: Notify,
    /// Fired when the server stops accepting requests; long-lived streams close on it.
    pub shutdown: Shutdown,
}

impl AppState {
    pub fn new(inner: Inner) -> Self {
        Self(Arc::new(inner))
    }

    /// Asks the dispatcher to look for work now rather than at its next tick.
    pub fn wake_dispatcher(&self) {
        self.dispatch_wakeup.notify_one();
    }
}

impl Deref for AppState {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}
