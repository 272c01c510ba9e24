//! A worker against the real broker (Mosquitto on 127.0.0.1:1883, or XPAND_MQTT_URL), the real
//! ONNX Runtime and the real forecast model, with this test playing the gateway.

use std::path::PathBuf;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use rumqttc::Outgoing;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use uuid::Uuid;
use xpand_protocol::{
    now_ms, Announce, AnonymizeTask, Assignment, Envelope, Heartbeat, MaskStyle, NodeKey, Progress,
    Reject, ShardOutput, ShardResult, ShardTask, Topics, UpKind,
};
use xpand_worker::{default_ort_dylib_path, AcceleratorChoice, BrokerLink, WorkerConfig};

const WAIT: Duration = Duration::from_secs(30);

fn broker_url() -> String {
    std::env::var("XPAND_MQTT_URL").unwrap_or_else(|_| "mqtt://127.0.0.1:1883".into())
}

fn broker() -> BrokerLink {
    BrokerLink::new(broker_url().parse().unwrap(), None, &[]).unwrap()
}

fn models_dir() -> PathBuf {
    std::env::var_os("XPAND_MODELS_DIR")
        .map(Into::into)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models"))
}

/// The gateway's side: its key, and every verified worker → gateway message on the prefix.
struct Gateway {
    key: NodeKey,
    topics: Topics,
    client: AsyncClient,
    connection: tokio::task::JoinHandle<()>,
    inbox: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    /// Verified messages read while waiting for others: (kind, signer, body).
    unread: Vec<(UpKind, String, Vec<u8>)>,
}

impl Gateway {
    async fn connect(prefix: &str) -> Self {
        let mut options =
            broker().mqtt_options(format!("test-gateway-{}", Uuid::new_v4().simple()));
        options.set_max_packet_size(Some(16 * 1024 * 1024));
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let topics = Topics::new(prefix);
        let (tx, inbox) = mpsc::unbounded_channel();
        let (subscribed_tx, subscribed) = oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        let connection = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let topic = String::from_utf8(p.topic.to_vec()).unwrap();
                        if tx.send((topic, p.payload.to_vec())).is_err() {
                            break;
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("test gateway lost the broker at {}: {e}", broker_url());
                        break;
                    }
                }
            }
        });
        client
            .subscribe(format!("{prefix}/v1/up/#"), QoS::AtLeastOnce)
            .await
            .unwrap();
        timeout(WAIT, subscribed).await.unwrap().unwrap();
        Self {
            key: NodeKey::generate(),
            topics,
            client,
            connection,
            inbox,
            unread: Vec::new(),
        }
    }

    /// Waits for the next message of `kind` from `node` that `wanted` accepts. Every message is
    /// checked: signed by the node named in its topic, for that topic, fresh.
    async fn expect<T: DeserializeOwned>(
        &mut self,
        node: &str,
        kind: UpKind,
        wanted: impl Fn(&T) -> bool,
    ) -> T {
        let matches = |(k, signer, body): &(UpKind, String, Vec<u8>)| -> Option<T> {
            let parsed: T = serde_json::from_slice(body).ok()?;
            (*k == kind && signer == node && wanted(&parsed)).then_some(parsed)
        };
        if let Some(i) = self.unread.iter().position(|m| matches(m).is_some()) {
            return matches(&self.unread.remove(i)).unwrap();
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (topic, payload) = tokio::time::timeout_at(deadline, self.inbox.recv())
                .await
                .unwrap_or_else(|_| panic!("no {} arrived in time", kind.as_str()))
                .expect("broker connection closed");
            if payload.is_empty() {
                continue; // a retained message being cleared
            }
            let (topic_node, topic_kind) = self.topics.parse_up(&topic).expect("an up topic");
            let opened = Envelope::open(&payload, &topic, now_ms(), 60_000)
                .unwrap_or_else(|e| panic!("message on {topic} does not verify: {e}"));
            assert_eq!(
                opened.signer, topic_node,
                "signed by a node other than its topic's"
            );
            let message = (topic_kind, opened.signer, opened.body);
            match matches(&message) {
                Some(parsed) => return parsed,
                None => self.unread.push(message),
            }
        }
    }

    async fn assign(&self, signer: &NodeKey, assignment: &Assignment) {
        let topic = self.topics.assign(&assignment.node);
        let payload = signer.seal(&topic, assignment);
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
}

