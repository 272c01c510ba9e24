//! The gateway's side of the MQTT link: it signs and sends assignments, and admits worker
//! messages only after checking, in order: topic, signature (over the topic too), freshness,
//! that the signer is the node the topic names, that the node is registered and not banned,
//! and that the nonce was not seen before (in Redis, so the check spans gateway replicas).
//! Every drop is counted by reason in `xpand_rejected_messages_total`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::NetworkOptions;
use tokio::sync::Semaphore;
use xpand_protocol::{
    now_ms, Announce, AnnounceRequest, Assignment, Envelope, EnvelopeError, NodeKey,
    OpenedEnvelope, Progress, Reject, ShardResult, Stop, Topics, UpKind,
};

use crate::config::Config;
use crate::jobs::orchestrator;
use crate::nodes::{DirectoryEntry, NodeStanding};
use crate::shutdown::Shutdown;
use crate::state::AppState;

/// How far a message's timestamp may be from the gateway's clock. Nonces are remembered for
/// twice this, so a replay is caught either as stale or as a seen nonce.
pub const MAX_SKEW_MS: i64 = 30_000;
/// Gateways share worker traffic through this shared-subscription group.
const SHARED_GROUP: &str = "xpand-gateways";
/// Worker messages handled at once per replica.
const INBOUND_CONCURRENCY: usize = 64;

/// A signed envelope and the topic it goes to.
#[derive(Debug)]
pub struct SealedMessage {
    pub topic: String,
    pub payload: Vec<u8>,
}

#[derive(Clone)]
pub struct Broker {
    client: AsyncClient,
    topics: Topics,
    key: NodeKey,
    connected: Arc<AtomicBool>,
}

