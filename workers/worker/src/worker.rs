//! The running worker: MQTT session, assignments, shard execution, heartbeats and shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use anyhow::{ensure, Context as _};
use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode, Packet};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::Outgoing;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::{interval, interval_at, sleep, timeout, Instant, MissedTickBehavior};
use tracing::Instrument as _;
use uuid::Uuid;
use xpand_protocol::{
    now_ms, parse_node_id, Announce, Assignment, Heartbeat, ModelInfo, NodeKey, Progress,
    ProgressChain, Reject, ShardOutput, ShardResult, Topics, UpKind,
};

use crate::assignments::{Admitted, AssignmentGate};
use crate::catalog::{self, LoadedModel};
use crate::config::{cpu_cores, total_memory_mb, WorkerConfig};
use crate::plugins::{self, task_kind, InputUnusable};

/// Largest MQTT packet we accept from the broker. Shard inputs travel inline, so this is roomier
/// than rumqttc's 10 KiB default; large inputs belong in files, not in MQTT.
const MAX_PACKET_BYTES: u32 = 16 * 1024 * 1024;
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Outgoing requests queued for the connection; publishers wait when it is full.
const REQUEST_QUEUE: usize = 256;
const MIN_RECONNECT_DELAY: Duration = Duration::from_millis(250);
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(10);
/// How often a running shard reports progress (which also renews its lease).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);
/// How long shutdown waits for running shards to finish and publish their results.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The capability statement is published again this often, so a gateway that lost or never
/// stored it (a node registered after its first announce) learns it without a restart.
const REANNOUNCE_INTERVAL: Duration = Duration::from_secs(60);
/// Announces asked for by the gateway are answered at most this often.
const MIN_ANNOUNCE_GAP: Duration = Duration::from_secs(1);
/// Reconnect delay after the broker handed our session to another client with our node id:
/// another process runs this identity, and reconnecting at once would take turns with it.
const TAKEN_OVER_DELAY: Duration = Duration::from_secs(5);
const MAX_TAKEN_OVER_DELAY: Duration = Duration::from_secs(60);

struct Worker {
    key: NodeKey,
    topics: Topics,
    client: AsyncClient,
    /// The capability statement; its `held_models` follow the model cache.
    announce: std::sync::Mutex<Announce>,
    /// Where the registry models this node holds are kept.
    model_cache_dir: std::path::PathBuf,
    models: HashMap<String, Arc<LoadedModel>>,
    max_shards: usize,
    /// Shards running now.
    running: watch::Sender<usize>,
    /// Stop flags of the running shards, by assignment; set when the gateway says stop.
    stops: std::sync::Mutex<HashMap<Uuid, Arc<AtomicBool>>>,
    /// Cleared at shutdown: new assignments are rejected from then on.
    accepting: AtomicBool,
    connected: AtomicBool,
    /// Set once we asked the broker to close the session, so a lost connection ends the loop.
    disconnecting: AtomicBool,
    /// When the capability statement was last published.
    announced_at: std::sync::Mutex<Option<Instant>>,
}

