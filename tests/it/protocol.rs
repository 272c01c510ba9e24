//! The worker side of the wire, played by the test: forged, replayed and stale messages are
//! dropped and counted, and a worker that vanishes mid-shard loses the shard to another.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use xpand::nodes::Presence as _;

use base64::Engine as _;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::Value;
use tokio::sync::mpsc;
use xpand_protocol::NodeKey;
use xpand_protocol::{
    now_ms, Accelerator, Announce, Assignment, Envelope, Heartbeat, ModelInfo, Progress,
    ShardOutput, ShardResult, ShardTask, Topics, UpKind,
};

use crate::common::{forecast_job, result_for, TestApp, MQTT_HOST, MQTT_PORT};

/// A node driven by hand: it announces and heartbeats, and hands the test its assignments.
struct FakeNode {
    key: NodeKey,
    client: AsyncClient,
    topics: Topics,
    assignments: mpsc::UnboundedReceiver<Assignment>,
    stops: mpsc::UnboundedReceiver<xpand_protocol::Stop>,
    heartbeat: tokio::task::JoinHandle<()>,
    /// The first gateway message the listener found wrong (it is not delivered): the test fails
    /// with it at the node's next send or read, or when the node goes away.
    violation: Arc<Mutex<Option<String>>>,
}

impl FakeNode {
    async fn start(app: &TestApp, key: NodeKey) -> Self {
        Self::start_with_slots(app, key, 4).await
    }

    /// A forecast node with room for `slots` shards at once.
    async fn start_with_slots(app: &TestApp, key: NodeKey, slots: u32) -> Self {
        let forecast = ModelInfo {
            name: xpand::kinds::forecast::MODEL.into(),
            version: "1.0.0".into(),
            kind: "forecast".into(),
            sha256: "0".repeat(64),
        };
        Self::start_with(app, key, forecast, slots).await
    }

    /// A fresh node, registered, with room for `slots` shards, once the gateway sees it alive.
    async fn join(app: &TestApp, name: &str, slots: u32) -> Self {
        let key = NodeKey::generate();
        xpand::nodes::register(&app.db, key.id(), name)
            .await
            .unwrap();
        let node = Self::start_with_slots(app, key, slots).await;
        app.wait_until_alive(node.key.id()).await;
        node
    }