impl Broker {
    /// Creates the client; nothing is sent until [`run_inbound`] polls the returned event loop.
    pub fn new(config: &Config) -> (Self, EventLoop) {
        let client_id = format!("xpand-gw-{}", uuid::Uuid::new_v4().simple());
        let mut options = MqttOptions::new(client_id, &config.mqtt.host, config.mqtt.port);
        options.set_keep_alive(Duration::from_secs(15));
        options.set_clean_start(true);
        options.set_max_packet_size(Some(8 * 1024 * 1024));
        // Small request/response messages: Nagle plus delayed ACKs would add ~40 ms to each shard.
        let mut network = NetworkOptions::new();
        network.set_tcp_nodelay(true);
        options.set_network_options(network);
        let (client, eventloop) = AsyncClient::new(options, 1024);
        (
            Self {
                client,
                topics: Topics::new(&config.topic_prefix),
                key: config.gateway_key.clone(),
                connected: Arc::new(AtomicBool::new(false)),
            },
            eventloop,
        )
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Signs an assignment with the gateway key: the message [`Broker::send`] delivers, and the
    /// record that gets sealed into the ledger.
    pub fn seal_assignment(&self, assignment: &Assignment) -> SealedMessage {
        let topic = self.topics.assign(&assignment.node);
        let payload = self.key.seal(&topic, assignment);
        SealedMessage { topic, payload }
    }

    /// Tells `node` to stop running `assignment_id` (best effort: a worker that misses it just
    /// finishes, and its result is dropped as stale).
    pub async fn send_stop(&self, stop: &Stop) {
        let topic = self.topics.stop(&stop.node);
        let payload = self.key.seal(&topic, stop);
        if let Err(e) = self.send(SealedMessage { topic, payload }).await {
            tracing::warn!(error = %e, node = %stop.node, "sending a stop failed");
        }
    }

    /// Asks `node` to publish its capability statement again (best effort: the next heartbeat
    /// asks again).
    pub async fn request_announce(&self, node: &str) {
        let topic = self.topics.announce_request(node);
        let payload = self
            .key
            .seal(&topic, &AnnounceRequest { node: node.into() });
        if let Err(e) = self.send(SealedMessage { topic, payload }).await {
            tracing::warn!(error = %e, node, "asking for an announce failed");
        }
    }

    /// Sends a sealed message (QoS 1).
    pub async fn send(&self, message: SealedMessage) -> anyhow::Result<()> {
        self.client
            .publish(message.topic, QoS::AtLeastOnce, false, message.payload)
            .await?;
        Ok(())
    }

    pub async fn disconnect(&self) {
        let _ = self.client.disconnect().await;
    }

    async fn subscribe_all(&self) -> Result<(), rumqttc::v5::ClientError> {
        for kind in UpKind::ALL {
            // Capability statements are retained and every replica keeps its own view of
            // them; the rest is work, shared so each message is handled once.
            let filter = if kind == UpKind::Announce {
                self.topics.up_filter(kind)
            } else {
                self.topics.shared_up_filter(SHARED_GROUP, kind)
            };
            self.client.subscribe(filter, QoS::AtLeastOnce).await?;
        }
        Ok(())
    }
}

/// Drives the MQTT connection until `shutdown`: (re)subscribes on every connect, hands each
/// worker message to a task, and backs off while the broker is unreachable.
pub async fn run_inbound(state: AppState, mut eventloop: EventLoop, shutdown: Shutdown) {
    let permits = Arc::new(Semaphore::new(INBOUND_CONCURRENCY));
    let mut backoff = Duration::from_millis(100);
    loop {
        let event = tokio::select! {
            event = eventloop.poll() => event,
            _ = shutdown.wait() => break,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(100);
                state.broker.connected.store(true, Ordering::Relaxed);
                tracing::info!("connected to the MQTT broker");
                let broker = state.broker.clone();
                tokio::spawn(async move {
                    if let Err(e) = broker.subscribe_all().await {
                        tracing::error!(error = %e, "subscribing to worker topics failed");
                    }
                });
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                    handle_message(&state, &topic, &publish.payload).await;
                    drop(permit);
                });
            }
            Ok(_) => {}
            Err(e) => {
                state.broker.connected.store(false, Ordering::Relaxed);
                tracing::warn!(error = %e, retry_in = ?backoff, "MQTT connection error");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    state.broker.connected.store(false, Ordering::Relaxed);
}

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

/// Verifies a worker message; returns it opened, with its kind and its node's entry.
pub async fn admit(state: &AppState, topic: &str, payload: &[u8]) -> Result<Admitted, DropReason> {
    let topics = &state.broker.topics;
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
    let entry = match state.node_directory.lookup(&state.db, &opened.signer).await {
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
        let prefix = &state.config.redis_prefix;
        let nonce = format!("{prefix}:nonce:{}:{}", opened.signer, opened.nonce);
        let second = now_ms() / 1000;
        let rate = format!("{prefix}:rate:{}:{second}", opened.signer);
        let mut conn = state.redis.clone();
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
            Ok((_, count)) if count > u64::from(state.config.node_msgs_per_sec) => {
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

/// A worker message that passed every check, with what the gateway knows of its node.
pub struct Admitted {
    pub kind: UpKind,
    pub opened: OpenedEnvelope,
    pub entry: DirectoryEntry,
}

/// Admits one worker message and acts on it; drops are counted, never returned. The MQTT loop
/// calls this for each publish (the scheduler simulation calls it directly).
pub async fn handle_message(state: &AppState, topic: &str, payload: &[u8]) {
    let Admitted {
        kind,
        opened,
        entry,
    } = match admit(state, topic, payload).await {
        Ok(admitted) => admitted,
        Err(reason) => {
            tracing::debug!(topic, reason = reason.label(), "dropped a worker message");
            state.metrics.reject(reason.label());
            return;
        }
    };
    state
        .metrics
        .worker_messages
        .with_label_values(&[kind.as_str()])
        .inc();
    let node = opened.signer.as_str();
    let outcome = match kind {
        UpKind::Announce => match opened.parse::<Announce>() {
            Ok(announce) => on_announce(state, node, opened.ts, &announce, payload).await,
            Err(_) => Err(DropReason::BadBody.into()),
        },
        UpKind::Heartbeat => {
            if !entry.announced {
                // A live node we hold no statement of (it announced before it was registered,
                // or the broker lost its retained statement): without one it gets no work.
                state.broker.request_announce(node).await;
            }
            on_heartbeat(state, node).await
        }
        UpKind::Progress => match opened.parse::<Progress>() {
            Ok(p) => orchestrator::on_progress(state, node, &p).await,
            Err(_) => Err(DropReason::BadBody.into()),
        },
        UpKind::Result => match opened.parse::<ShardResult>() {
            Ok(r) => orchestrator::on_result(state, node, r).await,
            Err(_) => Err(DropReason::BadBody.into()),
        },
        UpKind::Reject => match opened.parse::<Reject>() {
            Ok(r) => orchestrator::on_reject(state, node, &r).await,
            Err(_) => Err(DropReason::BadBody.into()),
        },
    };
    if let Err(e) = outcome {
        match e.downcast_ref::<DropReason>() {
            Some(reason) => state.metrics.reject(reason.label()),
            None => {
                tracing::error!(error = ?e, kind = kind.as_str(), node, "handling a worker message failed")
            }
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

impl std::error::Error for DropReason {}

async fn on_announce(
    state: &AppState,
    node: &str,
    signed_at_ms: i64,
    announce: &Announce,
    envelope: &[u8],
) -> anyhow::Result<()> {
    if crate::nodes::record_announce(&state.db, node, signed_at_ms, announce, envelope).await? {
        tracing::info!(node, name = %announce.name, models = announce.models.len(), "node announced");
        state.node_directory.forget(node).await;
        if announce.started_at_ms > 0 {
            // A new process: shards its predecessor held are not coming back.
            orchestrator::requeue_lost(
                state,
                orchestrator::Lost::Restarted {
                    node,
                    started_at_ms: announce.started_at_ms,
                },
            )
            .await?;
        }
    }
    // An announce is proof of life only while it is fresh (a retained one may be old).
    if now_ms().saturating_sub(signed_at_ms).saturating_abs() <= MAX_SKEW_MS {
        on_heartbeat(state, node).await?;
    }
    state.wake_dispatcher();
    Ok(())
}

/// Proof of life: liveness for dispatch, and an uptime slot for the epoch's power score.
async fn on_heartbeat(state: &AppState, node: &str) -> anyhow::Result<()> {
    state.liveness.beat(node).await?;
    crate::epochs::record_uptime(state, node).await?;
    Ok(())
}