/// Runs a worker until `shutdown` completes, then stops taking assignments, lets running shards
/// finish (up to 10 s) and publish their results, and disconnects.
///
/// Fails before connecting when the configuration is invalid, ONNX Runtime cannot be loaded or
/// no model passes its checks. A lost broker connection is retried, never fatal.
pub async fn run(config: WorkerConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    parse_node_id(&config.gateway_key)
        .context("the gateway key must be the gateway's 64-hex-digit ed25519 public key")?;
    ensure!(
        config.max_concurrent_shards >= 1,
        "max_concurrent_shards must be at least 1"
    );
    ensure!(
        !config.heartbeat_interval.is_zero(),
        "the heartbeat interval must be positive"
    );

    let setup = config.clone();
    let (models, accelerator) = tokio::task::spawn_blocking(move || catalog::load_all(&setup))
        .await
        .context("loading models")??;
    let mut model_infos: Vec<ModelInfo> = models.values().map(|m| m.info.clone()).collect();
    model_infos.sort_by(|a, b| a.name.cmp(&b.name));
    let model_names: Vec<String> = model_infos.iter().map(|m| m.name.clone()).collect();
    let announce = Announce {
        name: config.name.clone(),
        models: model_infos,
        accelerator,
        memory_mb: total_memory_mb(),
        cpu_cores: u32::try_from(cpu_cores()).unwrap_or(u32::MAX),
        max_concurrent_shards: u32::try_from(config.max_concurrent_shards)
            .context("max_concurrent_shards is too large")?,
        worker_version: env!("CARGO_PKG_VERSION").to_string(),
        started_at_ms: now_ms(),
        held_models: plugins::predict::held(&config.model_cache_dir),
    };

    let (client, eventloop) = AsyncClient::new(mqtt_options(&config), REQUEST_QUEUE);
    let worker = Arc::new(Worker {
        key: config.node_key.clone(),
        topics: Topics::new(&config.topic_prefix),
        client,
        announce: std::sync::Mutex::new(announce),
        model_cache_dir: config.model_cache_dir.clone(),
        models,
        max_shards: config.max_concurrent_shards,
        running: watch::Sender::new(0),
        stops: Default::default(),
        accepting: AtomicBool::new(true),
        connected: AtomicBool::new(false),
        disconnecting: AtomicBool::new(false),
        announced_at: std::sync::Mutex::new(None),
    });
    tracing::info!(
        node_id = worker.key.id(),
        name = %config.name,
        models = ?model_names,
        accelerator = ?accelerator,
        broker = %config.broker.address(),
        topic_prefix = %config.topic_prefix,
        max_concurrent_shards = worker.max_shards,
        "worker starting"
    );

    let gate = AssignmentGate::new(worker.key.id(), &config.gateway_key);
    let mut connection = tokio::spawn(drive_connection(eventloop, worker.clone(), gate));
    let heartbeats = tokio::spawn(send_heartbeats(worker.clone(), config.heartbeat_interval));

    shutdown.await;
    worker.drain().await;
    heartbeats.abort();
    worker.disconnecting.store(true, Ordering::SeqCst);
    // Queued after the results, so the broker has them before it sees us leave. Bounded: with
    // the broker gone, the request queue may be full.
    let closed = timeout(DISCONNECT_TIMEOUT, async {
        if let Err(e) = worker.client.disconnect().await {
            tracing::warn!(error = %e, "could not request a clean disconnect");
        }
        let _ = (&mut connection).await;
    });
    if closed.await.is_err() {
        tracing::warn!("the broker connection did not close in time; dropping it");
        connection.abort();
    }
    tracing::info!("worker stopped");
    Ok(())
}

fn mqtt_options(config: &WorkerConfig) -> MqttOptions {
    // One connection per node identity: a restarted worker takes over its predecessor's session.
    let client_id = format!("xpand-worker-{}", &config.node_key.id()[..16]);
    let mut options = config.broker.mqtt_options(client_id);
    options
        .set_keep_alive(KEEP_ALIVE)
        .set_max_packet_size(Some(MAX_PACKET_BYTES));
    options
}

/// Polls the MQTT event loop (which reconnects on its own while polled) and dispatches what
/// arrives. Never blocks on publishing: anything that publishes runs in its own task.
async fn drive_connection(mut eventloop: EventLoop, worker: Arc<Worker>, mut gate: AssignmentGate) {
    let assign_topic = worker.topics.assign(worker.key.id());
    let stop_topic = worker.topics.stop(worker.key.id());
    let announce_topic = worker.topics.announce_request(worker.key.id());
    let mut reconnect_delay = MIN_RECONNECT_DELAY;
    let mut taken_over = false;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // After a takeover the delay keeps growing across reconnects: the two
                // processes would otherwise keep taking the session from each other.
                if !taken_over {
                    reconnect_delay = MIN_RECONNECT_DELAY;
                }
                worker.connected.store(true, Ordering::SeqCst);
                tracing::info!("connected to the broker");
                tokio::spawn(worker.clone().on_connected());
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let topic = publish.topic.as_ref();
                if topic == assign_topic.as_bytes() {
                    worker.on_assignment(&mut gate, &assign_topic, &publish.payload);
                } else if topic == stop_topic.as_bytes() {
                    worker.on_stop(&mut gate, &stop_topic, &publish.payload);
                } else if topic == announce_topic.as_bytes() {
                    match gate.admit_announce_request(&announce_topic, &publish.payload, now_ms()) {
                        Ok(_) => {
                            tokio::spawn(worker.clone().reannounce());
                        }
                        Err(dropped) => {
                            tracing::warn!(reason = %dropped, "announce request dropped")
                        }
                    }
                }
            }
            Ok(Event::Incoming(Packet::Disconnect(disconnect))) => {
                if disconnect.reason_code == DisconnectReasonCode::SessionTakenOver {
                    if !taken_over {
                        tracing::error!(
                            node_id = worker.key.id(),
                            "another process connected with this node's identity and took \
                             over its session; one identity must run in one process. Backing \
                             off until it stops"
                        );
                    }
                    taken_over = true;
                    reconnect_delay = reconnect_delay.max(TAKEN_OVER_DELAY);
                } else {
                    tracing::warn!(reason = ?disconnect.reason_code, "the broker closed the session");
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(e) => {
                worker.connected.store(false, Ordering::SeqCst);
                if worker.disconnecting.load(Ordering::SeqCst) {
                    break;
                }
                tracing::warn!(
                    error = %e,
                    retry_in_ms = reconnect_delay.as_millis() as u64,
                    "broker connection lost"
                );
                sleep(reconnect_delay).await;
                let max = if taken_over {
                    MAX_TAKEN_OVER_DELAY
                } else {
                    MAX_RECONNECT_DELAY
                };
                reconnect_delay = (reconnect_delay * 2).min(max);
            }
        }
    }
    tracing::info!(dropped_assignments = ?gate.dropped(), "broker connection closed");
}

