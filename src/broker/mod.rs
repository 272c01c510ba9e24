//! The gateway's side of the MQTT link, an adapter: it signs and sends what the domain asks
//! ([`NodeLink`]), and turns worker messages into typed calls on the domain ([`inbound`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use tokio::sync::Semaphore;
use xpand_protocol::{AnnounceRequest, Assignment, NodeKey, Stop, Topics, UpKind};

use crate::config::Config;
use crate::jobs::ports::{NodeLink, SealedMessage};
use crate::shutdown::Shutdown;

mod inbound;

pub use inbound::{DropReason, Inbound, MAX_SKEW_MS};

/// Gateways share worker traffic through this shared-subscription group.
const SHARED_GROUP: &str = "xpand-gateways";
/// Worker messages handled at once per replica.
const INBOUND_CONCURRENCY: usize = 64;

#[derive(Clone)]
pub struct Broker {
    client: AsyncClient,
    topics: Topics,
    key: NodeKey,
    connected: Arc<AtomicBool>,
    /// Whether this replica is in the shared subscriptions that hand out worker messages.
    taking_work: Arc<AtomicBool>,
}

impl Broker {
    /// Creates the client; nothing is sent until [`run_inbound`] polls the returned event loop.
    pub fn new(config: &Config) -> (Self, EventLoop) {
        let client_id = format!("xpand-gw-{}", uuid::Uuid::new_v4().simple());
        let mut options = config.mqtt.mqtt_options(client_id);
        options.set_keep_alive(Duration::from_secs(15));
        options.set_clean_start(true);
        options.set_max_packet_size(Some(8 * 1024 * 1024));
        let (client, eventloop) = AsyncClient::new(options, 1024);
        (
            Self {
                client,
                topics: Topics::new(&config.topic_prefix),
                key: config.gateway_key.clone(),
                connected: Arc::new(AtomicBool::new(false)),
                taking_work: Arc::new(AtomicBool::new(true)),
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

    /// Joins or leaves the shared subscriptions. A replica that cannot settle (its Postgres is
    /// unreachable) leaves, so the broker hands worker messages to the replicas that can,
    /// instead of to one that would hold them until their leases lapse.
    pub async fn take_work(&self, take: bool) {
        if self.taking_work.swap(take, Ordering::SeqCst) == take {
            return;
        }
        let changed = if take {
            tracing::info!("joining the shared subscriptions again");
            self.subscribe_shared().await
        } else {
            tracing::warn!("leaving the shared subscriptions while Postgres is unreachable");
            self.unsubscribe_shared().await
        };
        // Queued by the client and sent once connected; a reconnect subscribes per the flag.
        if let Err(e) = changed {
            tracing::warn!(error = %e, "changing the shared subscriptions failed");
        }
    }

    async fn subscribe_all(&self) -> Result<(), rumqttc::v5::ClientError> {
        // Capability statements are retained and every replica keeps its own view of them;
        // the rest is work, shared so each message is handled once.
        self.client
            .subscribe(self.topics.up_filter(UpKind::Announce), QoS::AtLeastOnce)
            .await?;
        if self.taking_work.load(Ordering::SeqCst) {
            self.subscribe_shared().await?;
        }
        Ok(())
    }

    fn shared_filters(&self) -> impl Iterator<Item = String> + '_ {
        UpKind::ALL
            .into_iter()
            .filter(|kind| *kind != UpKind::Announce)
            .map(|kind| self.topics.shared_up_filter(SHARED_GROUP, kind))
    }

    async fn subscribe_shared(&self) -> Result<(), rumqttc::v5::ClientError> {
        for filter in self.shared_filters() {
            self.client.subscribe(filter, QoS::AtLeastOnce).await?;
        }
        Ok(())
    }

    async fn unsubscribe_shared(&self) -> Result<(), rumqttc::v5::ClientError> {
        for filter in self.shared_filters() {
            self.client.unsubscribe(filter).await?;
        }
        Ok(())
    }
}

/// How often [`follow_database`] checks Postgres, and how long one check may take: a
/// `SELECT 1` on a connection of its own that needs a second is a sick link already.
const DATABASE_CHECK: Duration = Duration::from_millis(500);
const DATABASE_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Keeps this replica in the shared subscriptions only while it reaches Postgres: two checks
/// in a row that fail take it out, one that passes puts it back. The checks use a connection of
/// their own, so a pool busy with work is not mistaken for a partition.
pub async fn follow_database(broker: Broker, db: sqlx::PgPool, shutdown: Shutdown) {
    use sqlx::Connection as _;
    let options = db.connect_options();
    let mut connection: Option<sqlx::PgConnection> = None;
    let mut failures = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(DATABASE_CHECK) => {}
            _ = shutdown.wait() => return,
        }
        let reached = tokio::time::timeout(DATABASE_CHECK_TIMEOUT, async {
            if connection.is_none() {
                connection = Some(sqlx::PgConnection::connect_with(&options).await?);
            }
            let conn = connection.as_mut().expect("connected above");
            sqlx::query("SELECT 1").execute(conn).await.map(drop)
        })
        .await
        .is_ok_and(|checked| checked.is_ok());
        if reached {
            failures = 0;
            broker.take_work(true).await;
        } else {
            // A connection that timed out may be stuck on a dead path: make a new one.
            connection = None;
            failures += 1;
            if failures >= 2 {
                broker.take_work(false).await;
            }
        }
    }
}

/// Drives the MQTT connection until `shutdown`: (re)subscribes on every connect, hands each
/// worker message to a task, and backs off while the broker is unreachable.
pub async fn run_inbound(inbound: Inbound, mut eventloop: EventLoop, shutdown: Shutdown) {
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
                inbound.broker.connected.store(true, Ordering::Relaxed);
                tracing::info!("connected to the MQTT broker");
                let broker = inbound.broker.clone();
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
                let inbound = inbound.clone();
                tokio::spawn(async move {
                    let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                    inbound.handle_message(&topic, &publish.payload).await;
                    drop(permit);
                });
            }
            Ok(_) => {}
            Err(e) => {
                inbound.broker.connected.store(false, Ordering::Relaxed);
                tracing::warn!(error = %e, retry_in = ?backoff, "MQTT connection error");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    inbound.broker.connected.store(false, Ordering::Relaxed);
}

impl NodeLink for Broker {
    fn seal_assignment(&self, assignment: &Assignment) -> SealedMessage {
        Broker::seal_assignment(self, assignment)
    }

    fn send(&self, message: SealedMessage) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(Broker::send(self, message))
    }

    fn send_stop<'a>(&'a self, stop: &'a Stop) -> BoxFuture<'a, ()> {
        Box::pin(Broker::send_stop(self, stop))
    }
}
