//! What the state machine needs from the link to the nodes, as the domain sees it: seal an
//! assignment, send it, tell a node to stop. The MQTT adapter (`crate::broker`) implements it;
//! a test can implement it with a channel.

use futures::future::BoxFuture;
use xpand_protocol::{Assignment, Stop};

/// A signed envelope and the topic it goes to. The same bytes are sealed into the ledger and
/// sent, so what a node received is what the ledger proves.
#[derive(Debug, Clone)]
pub struct SealedMessage {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// The gateway's side of the link to worker nodes.
pub trait NodeLink: Send + Sync {
    /// Signs an assignment with the gateway key, for the node it names.
    fn seal_assignment(&self, assignment: &Assignment) -> SealedMessage;
    /// Delivers a sealed message (at least once).
    fn send(&self, message: SealedMessage) -> BoxFuture<'_, anyhow::Result<()>>;
    /// Tells a node to stop running an assignment. Best effort: a worker that misses it just
    /// finishes, and its result is dropped as stale.
    fn send_stop<'a>(&'a self, stop: &'a Stop) -> BoxFuture<'a, ()>;
}