fn forecast_assignment(node: &str, model: &str, series: Vec<Vec<f64>>, horizon: u32) -> Assignment {
    Assignment {
        assignment_id: Uuid::new_v4(),
        job_id: Uuid::new_v4(),
        shard_id: Uuid::new_v4(),
        node: node.to_string(),
        model: model.to_string(),
        lease_expires_at_ms: now_ms() + 30_000,
        task: ShardTask::Forecast {
            series,
            horizon,
            levels: Vec::new(),
            season_length: None,
        },
    }
}

#[tokio::test]
async fn worker_runs_signed_assignments_and_rejects_what_it_cannot_run() {
    let ort = default_ort_dylib_path();
    assert!(
        ort.is_file(),
        "ONNX Runtime not found at {}: run scripts/setup-onnxruntime.sh",
        ort.display()
    );
    let models = models_dir();
    assert!(
        models.join("forecast/manifest.json").is_file(),
        "no forecast model in {}: it comes from the training pipeline (workers/models/forecast), \
         and ONNX Runtime from scripts/setup-onnxruntime.sh",
        models.display()
    );

    let prefix = format!("xpand-test-{}", Uuid::new_v4().simple());
    let mut gateway = Gateway::connect(&prefix).await;
    let node = NodeKey::generate();
    let node_id = node.id().to_string();

    let mut config = WorkerConfig::new(broker(), node, gateway.key.id());
    config.topic_prefix = prefix.clone();
    config.models_dir = models;
    config.ort_dylib_path = ort;
    config.name = "round-trip".into();
    config.max_concurrent_shards = 2;
    config.heartbeat_interval = Duration::from_millis(200);
    config.accelerator = AcceleratorChoice::Cpu;
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(xpand_worker::run(config, async {
        let _ = stopped.await;
    }));

    let announce: Announce = gateway.expect(&node_id, UpKind::Announce, |_| true).await;
    assert_eq!(announce.name, "round-trip");
    assert_eq!(announce.max_concurrent_shards, 2);
    let model = announce
        .models
        .iter()
        .find(|m| m.kind == "forecast")
        .expect("the forecast model is announced");
    let face_model = announce
        .models
        .iter()
        .find(|m| m.kind == "face_detect")
        .expect("the CenterFace model is announced (run scripts/setup-models.sh)");
    let _: Heartbeat = gateway.expect(&node_id, UpKind::Heartbeat, |_| true).await;

    // A shard of three seasonal rows of different lengths.
    let season = |t: usize| 50.0 + 10.0 * (t as f64 * std::f64::consts::PI / 6.0).sin();
    let series: Vec<Vec<f64>> = [96, 30, 5]
        .iter()
        .map(|&n| (0..n).map(season).collect())
        .collect();
    let shard = forecast_assignment(&node_id, &model.name, series, 6);
    gateway.assign(&gateway.key, &shard).await;

    let id = shard.assignment_id;
    let result: ShardResult = gateway
        .expect(&node_id, UpKind::Result, |r: &ShardResult| {
            r.assignment_id == id
        })
        .await;
    assert_eq!(result.shard_id, shard.shard_id);
    assert_eq!(result.output_sha256, result.output.digest());
    assert_eq!(result.chain, result.output.chain(id));
    // A shard shorter than the progress interval sends its result and nothing else.
    let progress_seen = gateway.unread.iter().any(|(kind, _, body)| {
        *kind == UpKind::Progress
            && serde_json::from_slice::<Progress>(body).is_ok_and(|p| p.assignment_id == id)
    });
    assert!(!progress_seen, "a short shard sent progress");
    let ShardOutput::Forecast { forecasts, .. } = &result.output else {
        panic!("not a forecast output: {:?}", result.output);
    };
    assert_eq!(forecasts.len(), 3);
    assert!(forecasts
        .iter()
        .all(|row| row.len() == 6 && row.iter().all(|v| v.is_finite())));

    // Signed by someone other than the gateway: dropped without an answer. It goes first, so if
    // it were answered, that answer would arrive before the next rejection.
    let forged = forecast_assignment(&node_id, "no-such-model", vec![vec![1.0; 8]], 3);
    gateway.assign(&NodeKey::generate(), &forged).await;
    let unknown = forecast_assignment(&node_id, "no-such-model", vec![vec![1.0; 8]], 3);
    gateway.assign(&gateway.key, &unknown).await;
    let reject: Reject = gateway.expect(&node_id, UpKind::Reject, |_| true).await;
    assert_eq!(reject.assignment_id, unknown.assignment_id);
    assert!(reject.reason.contains("unknown model"), "{}", reject.reason);

    // Anonymize shards go to the face detector, and only to it.
    let segment = AnonymizeTask {
        input_url: "http://127.0.0.1:1/segment.mkv".into(),
        output_url: "http://127.0.0.1:1/out.mp4".into(),
        frames: 25,
        width: 640,
        height: 360,
        fps_num: 25,
        fps_den: 1,
        style: MaskStyle::Blur,
        threshold: 0.2,
        detect_width: None,
        crf: 23,
    };
    let mut misplaced = forecast_assignment(&node_id, &model.name, vec![], 1);
    misplaced.task = ShardTask::Anonymize(segment.clone());
    gateway.assign(&gateway.key, &misplaced).await;
    let reject: Reject = gateway
        .expect(&node_id, UpKind::Reject, |r: &Reject| {
            r.assignment_id == misplaced.assignment_id
        })
        .await;
    assert!(
        reject
            .reason
            .contains("serves `forecast` shards, not `anonymize`"),
        "{}",
        reject.reason
    );
    // Nothing listens on port 1: the shard runs, fails to fetch its segment, and says so.
    let mut unreachable = forecast_assignment(&node_id, &face_model.name, vec![], 1);
    unreachable.task = ShardTask::Anonymize(segment);
    gateway.assign(&gateway.key, &unreachable).await;
    let reject: Reject = gateway
        .expect(&node_id, UpKind::Reject, |r: &Reject| {
            r.assignment_id == unreachable.assignment_id
        })
        .await;
    assert!(
        reject.reason.contains("fetching the segment"),
        "{}",
        reject.reason
    );

    // Bad input is a rejection with the reason, not a crash.
    let short = forecast_assignment(&node_id, &model.name, vec![vec![1.0, 2.0]], 3);
    gateway.assign(&gateway.key, &short).await;
    let reject: Reject = gateway
        .expect(&node_id, UpKind::Reject, |r: &Reject| {
            r.assignment_id == short.assignment_id
        })
        .await;
    assert!(reject.reason.contains("observations"), "{}", reject.reason);

    stop.send(()).unwrap();
    timeout(WAIT, worker)
        .await
        .expect("the worker stops")
        .unwrap()
        .unwrap();

    // Leave nothing behind on the broker: clear the worker's retained announce.
    let announce_topic = gateway.topics.up(&node_id, UpKind::Announce);
    gateway
        .client
        .publish(announce_topic, QoS::AtLeastOnce, true, Vec::new())
        .await
        .unwrap();
    gateway.client.disconnect().await.unwrap();
    timeout(WAIT, gateway.connection).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_worker_without_a_usable_model_refuses_to_start() {
    let models = std::env::temp_dir().join(format!("xpand-no-models-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&models).unwrap();
    let mut config = WorkerConfig::new(broker(), NodeKey::generate(), NodeKey::generate().id());
    config.models_dir = models.clone();
    let err = xpand_worker::run(config, std::future::pending())
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("no usable model"), "{err:#}");
    std::fs::remove_dir(models).unwrap();
}