    /// A node announcing `model`.
    async fn start_with(app: &TestApp, key: NodeKey, model: ModelInfo, slots: u32) -> Self {
        let topics = Topics::new(&app.config.topic_prefix);
        let mut options =
            MqttOptions::new(format!("fake-{}", &key.id()[..12]), MQTT_HOST, MQTT_PORT);
        options.set_max_packet_size(Some(1 << 20));
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let (tx, assignments) = mpsc::unbounded_channel();
        let (stop_tx, stops) = mpsc::unbounded_channel();
        let gateway = app.config.gateway_key.id().to_string();
        let assign_topic = topics.assign(key.id());
        let stop_topic = topics.stop(key.id());
        let sub_client = client.clone();
        let violation = Arc::new(Mutex::new(None));
        let found = violation.clone();
        // A panic here would only end this task: what is wrong is handed to the test instead.
        tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                match event {
                    Event::Incoming(Packet::ConnAck(_)) => {
                        for topic in [&assign_topic, &stop_topic] {
                            let _ = sub_client.subscribe(topic.clone(), QoS::AtLeastOnce).await;
                        }
                    }
                    Event::Incoming(Packet::Publish(p)) => {
                        let topic = String::from_utf8_lossy(&p.topic).into_owned();
                        let delivered = Envelope::open(&p.payload, &topic, now_ms(), 60_000)
                            .map_err(|e| format!("a message on {topic} does not open: {e}"))
                            .and_then(|opened| {
                                if opened.signer != gateway {
                                    return Err(format!(
                                        "a message on {topic} is signed by {}, not the gateway",
                                        opened.signer
                                    ));
                                }
                                let unreadable =
                                    |e| format!("an unreadable message on {topic}: {e}");
                                if topic == stop_topic {
                                    let stop = opened.parse().map_err(unreadable)?;
                                    let _ = stop_tx.send(stop);
                                } else {
                                    let assignment = opened.parse().map_err(unreadable)?;
                                    let _ = tx.send(assignment);
                                }
                                Ok(())
                            });
                        if let Err(wrong) = delivered {
                            found.lock().unwrap().get_or_insert(wrong);
                        }
                    }
                    _ => {}
                }
            }
        });
        let node = Self {
            heartbeat: tokio::spawn(heartbeat(client.clone(), key.clone(), topics.clone())),
            key,
            client,
            topics,
            assignments,
            stops,
            violation,
        };
        node.announce(model, slots).await;
        node
    }

    async fn announce(&self, model: ModelInfo, slots: u32) {
        let announce = Announce {
            name: "fake".into(),
            models: vec![model],
            accelerator: Accelerator::Cpu,
            memory_mb: 1024,
            cpu_cores: 1,
            max_concurrent_shards: slots,
            worker_version: "test".into(),
            started_at_ms: 0,
            held_models: Vec::new(),
        };
        self.send(UpKind::Announce, self.seal(UpKind::Announce, &announce))
            .await;
    }

    fn seal<T: serde::Serialize>(&self, kind: UpKind, body: &T) -> Vec<u8> {
        self.key.seal(&self.topics.up(self.key.id(), kind), body)
    }

    async fn send(&self, kind: UpKind, payload: Vec<u8>) {
        self.send_as(self.key.id(), kind, payload).await;
    }

    /// Publishes on the topic of node `as_node` (which may not be us).
    async fn send_as(&self, as_node: &str, kind: UpKind, payload: Vec<u8>) {
        self.check();
        self.client
            .publish(
                self.topics.up(as_node, kind),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
    }

    async fn next_assignment(&mut self) -> Assignment {
        let next = tokio::time::timeout(Duration::from_secs(30), self.assignments.recv()).await;
        self.check();
        next.expect("an assignment within 30 s")
            .expect("the node's listener ended")
    }

    /// The gateway's next `stop` for this node, within `secs`.
    async fn next_stop(&mut self, secs: u64) -> xpand_protocol::Stop {
        let next = tokio::time::timeout(Duration::from_secs(secs), self.stops.recv()).await;
        self.check();
        next.expect("a stop in time")
            .expect("the node's listener ended")
    }

    /// Fails the test if the gateway sent this node something it should not have.
    fn check(&self) {
        if let Some(wrong) = self.violation.lock().unwrap().as_ref() {
            panic!("node {}: {wrong}", self.key.id());
        }
    }

    /// Goes silent, as a crashed machine would.
    async fn die(self) {
        self.heartbeat.abort();
        let _ = self.client.disconnect().await;
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        // A test that reads nothing more from the node still fails on what it was sent.
        if !std::thread::panicking() {
            self.check();
        }
    }
}

