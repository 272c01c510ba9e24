//! The topic tree. Everything lives under `{prefix}/v1/`, so tests and tenants can share a broker.
//!
//! - `{prefix}/v1/up/{node}/{kind}`: worker → gateway (`announce`, `heartbeat`, `progress`,
//!   `result`, `reject`). Gateways read these through a shared subscription, so each message is
//!   handled by one replica; `announce` is retained and read by every replica.
//! - `{prefix}/v1/down/{node}/assign`: gateway → one worker.
//! - `{prefix}/v1/down/{node}/stop`: gateway → one worker: drop a running shard (another node
//!   answered it first).
//! - `{prefix}/v1/down/{node}/announce`: gateway → one worker: announce again (the gateway has
//!   no capability statement of this node).

use crate::PROTOCOL_VERSION;

/// What a worker → gateway message is; the last topic level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpKind {
    Announce,
    Heartbeat,
    Progress,
    Result,
    Reject,
}

impl UpKind {
    pub const ALL: [UpKind; 5] = [
        UpKind::Announce,
        UpKind::Heartbeat,
        UpKind::Progress,
        UpKind::Result,
        UpKind::Reject,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpKind::Announce => "announce",
            UpKind::Heartbeat => "heartbeat",
            UpKind::Progress => "progress",
            UpKind::Result => "result",
            UpKind::Reject => "reject",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Builds and parses topics for one prefix.
#[derive(Debug, Clone)]
pub struct Topics {
    root: String,
}

impl Topics {
    pub fn new(prefix: &str) -> Self {
        let prefix = prefix.trim_end_matches('/');
        Self {
            root: format!("{prefix}/{PROTOCOL_VERSION}"),
        }
    }

    pub fn up(&self, node: &str, kind: UpKind) -> String {
        format!("{}/up/{node}/{}", self.root, kind.as_str())
    }

    pub fn assign(&self, node: &str) -> String {
        format!("{}/down/{node}/assign", self.root)
    }

    pub fn stop(&self, node: &str) -> String {
        format!("{}/down/{node}/stop", self.root)
    }

    pub fn announce_request(&self, node: &str) -> String {
        format!("{}/down/{node}/announce", self.root)
    }

    /// Filter for every worker → gateway message of one kind.
    pub fn up_filter(&self, kind: UpKind) -> String {
        format!("{}/up/+/{}", self.root, kind.as_str())
    }

    /// Shared-subscription form of [`Topics::up_filter`]: the broker hands each message to one
    /// member of `group`.
    pub fn shared_up_filter(&self, group: &str, kind: UpKind) -> String {
        format!("$share/{group}/{}", self.up_filter(kind))
    }

    /// Parses `{root}/up/{node}/{kind}` into the node id (as written in the topic) and kind.
    pub fn parse_up<'a>(&self, topic: &'a str) -> Option<(&'a str, UpKind)> {
        let rest = topic.strip_prefix(&self.root)?.strip_prefix("/up/")?;
        let (node, kind) = rest.split_once('/')?;
        if node.is_empty() || kind.contains('/') {
            return None;
        }
        Some((node, UpKind::parse(kind)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_topics_round_trip() {
        let t = Topics::new("test-1/");
        let topic = t.up("abcd", UpKind::Result);
        assert_eq!(topic, "test-1/v1/up/abcd/result");
        assert_eq!(t.parse_up(&topic), Some(("abcd", UpKind::Result)));
        assert_eq!(t.parse_up("other/v1/up/abcd/result"), None);
        assert_eq!(t.parse_up("test-1/v1/up/abcd/bogus"), None);
        assert_eq!(t.parse_up("test-1/v1/up/abcd/result/extra"), None);
        assert_eq!(
            t.shared_up_filter("gw", UpKind::Heartbeat),
            "$share/gw/test-1/v1/up/+/heartbeat"
        );
    }
}
