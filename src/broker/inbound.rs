//! Worker messages in: each is admitted only after checking, in order: topic, signature (over
//! the topic too), freshness, that the signer is the node the topic names, that the node is
//! registered and not banned, and that the nonce was not seen before (in Redis, so the check
//! spans gateway replicas). Then it becomes a typed call on the domain. Every drop is counted
//! by reason in `xpand_rejected_messages_total`.

use std::sync::Arc;

use xpand_protocol::{
    now_ms, Announce, Envelope, EnvelopeError, OpenedEnvelope, Progress, Reject, ShardResult,
    UpKind,
};

use super::Broker;
use crate::jobs::results::{self, Refused};
use crate::jobs::sweep::{self, Lost};
use crate::jobs::Scheduler;
use crate::nodes::{self, DirectoryEntry, NodeDirectory, NodeStanding};
use crate::presence::RedisPresence;

/// How far a message's timestamp may be from the gateway's clock. Nonces are remembered for
/// twice this, so a replay is caught either as stale or as a seen nonce.
pub const MAX_SKEW_MS: i64 = 30_000;

/// Why a worker message was dropped; the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    BadTopic,
    Malformed,
    BadSignature,
    Stale,
    CrossNode,
    UnknownNode,
    BannedNode,
    Replayed,
    ReplayCheckUnavailable,
    BadBody,
    /// Progress or a result for an attempt that is no longer current (re-dispatched, canceled).
    StaleAssignment,
    /// A result that failed verification (digest, hash chain or shape).
    BadResult,
    /// More messages this second than a node may send (`XPAND_NODE_MSGS_PER_SEC`).
    RateLimited,
}