async fn heartbeat(client: AsyncClient, key: NodeKey, topics: Topics) {
    let topic = topics.up(key.id(), UpKind::Heartbeat);
    loop {
        let beat = key.seal(&topic, &Heartbeat { active_shards: 0 });
        let _ = client
            .publish(topic.clone(), QoS::AtLeastOnce, false, beat)
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn answer(a: &Assignment) -> ShardResult {
    let ShardTask::Forecast {
        series, horizon, ..
    } = &a.task
    else {
        panic!("a forecast assignment was expected, got {:?}", a.task);
    };
    let output = ShardOutput::Forecast {
        forecasts: vec![vec![1.0; *horizon as usize]; series.len()],
        intervals: Vec::new(),
    };
    result_for(a, output)
}

async fn wait_rejected(app: &TestApp, reason: &str, at_least: u64) {
    for _ in 0..100 {
        if app.rejected(reason).await >= at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("expected {at_least} messages rejected as {reason}");
}

#[tokio::test]
async fn forged_replayed_and_stale_messages_are_dropped_and_change_nothing() {
    let app = TestApp::spawn().await;
    let key = NodeKey::generate();
    xpand::nodes::register(&app.db, key.id(), "fake")
        .await
        .unwrap();
    let mut node = FakeNode::start(&app, key).await;
    app.wait_until_alive(node.key.id()).await;

    let (_, customer) = app.customer(50_000_000).await;
    let job: Value = app
        .post_json(&customer, "/v1/jobs", &forecast_job(8, 3))
        .await
        .json()
        .await
        .unwrap();
    let job_id = job["id"].as_str().unwrap().to_string();
    let a = node.next_assignment().await;
    assert_eq!(a.node, node.key.id());
    let result = answer(&a);
    let result_topic = node.topics.up(node.key.id(), UpKind::Result);

    // Someone else's key on our topic: the signer is not the node the topic names.
    let impostor = NodeKey::generate();
    node.send(UpKind::Result, impostor.seal(&result_topic, &result))
        .await;
    wait_rejected(&app, "cross_node", 1).await;
    // An unregistered node on its own topic.
    node.send_as(
        impostor.id(),
        UpKind::Result,
        impostor.seal(&node.topics.up(impostor.id(), UpKind::Result), &result),
    )
    .await;
    wait_rejected(&app, "unknown_node", 1).await;
    // Our signature, someone's body.
    let mut env: Envelope = serde_json::from_slice(&node.seal(UpKind::Result, &result)).unwrap();
    let mut lie = answer(&a);
    let ShardOutput::Forecast { forecasts, .. } = &mut lie.output else {
        panic!("a forecast answer");
    };
    forecasts[0][0] = 1e6;
    env.body = base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&lie).unwrap());
    node.send(UpKind::Result, serde_json::to_vec(&env).unwrap())
        .await;
    wait_rejected(&app, "bad_signature", 1).await;
    // Signed two minutes ago.
    let body = serde_json::to_vec(&result).unwrap();
    node.send(
        UpKind::Result,
        node.key
            .seal_bytes(&result_topic, &body, now_ms() - 120_000),
    )
    .await;
    wait_rejected(&app, "stale", 1).await;
    // Not an envelope at all.
    node.send(UpKind::Result, body.clone()).await;
    wait_rejected(&app, "malformed", 1).await;
    // A good progress report, then the same bytes again.
    let progress = node.seal(
        UpKind::Progress,
        &Progress {
            assignment_id: a.assignment_id,
            shard_id: a.shard_id,
            done: 0,
            total: 8,
            chain: xpand_protocol::ProgressChain::new(a.assignment_id).hex(),
        },
    );
    node.send(UpKind::Progress, progress.clone()).await;
    node.send(UpKind::Progress, progress).await;
    wait_rejected(&app, "replayed", 1).await;

    let (status, done): (String, i32) =
        sqlx::query_as("SELECT status, shards_done FROM jobs WHERE id = $1::uuid")
            .bind(&job_id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), done),
        ("running", 0),
        "nothing forged got through"
    );

    // The honest result completes the job; replaying it changes nothing.
    let honest = node.seal(UpKind::Result, &result);
    node.send(UpKind::Result, honest.clone()).await;
    let finished = app.wait_for_job(&customer, &job_id).await;
    assert_eq!(finished["status"], "succeeded");
    assert_eq!(
        finished["output"]["forecasts"][7],
        serde_json::json!([1.0, 1.0, 1.0])
    );
    let before = app.balances(&customer).await;
    node.send(UpKind::Result, honest).await;
    wait_rejected(&app, "replayed", 2).await;
    assert_eq!(app.balances(&customer).await, before);
    app.assert_ledger_invariants().await;
    node.die().await;
    app.teardown().await;
}