async fn send_heartbeats(worker: Arc<Worker>, every: Duration) {
    let mut ticker = interval(every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // Heartbeats queued while offline would arrive late and say nothing; skip them.
        if worker.connected.load(Ordering::SeqCst) {
            let due = worker
                .announced_at
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some_and(|at| at.elapsed() >= REANNOUNCE_INTERVAL);
            // A model fetched or evicted changes what placement should know.
            if worker.update_held() || due {
                worker.publish_announce().await;
            }
            let active_shards = u32::try_from(*worker.running.borrow()).unwrap_or(u32::MAX);
            worker
                .publish(UpKind::Heartbeat, &Heartbeat { active_shards })
                .await;
        }
    }
}

/// Progress as the plugin reported it: chunks done and the chain over them.
#[derive(Debug, Clone)]
struct Reported {
    done: u32,
    chain: String,
}

/// Counts a shard as running for as long as it lives.
struct RunningShard(Arc<Worker>);

impl RunningShard {
    fn start(worker: &Arc<Worker>) -> Self {
        worker.running.send_modify(|n| *n += 1);
        Self(worker.clone())
    }
}

impl Drop for RunningShard {
    fn drop(&mut self) {
        self.0.running.send_modify(|n| *n -= 1);
    }
}

impl Worker {
    /// Subscribes to our assignments and (re)announces; runs after every ConnAck, since a new
    /// session starts without subscriptions.
    async fn on_connected(self: Arc<Self>) {
        for topic in [
            self.topics.assign(self.key.id()),
            self.topics.stop(self.key.id()),
            self.topics.announce_request(self.key.id()),
        ] {
            if let Err(e) = self.client.subscribe(topic.clone(), QoS::AtLeastOnce).await {
                tracing::warn!(error = %e, topic, "could not subscribe");
                return;
            }
        }
        self.publish_announce().await;
    }

    /// Brings the statement's `held_models` up to date with the model cache; true when that
    /// changed it.
    fn update_held(&self) -> bool {
        let held = plugins::predict::held(&self.model_cache_dir);
        let mut announce = self.announce.lock().unwrap_or_else(PoisonError::into_inner);
        let changed = announce.held_models != held;
        announce.held_models = held;
        changed
    }

    /// Publishes the capability statement (retained, so gateways that start later read it).
    async fn publish_announce(&self) {
        *self
            .announced_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        let announce = self
            .announce
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        self.publish(UpKind::Announce, &announce).await;
    }