impl DropReason {
    /// Every reason, for whoever must tell a real label from a misspelt one.
    pub const ALL: [DropReason; 13] = [
        DropReason::BadTopic,
        DropReason::Malformed,
        DropReason::BadSignature,
        DropReason::Stale,
        DropReason::CrossNode,
        DropReason::UnknownNode,
        DropReason::BannedNode,
        DropReason::Replayed,
        DropReason::ReplayCheckUnavailable,
        DropReason::BadBody,
        DropReason::StaleAssignment,
        DropReason::BadResult,
        DropReason::RateLimited,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DropReason::BadTopic => "bad_topic",
            DropReason::Malformed => "malformed",
            DropReason::BadSignature => "bad_signature",
            DropReason::Stale => "stale",
            DropReason::CrossNode => "cross_node",
            DropReason::UnknownNode => "unknown_node",
            DropReason::BannedNode => "banned_node",
            DropReason::Replayed => "replayed",
            DropReason::ReplayCheckUnavailable => "replay_check_unavailable",
            DropReason::BadBody => "bad_body",
            DropReason::StaleAssignment => "stale_assignment",
            DropReason::BadResult => "bad_result",
            DropReason::RateLimited => "rate_limited",
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

impl std::error::Error for DropReason {}

/// What handling worker messages takes: the scheduler to act on, the node directory and
/// presence to consult and renew, and Redis for the replay and rate checks.
#[derive(Clone)]
pub struct Inbound {
    /// Asks nodes to announce again; its topics parse what arrives.
    pub broker: Broker,
    pub scheduler: Scheduler,
    pub directory: Arc<NodeDirectory>,
    pub presence: RedisPresence,
    pub redis: redis::aio::ConnectionManager,
    pub redis_prefix: String,
    /// Most messages one node may send a second (`XPAND_NODE_MSGS_PER_SEC`).
    pub node_msgs_per_sec: u32,
}

impl Inbound {
    /// Verifies a worker message; returns it opened, with its kind and its node's entry.
    pub async fn admit(&self, topic: &str, payload: &[u8]) -> Result<Admitted, DropReason> {
        let topics = &self.broker.topics;
        let (topic_node, kind) = topics.parse_up(topic).ok_or(DropReason::BadTopic)?;
        // A capability statement is retained and re-read on every (re)subscribe, so it may be old;
        // replaying one is harmless because only a newer statement replaces the stored one.
        let max_skew = if kind == UpKind::Announce {
            i64::MAX
        } else {
            MAX_SKEW_MS
        };
        let opened = Envelope::open(payload, topic, now_ms(), max_skew).map_err(|e| match e {
            EnvelopeError::BadSignature => DropReason::BadSignature,
            EnvelopeError::Stale { .. } => DropReason::Stale,
            _ => DropReason::Malformed,
        })?;
        if opened.signer != topic_node {
            return Err(DropReason::CrossNode);
        }
        let entry = match self
            .directory
            .lookup(&self.scheduler.db, &opened.signer)
            .await
        {
            Ok(Some(entry)) if entry.standing == NodeStanding::Banned => {
                return Err(DropReason::BannedNode)
            }
            Ok(Some(entry)) => entry,
            Ok(None) => return Err(DropReason::UnknownNode),
            Err(e) => {
                tracing::warn!(error = %e, "node lookup failed");
                return Err(DropReason::UnknownNode);
            }
        };
        if kind != UpKind::Announce {
            // One round trip: remember the nonce, and count the node's messages this second (a
            // window shared by every replica).
            let prefix = &self.redis_prefix;
            let nonce = format!("{prefix}:nonce:{}:{}", opened.signer, opened.nonce);
            let second = now_ms() / 1000;
            let rate = format!("{prefix}:rate:{}:{second}", opened.signer);
            let mut conn = self.redis.clone();
            let checked: redis::RedisResult<(Option<String>, u64)> = redis::pipe()
                .cmd("SET")
                .arg(nonce)
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(2 * MAX_SKEW_MS)
                .cmd("INCR")
                .arg(&rate)
                .cmd("EXPIRE")
                .arg(&rate)
                .arg(2)
                .ignore()
                .query_async(&mut conn)
                .await;
            match checked {
                Ok((_, count)) if count > u64::from(self.node_msgs_per_sec) => {
                    return Err(DropReason::RateLimited)
                }
                Ok((Some(_), _)) => {}
                Ok((None, _)) => return Err(DropReason::Replayed),
                Err(e) => {
                    tracing::warn!(error = %e, "replay check failed; dropping the message");
                    return Err(DropReason::ReplayCheckUnavailable);
                }
            }
        }
        Ok(Admitted {
            kind,
            opened,
            entry,
        })
    }

    /// Admits one worker message and acts on it; drops are counted, never returned. The MQTT loop
    /// calls this for each publish, concurrently: results that arrive together are settled
    /// together all the same ([`results::on_results`]).
    pub async fn handle_message(&self, topic: &str, payload: &[u8]) {
        self.handle_messages(&[(topic, payload)]).await
    }

    /// Admits worker messages and acts on them, the results among them as one batch after the
    /// others; drops are counted, never returned. The scheduler simulation hands it what its
    /// nodes sent in one step.
    pub async fn handle_messages(&self, messages: &[(&str, &[u8])]) {
        let mut results = Vec::new();
        for &(topic, payload) in messages {
            let Admitted {
                kind,
                opened,
                entry,
            } = match self.admit(topic, payload).await {
                Ok(admitted) => admitted,
                Err(reason) => {
                    tracing::debug!(topic, reason = reason.label(), "dropped a worker message");
                    self.scheduler.metrics.reject(reason.label());
                    continue;
                }
            };
            self.scheduler
                .metrics
                .worker_messages
                .with_label_values(&[kind.as_str()])
                .inc();
            let node = opened.signer.as_str();
            let outcome = match kind {
                UpKind::Announce => match opened.parse::<Announce>() {
                    Ok(announce) => self.on_announce(node, opened.ts, &announce, payload).await,
                    Err(_) => Err(DropReason::BadBody.into()),
                },
                UpKind::Heartbeat => {
                    if !entry.announced {
                        // A live node we hold no statement of (it announced before it was
                        // registered, or the broker lost its retained statement): without one it
                        // gets no work.
                        self.broker.request_announce(node).await;
                    }
                    self.on_heartbeat(node).await
                }
                UpKind::Progress => match opened.parse::<Progress>() {
                    Ok(p) => results::on_progress(&self.scheduler, node, &p).await,
                    Err(_) => Err(DropReason::BadBody.into()),
                },
                UpKind::Result => match opened.parse::<ShardResult>() {
                    Ok(r) => {
                        results.push((node.to_string(), r));
                        continue;
                    }
                    Err(_) => Err(DropReason::BadBody.into()),
                },
                UpKind::Reject => match opened.parse::<Reject>() {
                    Ok(r) => results::on_reject(&self.scheduler, node, &r).await,
                    Err(_) => Err(DropReason::BadBody.into()),
                },
            };
            self.count_outcome(kind, node, outcome);
        }
        if results.is_empty() {
            return;
        }
        let nodes: Vec<String> = results.iter().map(|(node, _)| node.clone()).collect();
        let outcomes = results::on_results(&self.scheduler, results).await;
        for (node, outcome) in nodes.iter().zip(outcomes) {
            self.count_outcome(UpKind::Result, node, outcome);
        }
    }

    /// Counts a message that was refused by its reason, and logs one that failed.
    fn count_outcome(&self, kind: UpKind, node: &str, outcome: anyhow::Result<()>) {
        let Err(e) = outcome else {
            return;
        };
        let reason = match e.downcast_ref::<Refused>() {
            Some(Refused::StaleAssignment) => Some(DropReason::StaleAssignment),
            Some(Refused::OtherNode) => Some(DropReason::CrossNode),
            Some(Refused::BadResult) => Some(DropReason::BadResult),
            None => e.downcast_ref::<DropReason>().copied(),
        };
        match reason {
            Some(reason) => self.scheduler.metrics.reject(reason.label()),
            None => {
                tracing::error!(error = ?e, kind = kind.as_str(), node, "handling a worker message failed")
            }
        }
    }

    async fn on_announce(
        &self,
        node: &str,
        signed_at_ms: i64,
        announce: &Announce,
        envelope: &[u8],
    ) -> anyhow::Result<()> {
        if nodes::record_announce(&self.scheduler.db, node, signed_at_ms, announce, envelope)
            .await?
        {
            tracing::info!(node, name = %announce.name, models = announce.models.len(), "node announced");
            self.directory.forget(node).await;
            if announce.started_at_ms > 0 {
                // A new process: shards its predecessor held are not coming back.
                sweep::requeue_lost(
                    &self.scheduler,
                    Lost::Restarted {
                        node,
                        started_at_ms: announce.started_at_ms,
                    },
                )
                .await?;
            }
        }
        // An announce is proof of life only while it is fresh (a retained one may be old).
        if now_ms().saturating_sub(signed_at_ms).saturating_abs() <= MAX_SKEW_MS {
            self.on_heartbeat(node).await?;
        }
        self.scheduler.wake_dispatcher();
        Ok(())
    }

    /// Proof of life: liveness for dispatch, and an uptime slot for the epoch's power score.
    async fn on_heartbeat(&self, node: &str) -> anyhow::Result<()> {
        self.presence.beat(node).await?;
        Ok(())
    }
}

/// A worker message that passed every check, with what the gateway knows of its node.
pub struct Admitted {
    pub kind: UpKind,
    pub opened: OpenedEnvelope,
    pub entry: DirectoryEntry,
}