#[tokio::test]
async fn a_shard_whose_worker_dies_is_redispatched_after_the_lease() {
    let mut app = TestApp::spawn_with(|c| c.scheduling.lease = Duration::from_secs(2)).await;
    let key = NodeKey::generate();
    xpand::nodes::register(&app.db, key.id(), "doomed")
        .await
        .unwrap();
    let mut doomed = FakeNode::start(&app, key).await;
    app.wait_until_alive(doomed.key.id()).await;
    let (_, customer) = app.customer(50_000_000).await;
    let job: Value = app
        .post_json(&customer, "/v1/jobs", &forecast_job(8, 4))
        .await
        .json()
        .await
        .unwrap();
    let first = doomed.next_assignment().await;
    let doomed_id = doomed.key.id().to_string();
    doomed.die().await;

    let survivor = app.start_worker().await;
    let done = app
        .wait_for_job(&customer, job["id"].as_str().unwrap())
        .await;
    assert_eq!(done["status"], "succeeded");
    let (node, attempts, assignment): (String, i32, uuid::Uuid) =
        sqlx::query_as("SELECT node_id, attempts, assignment_id FROM shards WHERE id = $1")
            .bind(first.shard_id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(node, survivor);
    assert_eq!(attempts, 2);
    assert_ne!(assignment, first.assignment_id);
    let node_view = app
        .get_json(&customer, &format!("/v1/nodes/{doomed_id}"))
        .await;
    assert_eq!(node_view["shards_failed"], 1);
    assert_eq!(node_view["earnings"], 0);
    app.assert_ledger_invariants().await;
    app.teardown().await;
}

/// Assignments (with their transfer URLs) are sealed into the public ledger, so a URL alone must
/// grant nothing: only the node it was issued to, signing its request, while the assignment is
/// current, before it expires.
#[tokio::test]
async fn transfer_urls_work_only_for_their_node_while_the_assignment_is_current() {
    let app = TestApp::spawn().await;
    let key = NodeKey::generate();
    xpand::nodes::register(&app.db, key.id(), "fake-video")
        .await
        .unwrap();
    let model = ModelInfo {
        name: xpand::kinds::anonymize::MODEL.into(),
        version: "test".into(),
        kind: "face_detect".into(),
        sha256: "0".repeat(64),
    };
    let mut node = FakeNode::start_with(&app, key.clone(), model, 4).await;
    app.wait_until_alive(key.id()).await;
    let (_, api_key) = app.customer(10_000_000).await;
    let dir = tempfile::tempdir().unwrap();
    let clip = xpand_media::clips::make_clip(dir.path(), 320, 240, 1, false);
    let file: Value = app
        .http
        .post(format!("{}/v1/files", app.base))
        .bearer_auth(&api_key)
        .body(std::fs::read(&clip).unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let job = serde_json::json!({"kind": "anonymize", "input": {"file": file["id"]}, "max_fee": 1_000_000});
    let resp = app.post_json(&api_key, "/v1/jobs", &job).await;
    assert_eq!(resp.status(), 201);

    let a = node.next_assignment().await;
    let ShardTask::Anonymize(task) = &a.task else {
        panic!("an anonymize assignment was expected, got {:?}", a.task);
    };
    assert_eq!(task.frames, 25);
    let path = |url: &str| {
        let (_, rest) = url.split_once("/v1/").unwrap();
        format!("/v1/{}", rest.split_once('?').unwrap().0)
    };
    let get = |url: String, signer: Option<&NodeKey>| {
        let mut req = app.http.get(&url);
        if let Some(signer) = signer {
            for (name, value) in xpand_protocol::transfer::sign_request(signer, "GET", &path(&url))
            {
                req = req.header(name, value);
            }
        }
        req.send()
    };

    assert_eq!(
        get(task.input_url.clone(), None).await.unwrap().status(),
        401
    );
    let stranger = NodeKey::generate();
    assert_eq!(
        get(task.input_url.clone(), Some(&stranger))
            .await
            .unwrap()
            .status(),
        403
    );
    let forged = task.input_url.replace("sig=", "sig=00");
    assert_eq!(get(forged, Some(&key)).await.unwrap().status(), 403);
    let resp = get(task.input_url.clone(), Some(&key)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let segment = dir.path().join("segment.mkv");
    std::fs::write(&segment, resp.bytes().await.unwrap()).unwrap();
    let (frames, width, height, _) = xpand_media::count_frames(&segment).await.unwrap();
    assert_eq!((frames, width, height), (25, 320, 240));
    // The input URL does not upload, and uploads go only where the output URL says.
    let mut put = app.http.put(&task.input_url).body("x");
    for (name, value) in xpand_protocol::transfer::sign_request(&key, "PUT", &path(&task.input_url))
    {
        put = put.header(name, value);
    }
    assert_eq!(put.send().await.unwrap().status(), 405);
    let mut put = app.http.put(&task.output_url).body(vec![7u8; 1000]);
    for (name, value) in
        xpand_protocol::transfer::sign_request(&key, "PUT", &path(&task.output_url))
    {
        put = put.header(name, value);
    }
    let resp = put.send().await.unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.json::<Value>().await.unwrap()["size"], 1000);

    // Once the node lets the shard go, its URLs are dead.
    let reject = xpand_protocol::Reject {
        assignment_id: a.assignment_id,
        shard_id: a.shard_id,
        reason: "test".into(),
        input_unusable: false,
    };
    node.send(UpKind::Reject, node.seal(UpKind::Reject, &reject))
        .await;
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if get(task.input_url.clone(), Some(&key))
                .await
                .unwrap()
                .status()
                == 403
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the URL stops working once the assignment is not current");
    node.die().await;
    app.teardown().await;
}

/// A node that returns wrong forecasts — with a consistent digest and hash chain, so only a second
/// run can tell — is outvoted: the job's output is the honest one, the liar is charged a
/// `disputed` failure and paid nothing, and each challenge is signed and sealed into the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_worker_is_outvoted_and_the_challenge_is_sealed() {
    let mut app = TestApp::spawn_with(|c| c.scheduling.redundancy_bps = 10_000).await;
    let liar_key = NodeKey::generate();
    xpand::nodes::register(&app.db, liar_key.id(), "liar")
        .await
        .unwrap();
    let mut liar = FakeNode::start(&app, liar_key.clone()).await;
    app.wait_until_alive(liar_key.id()).await;
    let (_, customer) = app.customer(50_000_000).await;
    let sheet = forecast_job(16, 4);
    let job: Value = app
        .post_json(&customer, "/v1/jobs", &sheet)
        .await
        .json()
        .await
        .unwrap();
    let job_id = job["id"].as_str().unwrap().to_string();
    // The liar takes both shards while it is alone, and answers once honest nodes are up.
    let assignments = [liar.next_assignment().await, liar.next_assignment().await];
    app.start_worker().await;
    app.start_worker().await;
    for a in &assignments {
        let lie = answer(a);
        liar.send(UpKind::Result, liar.seal(UpKind::Result, &lie))
            .await;
    }
    let job = tokio::time::timeout(
        Duration::from_secs(60),
        app.wait_for_job(&customer, &job_id),
    )
    .await
    .unwrap();
    assert_eq!(job["status"], "succeeded", "{job}");
    liar.die().await;
    tokio::time::timeout(Duration::from_secs(30), async {
        while app
            .state
            .presence
            .alive(&[liar_key.id().to_string()])
            .await
            .unwrap()
            == [true]
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the silent liar stops counting as alive");

    // The same sheet, honest nodes only (each checked by the other): the same forecasts.
    let again: Value = app
        .post_json(&customer, "/v1/jobs", &sheet)
        .await
        .json()
        .await
        .unwrap();
    let again = app
        .wait_for_job(&customer, again["id"].as_str().unwrap())
        .await;
    assert_eq!(again["status"], "succeeded");
    assert_eq!(
        job["output"], again["output"],
        "the lies did not reach the output"
    );

    let challenges: Vec<(String, String)> =
        sqlx::query_as("SELECT loser, job_id::text FROM challenges ORDER BY created_at")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(
        challenges,
        vec![(liar_key.id().to_string(), job_id.clone()); 2],
        "one challenge per lie, none between honest nodes"
    );
    let disputed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM node_failures WHERE node_id = $1 AND reason = 'disputed'",
    )
    .bind(liar_key.id())
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(disputed, 2);
    let node = app
        .get_json(&customer, &format!("/v1/nodes/{}", liar_key.id()))
        .await;
    assert_eq!(node["earnings"], 0, "{node}");
    assert_eq!(node["shards_failed"], 2, "{node}");
    // Replicas are free to the caller: it paid each job's quote once.
    assert_eq!(job["cost"], job["quote"]);
    let replicas: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM shards WHERE replica_of IS NOT NULL AND fee = 0 AND status = 'done'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(
        replicas,
        2 * 2 + 2,
        "two votes per lie, one check per honest shard"
    );

    // The challenges are signed by the gateway and sealed.
    let key = app.config.gateway_key.signing_key().clone();
    xpand::ledger::blocks::seal_all(&app.db, &key)
        .await
        .unwrap();
    // The ledger seals each challenge's digest; the envelope it commits to is kept with it.
    let sealed: Vec<String> = sqlx::query_scalar(
        "SELECT c.envelope FROM challenges c
         JOIN chain_records r
           ON r.kind = 'challenge' AND r.digest = encode(sha256(convert_to(c.envelope, 'UTF8')), 'hex')
         WHERE EXISTS (SELECT 1 FROM ledger_blocks b WHERE r.id BETWEEN b.first_record_id AND b.last_record_id)",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(sealed.len(), 2);
    let topic = format!("{}/v1/challenges", app.config.topic_prefix);
    for envelope in &sealed {
        let opened = Envelope::open(envelope.as_bytes(), &topic, now_ms(), 600_000).unwrap();
        assert_eq!(opened.signer, app.config.gateway_key.id());
        let body: Value = opened.parse().unwrap();
        assert_eq!(body["loser"], liar_key.id());
    }
    app.assert_ledger_invariants().await;
    app.teardown().await;
}

/// A node that floods the gateway is cut off at its per-second allowance; the excess is dropped
/// and counted, and the next second it is heard again.
#[tokio::test]
async fn a_flooding_node_is_rate_limited() {
    // A low allowance, so the count does not depend on how fast a loaded machine sends: 200
    // messages over even 20 s leave at least 100 beyond 5 a second.
    let app = TestApp::spawn_with(|c| c.node_msgs_per_sec = 5).await;
    let key = NodeKey::generate();
    xpand::nodes::register(&app.db, key.id(), "flood")
        .await
        .unwrap();
    let node = FakeNode::start(&app, key.clone()).await;
    app.wait_until_alive(key.id()).await;
    for _ in 0..200 {
        node.send(
            UpKind::Heartbeat,
            node.seal(UpKind::Heartbeat, &Heartbeat { active_shards: 0 }),
        )
        .await;
    }
    // The gateway may take a while to work through the burst on a loaded machine.
    tokio::time::timeout(Duration::from_secs(30), async {
        while app.rejected("rate_limited").await < 100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the excess is dropped as rate_limited");
    assert!(
        app.rejected("rate_limited").await <= 200,
        "only the excess is dropped"
    );
    assert_eq!(app.rejected("replayed").await, 0);
    node.die().await;
    app.teardown().await;
}

/// A node that keeps its lease alive with progress but never finishes is a straggler: once it
/// has run well past its siblings, a speculative copy runs elsewhere, the first valid result
/// wins (and is paid), the straggler is told to stop, and its late answer changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_straggler_gets_a_speculative_copy_and_is_told_to_stop() {
    let mut app = TestApp::spawn_with(|c| {
        c.scheduling.straggler_min_secs = 1.0;
        c.scheduling.straggler_factor = 3.0;
    })
    .await;
    let slow_key = NodeKey::generate();
    xpand::nodes::register(&app.db, slow_key.id(), "slow")
        .await
        .unwrap();
    let mut slow = FakeNode::start(&app, slow_key.clone()).await;
    app.wait_until_alive(slow_key.id()).await;
    let (_, customer) = app.customer(50_000_000).await;
    let job: Value = app
        .post_json(&customer, "/v1/jobs", &forecast_job(16, 4))
        .await
        .json()
        .await
        .unwrap();
    let job_id = job["id"].as_str().unwrap().to_string();
    // The slow node takes one shard; a real worker joins and takes the rest.
    let a = slow.next_assignment().await;
    let fast = app.start_worker().await;
    let b = slow.next_assignment().await;
    // Give the second one back: the real worker runs it, and it sets the pace.
    let reject = xpand_protocol::Reject {
        assignment_id: b.assignment_id,
        shard_id: b.shard_id,
        reason: "busy".into(),
        input_unusable: false,
    };
    slow.send(UpKind::Reject, slow.seal(UpKind::Reject, &reject))
        .await;
    // Keep the first lease alive without ever finishing.
    let progress = Progress {
        assignment_id: a.assignment_id,
        shard_id: a.shard_id,
        done: 0,
        total: 8,
        chain: xpand_protocol::ProgressChain::new(a.assignment_id).hex(),
    };
    let job = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            slow.send(UpKind::Progress, slow.seal(UpKind::Progress, &progress))
                .await;
            let job = app.get_json(&customer, &format!("/v1/jobs/{job_id}")).await;
            if job["status"] != "running" && job["status"] != "queued" {
                return job;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await
    .expect("the speculative copy finishes the job");
    assert_eq!(job["status"], "succeeded", "{job}");
    let stop = slow.next_stop(10).await;
    assert_eq!(
        (stop.assignment_id, stop.shard_id, stop.node.as_str()),
        (a.assignment_id, a.shard_id, slow_key.id())
    );
    // The winner ran it and is paid for it; the straggler earns nothing and its late answer is
    // dropped.
    let node: Option<String> = sqlx::query_scalar("SELECT node_id FROM shards WHERE id = $1")
        .bind(a.shard_id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(node.as_deref(), Some(fast.as_str()));
    let before = app.rejected("stale_assignment").await;
    slow.send(UpKind::Result, slow.seal(UpKind::Result, &answer(&a)))
        .await;
    wait_rejected(&app, "stale_assignment", before + 1).await;
    let earned = app
        .get_json(&customer, &format!("/v1/nodes/{}", slow_key.id()))
        .await;
    assert_eq!(earned["earnings"], 0);
    let again = app.get_json(&customer, &format!("/v1/jobs/{job_id}")).await;
    assert_eq!(again["output"], job["output"]);
    slow.die().await;
    app.assert_ledger_invariants().await;
    app.teardown().await;
}

/// A replica whose node goes quiet is re-dispatched — to that node too if it is the only other
/// one: losing a lease is not having voted. (Only nodes that produced a run are kept off.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_replica_goes_back_to_any_node_that_has_not_voted() {
    let app = TestApp::spawn_with(|c| {
        c.scheduling.redundancy_bps = 10_000;
        c.scheduling.lease = Duration::from_secs(2);
    })
    .await;
    let mut nodes = vec![
        FakeNode::join(&app, "fake-0", 4).await,
        FakeNode::join(&app, "fake-1", 4).await,
    ];
    let (_, customer) = app.customer(50_000_000).await;
    let job: Value = app
        .post_json(&customer, "/v1/jobs", &forecast_job(8, 3))
        .await
        .json()
        .await
        .unwrap();
    // Whichever node gets the shard answers at once; the other gets the replica.
    let (voter, _, replica) = first_vote(&app, &mut nodes).await;
    let other = &mut nodes[1 - voter];
    // The other node lets the replica's lease lapse...
    // ...and then gets it again, since it never voted, and agrees.
    let again = other.next_assignment().await;
    assert_eq!(again.shard_id, replica.shard_id);
    assert_ne!(again.assignment_id, replica.assignment_id);
    other
        .send(UpKind::Result, other.seal(UpKind::Result, &answer(&again)))
        .await;
    let job = app
        .wait_for_job(&customer, job["id"].as_str().unwrap())
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    for node in nodes {
        node.die().await;
    }
    app.teardown().await;
}

/// With two fake nodes and every result held: whichever node gets the job's one shard answers
/// it at once, and the other gets its replica. Returns the voter's index, the primary's and the
/// replica's assignments.
async fn first_vote(app: &TestApp, nodes: &mut [FakeNode]) -> (usize, Assignment, Assignment) {
    let [a, b] = nodes else {
        panic!("two nodes expected")
    };
    let (voter, primary) = tokio::select! {
        p = a.next_assignment() => (0, p),
        p = b.next_assignment() => (1, p),
    };
    let answering = &nodes[voter];
    answering
        .send(
            UpKind::Result,
            answering.seal(UpKind::Result, &answer(&primary)),
        )
        .await;
    let replica = nodes[1 - voter].next_assignment().await;
    assert_eq!(
        replica.shard_id,
        replica_of_shard(app, primary.shard_id).await
    );
    (voter, primary, replica)
}

/// The replica row of `primary`.
async fn replica_of_shard(app: &TestApp, primary: uuid::Uuid) -> uuid::Uuid {
    sqlx::query_scalar("SELECT id FROM shards WHERE replica_of = $1")
        .bind(primary)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

/// The minimal topology's failure, by hand: a held result's replica may only run on the node
/// that died, and the survivor has one slot. The replica must not block the next job (it once
/// did, for every later job), and the held result is accepted unverified once nobody can check
/// it, long before the job's timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_only_a_dead_node_may_run_blocks_nothing_and_is_accepted_unverified() {
    let app = TestApp::spawn_with(|c| {
        c.scheduling.redundancy_bps = 10_000;
        c.scheduling.lease = Duration::from_secs(2);
        c.scheduling.verify_wait = Duration::from_secs(3);
    })
    .await;
    let mut nodes = vec![
        FakeNode::join(&app, "fake-0", 1).await,
        FakeNode::join(&app, "fake-1", 1).await,
    ];
    let (_, customer) = app.customer(50_000_000).await;
    let job = forecast_job(8, 3);
    let submit = || app.post_json(&customer, "/v1/jobs", &job);
    let held: Value = submit().await.json().await.unwrap();
    let (voter, primary, _) = first_vote(&app, &mut nodes).await;
    let doomed = nodes.remove(1 - voter);
    let mut survivor = nodes.remove(0);
    // The checker dies holding the replica.
    let doomed_id = doomed.key.id().to_string();
    doomed.die().await;
    tokio::time::timeout(Duration::from_secs(30), async {
        while app
            .state
            .presence
            .alive(std::slice::from_ref(&doomed_id))
            .await
            .unwrap()
            == [true]
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the silent node is taken for dead within 30 s");

    // The next job's shard reaches the survivor's one slot, ahead of the replica it may not run.
    let next: Value = submit().await.json().await.unwrap();
    let assignment = survivor.next_assignment().await;
    assert_eq!(assignment.job_id.to_string(), next["id"].as_str().unwrap());
    survivor
        .send(
            UpKind::Result,
            survivor.seal(UpKind::Result, &answer(&assignment)),
        )
        .await;
    let next = app
        .wait_for_job(&customer, next["id"].as_str().unwrap())
        .await;
    assert_eq!(next["status"], "succeeded", "{next}");
    assert!(next["output"].get("unverified_shards").is_none(), "{next}");

    // Nobody may check the held result any more: it is taken as it is, and says so.
    let held = app
        .wait_for_job(&customer, held["id"].as_str().unwrap())
        .await;
    assert_eq!(held["status"], "succeeded", "{held}");
    assert_eq!(held["output"]["unverified_shards"], serde_json::json!([0]));
    let (unverified, replica_status): (bool, String) = sqlx::query_as(
        "SELECT p.unverified, r.status FROM shards p JOIN shards r ON r.replica_of = p.id
         WHERE p.id = $1",
    )
    .bind(primary.shard_id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(unverified);
    assert_eq!(replica_status, "canceled");
    let metrics = app.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "xpand_unverified_shards_total{kind=\"forecast\"} 1"),
        "{metrics}"
    );
    app.assert_ledger_invariants().await;
    survivor.die().await;
    app.teardown().await;
}

/// One account's big job does not starve another account's small one: with a single slot, the
/// small job's shard is the next one dispatched after the big job's first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_job_does_not_starve_another_accounts_small_one() {
    let app = TestApp::spawn().await;
    let mut node = FakeNode::join(&app, "fake-0", 1).await;
    let (_, big_owner) = app.customer(500_000_000).await;
    let (_, small_owner) = app.customer(50_000_000).await;
    let big: Value = app
        .post_json(&big_owner, "/v1/jobs", &forecast_job(400, 3))
        .await
        .json()
        .await
        .unwrap();
    let first = node.next_assignment().await;
    assert_eq!(first.job_id.to_string(), big["id"].as_str().unwrap());
    let small: Value = app
        .post_json(&small_owner, "/v1/jobs", &forecast_job(1, 3))
        .await
        .json()
        .await
        .unwrap();
    node.send(UpKind::Result, node.seal(UpKind::Result, &answer(&first)))
        .await;
    let second = node.next_assignment().await;
    assert_eq!(second.job_id.to_string(), small["id"].as_str().unwrap());
    node.send(UpKind::Result, node.seal(UpKind::Result, &answer(&second)))
        .await;
    let small = app
        .wait_for_job(&small_owner, small["id"].as_str().unwrap())
        .await;
    assert_eq!(small["status"], "succeeded", "{small}");
    node.die().await;
    app.teardown().await;
}

/// A predict shard answered with made-up numbers by a node that announced the runner: the
/// replica an honest node runs disagrees, the third run settles it, and the job carries ONNX
/// Runtime's numbers (as in the forecast case above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_worker_on_a_predict_job_is_outvoted() {
    let mut app = TestApp::spawn_with(|c| c.scheduling.redundancy_bps = 10_000).await;
    let (_, customer) = app.customer(50_000_000).await;
    let model = crate::models::churn(|_| {});
    let registered =
        crate::models::upload(&app, &customer, &crate::models::manifest("churn"), model).await;
    assert_eq!(registered.status(), 201);
    let liar_key = NodeKey::generate();
    xpand::nodes::register(&app.db, liar_key.id(), "liar")
        .await
        .unwrap();
    let runner = ModelInfo {
        name: xpand::kinds::predict::RUNNER.into(),
        version: "test".into(),
        kind: "predict".into(),
        sha256: String::new(),
    };
    let mut liar = FakeNode::start_with(&app, liar_key.clone(), runner, 4).await;
    app.wait_until_alive(liar_key.id()).await;
    let rows: Vec<f64> = (0..40).map(|i| f64::from(i % 7) - 3.0).collect();
    let request = serde_json::json!({
        "kind": "predict",
        "max_fee": 1_000_000,
        "input": {"model": "churn",
                  "inputs": [{"name": "x", "datatype": "FP32", "shape": [5, 8], "data": rows}]},
    });
    let job: Value = app
        .post_json(&customer, "/v1/jobs", &request)
        .await
        .json()
        .await
        .unwrap();
    let job_id = job["id"].as_str().unwrap().to_string();
    let assignment = liar.next_assignment().await;
    app.start_worker().await;
    app.start_worker().await;
    let ShardTask::Predict(task) = &assignment.task else {
        panic!(
            "a predict assignment was expected, got {:?}",
            assignment.task
        );
    };
    let lie = ShardOutput::Predict {
        outputs: vec![xpand_protocol::Tensor {
            name: "p".into(),
            datatype: "FP32".into(),
            shape: vec![i64::from(task.rows()), 1],
            data: vec![0.5; task.rows() as usize],
        }],
    };
    let lie = result_for(&assignment, lie);
    liar.send(UpKind::Result, liar.seal(UpKind::Result, &lie))
        .await;
    let job = tokio::time::timeout(
        Duration::from_secs(60),
        app.wait_for_job(&customer, &job_id),
    )
    .await
    .unwrap();
    assert_eq!(job["status"], "succeeded", "{job}");
    let scores: Vec<f64> =
        serde_json::from_value(job["output"]["outputs"][0]["data"].clone()).unwrap();
    assert!(
        scores.iter().all(|&p| p != 0.5),
        "the lie did not reach the output: {scores:?}"
    );
    let losers: Vec<String> = sqlx::query_scalar("SELECT loser FROM challenges")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(losers, [liar_key.id().to_string()]);
    liar.die().await;
    app.assert_ledger_invariants().await;
    app.teardown().await;
}