    /// Announces again at the gateway's request, unless we just did.
    async fn reannounce(self: Arc<Self>) {
        let recent = self
            .announced_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|at| at.elapsed() < MIN_ANNOUNCE_GAP);
        if !recent {
            tracing::info!("the gateway asked for our capability statement; announcing again");
            self.publish_announce().await;
        }
    }

    fn on_assignment(self: &Arc<Self>, gate: &mut AssignmentGate, topic: &str, payload: &[u8]) {
        match gate.admit(topic, payload, now_ms()) {
            Err(dropped) => {
                tracing::warn!(
                    reason = %dropped,
                    dropped_so_far = ?gate.dropped(),
                    "assignment dropped"
                );
            }
            Ok(Admitted::Unsupported {
                assignment_id,
                shard_id,
                reason,
            }) => self.spawn_reject(assignment_id, shard_id, reason),
            Ok(Admitted::Run(assignment)) => self.start(*assignment),
        }
    }

    /// Sets the stop flag of a running shard the gateway no longer wants.
    fn on_stop(&self, gate: &mut AssignmentGate, topic: &str, payload: &[u8]) {
        match gate.admit_stop(topic, payload, now_ms()) {
            Err(dropped) => tracing::warn!(reason = %dropped, "stop dropped"),
            Ok(stop) => {
                let flag = self
                    .stops
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&stop.assignment_id)
                    .cloned();
                if let Some(flag) = flag {
                    tracing::info!(assignment_id = %stop.assignment_id, reason = %stop.reason, "stopping a shard");
                    flag.store(true, Ordering::SeqCst);
                }
            }
        }
    }

    /// Starts the shard, or rejects it when we are stopping, lack its model or are full.
    fn start(self: &Arc<Self>, assignment: Assignment) {
        let placed = if !self.accepting.load(Ordering::SeqCst) {
            Err("the worker is shutting down".to_string())
        } else {
            self.model_for(&assignment).and_then(|model| {
                if *self.running.borrow() < self.max_shards {
                    Ok(model)
                } else {
                    Err(format!(
                        "at capacity (at most {} shards at once)",
                        self.max_shards
                    ))
                }
            })
        };
        match placed {
            Ok(model) => {
                // Counted before spawning, so the next assignment sees this one.
                let running = RunningShard::start(self);
                let span = tracing::info_span!(
                    "shard",
                    assignment_id = %assignment.assignment_id,
                    shard_id = %assignment.shard_id,
                    job_id = %assignment.job_id,
                    model = %assignment.model,
                );
                tokio::spawn(
                    self.clone()
                        .run_shard(assignment, model, running)
                        .instrument(span),
                );
            }
            Err(reason) => {
                self.spawn_reject(assignment.assignment_id, assignment.shard_id, reason);
            }
        }
    }

    fn model_for(&self, assignment: &Assignment) -> Result<Arc<LoadedModel>, String> {
        let model = self
            .models
            .get(&assignment.model)
            .ok_or_else(|| format!("unknown model `{}`", assignment.model))?;
        let kind = task_kind(&assignment.task);
        if model.plugin.kind() != kind {
            return Err(format!(
                "model `{}` serves `{}` shards, not `{kind}`",
                assignment.model,
                model.plugin.kind()
            ));
        }
        Ok(model.clone())
    }

    /// Runs the plugin on a blocking thread, reporting progress every [`PROGRESS_INTERVAL`]
    /// meanwhile, then publishes the final progress and the result (or a rejection).
    async fn run_shard(
        self: Arc<Self>,
        assignment: Assignment,
        model: Arc<LoadedModel>,
        _running: RunningShard,
    ) {
        let started = Instant::now();
        let Assignment {
            assignment_id,
            shard_id,
            task,
            ..
        } = assignment;
        let total = task.chunks();
        tracing::debug!(chunks = total, "shard started");

        let (progress_tx, progress_rx) = watch::channel(Reported {
            done: 0,
            chain: ProgressChain::new(assignment_id).hex(),
        });
        let stopped = Arc::new(AtomicBool::new(false));
        self.stops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(assignment_id, stopped.clone());
        let stop_flag = stopped.clone();
        let mut inference = tokio::task::spawn_blocking(move || {
            let mut chain = ProgressChain::new(assignment_id);
            let mut done = 0;
            model.plugin.run(&task, &mut |finished: &ShardOutput| {
                for chunk in finished.chunk_bytes() {
                    chain.push(&chunk);
                    done += 1;
                }
                progress_tx.send_replace(Reported {
                    done,
                    chain: chain.hex(),
                });
                !stop_flag.load(Ordering::SeqCst)
            })
        });

        let mut ticker = interval_at(started + PROGRESS_INTERVAL, PROGRESS_INTERVAL);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let outcome = loop {
            tokio::select! {
                joined = &mut inference => break joined,
                _ = ticker.tick() => {
                    let reported = progress_rx.borrow().clone();
                    self.publish_progress(assignment_id, shard_id, total, reported).await;
                }
            }
        };
        let reported = progress_rx.borrow().clone();
        self.stops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&assignment_id);
        if stopped.load(Ordering::SeqCst) {
            // The gateway has what it needs from another node; it wants no answer from us.
            tracing::info!("shard stopped at the gateway's request");
            return;
        }
        match outcome {
            Ok(Ok(output)) => {
                self.publish_result(assignment_id, shard_id, total, reported, output, started)
                    .await;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = format!("{e:#}"), "inference failed");
                let input_unusable = e.downcast_ref::<InputUnusable>().is_some();
                self.reject(assignment_id, shard_id, format!("{e:#}"), input_unusable)
                    .await;
            }
            Err(e) => {
                tracing::error!(error = %e, "inference panicked");
                self.reject(
                    assignment_id,
                    shard_id,
                    "inference failed unexpectedly".into(),
                    false,
                )
                .await;
            }
        }
    }

    async fn publish_result(
        &self,
        assignment_id: Uuid,
        shard_id: Uuid,
        total: u32,
        reported: Reported,
        output: ShardOutput,
        started: Instant,
    ) {
        let chain = output.chain(assignment_id);
        // The gateway checks the result against the progress chain; a plugin whose progress
        // disagrees with its output is a bug, and the result would be judged a lie.
        if reported.done != total || reported.chain != chain {
            tracing::error!(
                done = reported.done,
                total,
                "plugin progress disagrees with its output"
            );
            self.reject(
                assignment_id,
                shard_id,
                "internal error: progress does not match the output".into(),
                false,
            )
            .await;
            return;
        }
        // No closing progress message: the result carries the whole chain, and a shard shorter
        // than the progress interval sends the gateway nothing but its result.
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        // A model fetched for this shard is announced before the result frees the slot, so the
        // next shard of the model finds this node warm rather than fetching it on another.
        if matches!(output, ShardOutput::Predict { .. }) && self.update_held() {
            self.publish_announce().await;
        }
        let result = ShardResult {
            assignment_id,
            shard_id,
            output_sha256: output.digest(),
            chain,
            output,
            elapsed_ms,
        };
        self.publish(UpKind::Result, &result).await;
        tracing::debug!(elapsed_ms, "shard done");
    }

    async fn publish_progress(
        &self,
        assignment_id: Uuid,
        shard_id: Uuid,
        total: u32,
        reported: Reported,
    ) {
        let progress = Progress {
            assignment_id,
            shard_id,
            done: reported.done,
            total,
            chain: reported.chain,
        };
        self.publish(UpKind::Progress, &progress).await;
    }

    fn spawn_reject(self: &Arc<Self>, assignment_id: Uuid, shard_id: Uuid, reason: String) {
        let worker = self.clone();
        tokio::spawn(async move { worker.reject(assignment_id, shard_id, reason, false).await });
    }

    async fn reject(
        &self,
        assignment_id: Uuid,
        shard_id: Uuid,
        reason: String,
        input_unusable: bool,
    ) {
        tracing::info!(%assignment_id, %shard_id, %reason, input_unusable, "rejecting assignment");
        let reject = Reject {
            assignment_id,
            shard_id,
            reason,
            input_unusable,
        };
        self.publish(UpKind::Reject, &reject).await;
    }

    /// Signs `body` for its topic and queues it (QoS 1; the announce is retained).
    async fn publish<T: Serialize>(&self, kind: UpKind, body: &T) {
        let topic = self.topics.up(self.key.id(), kind);
        let payload = self.key.seal(&topic, body);
        let retain = kind == UpKind::Announce;
        if let Err(e) = self
            .client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
        {
            tracing::warn!(error = %e, kind = kind.as_str(), "could not queue a message");
        }
    }

    /// Stops taking assignments and waits (bounded) for running shards to publish their results.
    async fn drain(&self) {
        self.accepting.store(false, Ordering::SeqCst);
        let running = *self.running.borrow();
        if running > 0 {
            tracing::info!(running, "shutting down: finishing running shards");
        } else {
            tracing::info!("shutting down");
        }
        let mut running = self.running.subscribe();
        if timeout(DRAIN_TIMEOUT, running.wait_for(|n| *n == 0))
            .await
            .is_err()
        {
            tracing::warn!(
                still_running = *self.running.borrow(),
                "shards did not finish in time; stopping without their results"
            );
        }
    }
}
