//! Test harness: every test spawns the real gateway on a random port against its own fresh
//! Postgres database, its own Redis key prefix and its own MQTT topic prefix, with real
//! in-process `xpand-worker`s running the real ONNX model.

use std::time::{Duration, Instant};
use xpand::nodes::Presence as _;

use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;
use xpand::config::Config;
use xpand::error::Problem;
use xpand::http::account::Account;
use xpand::jobs::Job;
use xpand::startup::Application;
use xpand_protocol::NodeKey;
use xpand_worker::{BrokerAddress, BrokerLink, WorkerConfig};

pub fn pg_server() -> String {
    std::env::var("XPAND_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

pub fn redis_url() -> String {
    std::env::var("XPAND_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub const MQTT_HOST: &str = "127.0.0.1";
pub const MQTT_PORT: u16 = 1883;

pub struct TestWorker {
    pub node_id: String,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl TestWorker {
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let what = format!("worker {}", self.node_id);
        stopped(&what, self.handle, Duration::from_secs(15)).await;
    }
}

/// Awaits a task the test told to stop: a hang, a panic or an error in it fails the test.
async fn stopped(what: &str, task: JoinHandle<anyhow::Result<()>>, within: Duration) {
    match tokio::time::timeout(within, task).await {
        Err(_) => panic!("{what} did not stop within {within:?}"),
        Ok(Err(join)) => panic!("{what} panicked: {join}"),
        Ok(Ok(Err(e))) => panic!("{what} failed: {e:#}"),
        Ok(Ok(Ok(()))) => {}
    }
}

pub struct Replica {
    pub base: String,
    stop: oneshot::Sender<()>,
    server: JoinHandle<anyhow::Result<()>>,
}

impl Replica {
    pub async fn stop(self) {
        let _ = self.stop.send(());
        stopped("the gateway replica", self.server, Duration::from_secs(20)).await;
    }
}

pub struct TestApp {
    pub base: String,
    pub db: PgPool,
    pub db_name: String,
    pub config: Config,
    pub http: reqwest::Client,
    pub state: xpand::http::state::AppState,
    pub workers: Vec<TestWorker>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<anyhow::Result<()>>,
    leftovers: Leftovers,
}

/// What a test made outside its process: its database, Redis keys and directories. Dropped
/// while still armed (the test panicked before its teardown), it removes them, so a failing
/// test leaves nothing behind either.
pub struct Leftovers {
    pub db_name: String,
    pub redis_prefix: String,
    pub dirs: Vec<std::path::PathBuf>,
    armed: bool,
}

impl Leftovers {
    pub fn new(db_name: &str, redis_prefix: &str, dirs: Vec<std::path::PathBuf>) -> Self {
        Self {
            db_name: db_name.into(),
            redis_prefix: redis_prefix.into(),
            dirs,
            armed: true,
        }
    }

    /// Cleaned up in order by the test itself: nothing left to do on drop.
    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (db_name, prefix, dirs) = (
            self.db_name.clone(),
            self.redis_prefix.clone(),
            std::mem::take(&mut self.dirs),
        );
        // A panicking test's runtime may be unwinding: clean up on a thread with its own.
        let cleaned = std::thread::spawn(move || {
            for dir in dirs {
                let _ = std::fs::remove_dir_all(dir);
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the clean-up");
            runtime.block_on(async {
                delete_redis_prefix(&prefix).await;
                drop_database(&db_name).await;
            });
        })
        .join();
        if cleaned.is_err() {
            eprintln!(
                "cleaning up after a failed test failed: {} may be left",
                self.db_name
            );
        }
    }
}

/// Drops a test database, closing whatever connections it still has.
pub async fn drop_database(name: &str) {
    let mut conn = PgConnection::connect(&format!("{}/postgres", pg_server()))
        .await
        .unwrap();
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut conn)
        .await
        .unwrap();
}

/// A fresh, unique name; the timestamp lets a later run sweep databases a crashed test left.
fn unique(prefix: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    format!(
        "{prefix}_{secs}_{}",
        &Uuid::new_v4().simple().to_string()[..12]
    )
}

pub async fn create_database() -> String {
    let name = unique("xpand_t");
    let mut conn = PgConnection::connect(&format!("{}/postgres", pg_server()))
        .await
        .expect("Postgres must be running on 127.0.0.1:5432 (make test starts it)");
    // Sweep what crashed runs left behind (older than an hour).
    let cutoff = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 3600;
    let stale: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'xpand_t_%'")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    for db in stale {
        let ts = db.split('_').nth(2).and_then(|t| t.parse::<u64>().ok());
        if ts.is_some_and(|t| t < cutoff) {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                .execute(&mut conn)
                .await;
        }
    }
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap();
    name
}

pub fn test_config(db_name: &str) -> Config {
    let prefix = unique("t");
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        database_url: format!("{}/{db_name}", pg_server()),
        redis_url: redis_url(),
        mqtt: BrokerLink::new(BrokerAddress::plain(MQTT_HOST, MQTT_PORT), None, &[]).unwrap(),
        topic_prefix: format!("xpand-test/{prefix}"),
        redis_prefix: format!("xpand-test:{prefix}"),
        gateway_key: NodeKey::generate(),
        auditor_key: format!("xpa_{}", Uuid::new_v4().simple()),
        node_ttl: Duration::from_secs(5),
        max_body_bytes: 1024 * 1024,
        token_ttl: Duration::from_secs(900),
        seal_interval: Duration::from_secs(3600),
        epoch_length: Duration::from_secs(3600),
        files_dir: std::env::temp_dir().join(format!("xpand-files-{prefix}")),
        files_url: None,
        scratch_dir: std::env::temp_dir().join(format!("xpand-scratch-{prefix}")),
        public_url: None,
        max_video_seconds: 600,
        // Small shards: a test's few rows still make several, so streaming and multi-shard
        // settlement are exercised.
        forecast_rows_per_shard: 8,
        predict_elements_per_shard: 8_192,
        node_msgs_per_sec: 2_000,
        scheduling: xpand::config::Scheduling {
            lease: Duration::from_secs(30),
            job_timeout: Duration::from_secs(300),
            max_shard_attempts: 5,
            // Redundancy has its own tests; elsewhere one run per shard keeps results
            // predictable.
            redundancy_bps: 0,
            verify_new_node_shards: 0,
            verify_wait: Duration::from_secs(20),
            min_power_score: -1_000,
            straggler_factor: 3.0,
            straggler_min_secs: 10.0,
            place_at_submit: true,
        },
        max_upload_bytes: 8 * 1024 * 1024,
        max_model_bytes: 4 * 1024 * 1024,
        pool: xpand::config::PoolConfig {
            issuance: 1_000_000,
            fee_share_bps: 5_000,
        },
        db_pool: 8,
        // Test receivers (webhooks) listen on this machine.
        egress: xpand::egress::EgressPolicy {
            allow: vec!["127.0.0.0/8".parse().unwrap()],
        },
        cors_origins: Vec::new(),
        // The rate limit has its own test; elsewhere tests poll as fast as they like.
        limits: xpand::config::Limits {
            requests_per_sec: 1_000_000,
            ..xpand::config::Limits::DEFAULT
        },
    }
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// Spawns a gateway with `adjust` applied to the test configuration.
    pub async fn spawn_with(adjust: impl FnOnce(&mut Config)) -> Self {
        xpand::telemetry::init();
        let db_name = create_database().await;
        let mut config = test_config(&db_name);
        adjust(&mut config);
        let leftovers = Leftovers::new(
            &db_name,
            &config.redis_prefix,
            vec![config.files_dir.clone(), config.scratch_dir.clone()],
        );
        let app = Application::build(config.clone())
            .await
            .expect("app builds");
        let base = format!("http://127.0.0.1:{}", app.port());
        let db = app.state().db.clone();
        let state = app.state().clone();
        let (stop, stopped) = oneshot::channel();
        let server = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        TestApp {
            base,
            db,
            db_name,
            config,
            http: reqwest::Client::new(),
            state,
            workers: Vec::new(),
            stop: Some(stop),
            server,
            leftovers,
        }
    }

    /// Starts a second gateway replica on the same database, Redis prefix, broker prefix and
    /// gateway key, as a load balancer would see it. Stopped by [`Replica::stop`].
    pub async fn replica(&self) -> Replica {
        let app = Application::build(self.config.clone())
            .await
            .expect("replica builds");
        let base = format!("http://127.0.0.1:{}", app.port());
        let (stop, stopped) = oneshot::channel();
        let server = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        Replica { base, stop, server }
    }

    /// Starts a registered worker with a fresh node key and waits until the gateway sees it.
    pub async fn start_worker(&mut self) -> String {
        let key = NodeKey::generate();
        let node_id = key.id().to_string();
        xpand::nodes::register(&self.db, &node_id, &format!("test-{}", &node_id[..6]))
            .await
            .unwrap();
        self.run_worker(key).await;
        self.wait_until_alive(&node_id).await;
        node_id
    }

    /// Runs a worker with `key` (registered or not).
    pub async fn run_worker(&mut self, key: NodeKey) {
        // The gateway's broker: a test may give it a private one.
        let mut cfg = WorkerConfig::new(
            self.config.mqtt.clone(),
            key.clone(),
            self.config.gateway_key.id(),
        );
        cfg.topic_prefix = self.config.topic_prefix.clone();
        cfg.models_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/workers/models").into();
        cfg.name = format!("test-{}", &key.id()[..6]);
        cfg.max_concurrent_shards = 4;
        cfg.heartbeat_interval = Duration::from_millis(500);
        // Removed with the test's scratch directory.
        cfg.model_cache_dir = self
            .config
            .scratch_dir
            .join(format!("models-{}", &key.id()[..16]));
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(xpand_worker::run(cfg, async {
            let _ = stopped.await;
        }));
        self.workers.push(TestWorker {
            node_id: key.id().to_string(),
            stop: Some(stop),
            handle,
        });
    }

    pub async fn wait_until_alive(&self, node_id: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let announced: Option<bool> =
                sqlx::query_scalar("SELECT capabilities IS NOT NULL FROM nodes WHERE id = $1")
                    .bind(node_id)
                    .fetch_optional(&self.db)
                    .await
                    .unwrap();
            let alive = self
                .state
                .presence
                .alive(&[node_id.to_string()])
                .await
                .unwrap();
            if announced == Some(true) && alive == [true] {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "worker {node_id} never became alive"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A new customer account with `credit` micro-credits; returns its id and API key.
    pub async fn customer(&self, credit: i64) -> (Uuid, String) {
        xpand::accounts::create_customer(&self.db, "test", credit)
            .await
            .unwrap()
    }

    pub async fn post_json(&self, key: &str, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, key: &str, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
    }

    /// A GET with no credentials, as a stranger sends it.
    pub async fn get_public(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
    }

    pub async fn get_json(&self, key: &str, path: &str) -> Value {
        let resp = self.get(key, path).await;
        assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
        resp.json().await.unwrap()
    }

    /// The Prometheus text the gateway serves.
    pub async fn metrics(&self) -> String {
        let resp = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap()
    }

    /// Worker messages the gateway dropped for `reason` so far. A series appears at its first
    /// drop, so a missing one reads 0, but only for a reason the gateway has: a renamed label
    /// must not read as "nothing dropped".
    pub async fn rejected(&self, reason: &str) -> u64 {
        let known = xpand::broker::DropReason::ALL.map(xpand::broker::DropReason::label);
        assert!(
            known.contains(&reason),
            "the gateway drops nothing as {reason:?}"
        );
        let needle = format!("xpand_rejected_messages_total{{reason=\"{reason}\"}} ");
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(&needle))
            .map_or(0, |v| v.trim().parse().unwrap())
    }

    /// A successful GET's body as the API type `T`.
    pub async fn get_as<T: DeserializeOwned>(&self, key: &str, path: &str) -> T {
        let resp = self.get(key, path).await;
        assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
        read(resp).await
    }

    pub async fn balances(&self, key: &str) -> (i64, i64) {
        let a: Account = self.get_as(key, "/v1/account").await;
        (a.available, a.held)
    }

    /// `GET /v1/jobs/{id}`: must be 200.
    pub async fn job(&self, key: &str, id: Uuid) -> Job {
        let resp = self.get(key, &format!("/v1/jobs/{id}")).await;
        assert_eq!(resp.status(), 200, "GET /v1/jobs/{id}");
        read(resp).await
    }

    /// `POST /v1/jobs` with `body`: the status (201 new, 200 replayed) and the job. Anything
    /// but a job in the body fails the test, with the body.
    pub async fn submit(&self, key: &str, body: &Value) -> (StatusCode, Job) {
        let resp = self.post_json(key, "/v1/jobs", body).await;
        (resp.status(), read(resp).await)
    }

    /// Polls a job until its status is terminal.
    pub async fn wait_for(&self, key: &str, id: Uuid) -> Job {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let job = self.job(key, id).await;
            if job.status.is_terminal() {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} stuck in {}",
                job.status.as_str()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls a job until it is terminal.
    pub async fn wait_for_job(&self, key: &str, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let job = self.get_json(key, &format!("/v1/jobs/{id}")).await;
            let status = job["status"].as_str().unwrap().to_string();
            if ["succeeded", "failed", "canceled"].contains(&status.as_str()) {
                return job;
            }
            assert!(Instant::now() < deadline, "job {id} stuck in {status}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Ledger invariants over the whole database.
    pub async fn assert_ledger_invariants(&self) {
        assert_ledger_invariants(&self.db).await;
    }

    /// Stops workers and the gateway, clears the workers' retained announces and drops the
    /// database.
    pub async fn teardown(mut self) {
        let nodes: Vec<String> = self.workers.iter().map(|w| w.node_id.clone()).collect();
        for w in self.workers.drain(..) {
            w.stop().await;
        }
        clear_retained(&self.config.topic_prefix, &nodes).await;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        stopped("the gateway", self.server, Duration::from_secs(20)).await;
        delete_redis_prefix(&self.config.redis_prefix).await;
        let _ = std::fs::remove_dir_all(&self.config.files_dir);
        let _ = std::fs::remove_dir_all(&self.config.scratch_dir);
        self.db.close().await;
        drop_database(&self.db_name).await;
        self.leftovers.disarm();
    }
}

/// JSON text as `T`; the error names the path that did not fit (`progress.shards_total`).
pub fn parse<T: DeserializeOwned>(text: &str) -> T {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de)
        .unwrap_or_else(|e| panic!("not a {}: {e}\n{text}", std::any::type_name::<T>()))
}

/// A JSON value as `T`, as [`parse`] reads text.
pub fn parse_value<T: DeserializeOwned>(value: &Value) -> T {
    serde_path_to_error::deserialize(value)
        .unwrap_or_else(|e| panic!("not a {}: {e}\n{value}", std::any::type_name::<T>()))
}

/// A response body as the API type `T`: a field the server renamed or retyped fails here,
/// with the body, instead of reading as Null.
pub async fn read<T: DeserializeOwned>(resp: reqwest::Response) -> T {
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let de = &mut serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).unwrap_or_else(|e| {
        panic!(
            "{status}: body is not a {}: {e}\n{text}",
            std::any::type_name::<T>()
        )
    })
}

/// A problem response: `application/problem+json`, read as the API's [`Problem`].
pub async fn problem(resp: reqwest::Response) -> Problem {
    let content_type = resp.headers().get(reqwest::header::CONTENT_TYPE).cloned();
    assert_eq!(
        content_type.as_ref().map(|c| c.to_str().unwrap()),
        Some("application/problem+json"),
        "a problem response ({})",
        resp.status()
    );
    read(resp).await
}

/// A 422 whose problem names `field` with a detail containing `detail` (`what` labels a
/// failure).
pub async fn assert_refused(resp: reqwest::Response, what: &str, field: &str, detail: &str) {
    assert_eq!(resp.status(), 422, "{what}");
    let refused = problem(resp).await;
    let error = refused
        .errors
        .iter()
        .find(|e| e.field == field)
        .unwrap_or_else(|| panic!("{what}: no error on {field}: {refused:?}"));
    assert!(error.detail.contains(detail), "{what}: {}", error.detail);
}

/// A forecast job's output, which the API types as kind-specific JSON.
#[derive(Debug, serde::Deserialize)]
pub struct ForecastOutput {
    pub forecasts: Vec<Vec<f64>>,
    /// Present when the job asked for `params.level`.
    #[serde(default)]
    pub intervals: Vec<xpand_protocol::ForecastInterval>,
}

/// The forecasts of a job that has an output (it panics on one that has none).
pub fn forecasts(job: &Job) -> Vec<Vec<f64>> {
    let output = job
        .output
        .as_ref()
        .unwrap_or_else(|| panic!("job {} has no output: {job:?}", job.id));
    parse_value::<ForecastOutput>(output).forecasts
}

/// The rows of a `partial` event (`JobEvent::Partial::rows`, typed as JSON by the API).
pub fn partial_rows(rows: &Value) -> Vec<Vec<f64>> {
    parse_value(rows)
}

/// `rows` spreadsheet rows of a seasonal-ish series, each of length `len`.
pub fn sheet(rows: usize, len: usize) -> Vec<Vec<f64>> {
    (0..rows)
        .map(|r| {
            (0..len)
                .map(|t| {
                    let t = t as f64;
                    100.0 + r as f64 * 10.0 + 0.5 * t + 8.0 * (t * std::f64::consts::PI / 6.0).sin()
                })
                .collect()
        })
        .collect()
}

pub fn forecast_job(rows: usize, horizon: u32) -> Value {
    json!({
        "kind": "forecast",
        "input": { "series": sheet(rows, 36) },
        "params": { "horizon": horizon },
        "max_fee": 10_000_000,
    })
}

/// The result a node sends for `output` of assignment `a`: its digest and its hash chain.
pub fn result_for(
    a: &xpand_protocol::Assignment,
    output: xpand_protocol::ShardOutput,
) -> xpand_protocol::ShardResult {
    xpand_protocol::ShardResult {
        assignment_id: a.assignment_id,
        shard_id: a.shard_id,
        output_sha256: output.digest(),
        chain: output.chain(a.assignment_id),
        output,
        elapsed_ms: 1,
    }
}

/// Publishing an empty retained message deletes the broker's retained one.
pub async fn clear_retained(prefix: &str, nodes: &[String]) {
    use rumqttc::v5::{mqttbytes::QoS, AsyncClient, Event, MqttOptions};
    if nodes.is_empty() {
        return;
    }
    let topics = xpand_protocol::Topics::new(prefix);
    let options = MqttOptions::new(unique("cleanup"), MQTT_HOST, MQTT_PORT);
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    for node in nodes {
        let topic = topics.up(node, xpand_protocol::UpKind::Announce);
        client
            .publish(topic, QoS::AtLeastOnce, true, Vec::new())
            .await
            .unwrap();
    }
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while acked < nodes.len() && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            _ => break,
        }
    }
    let _ = client.disconnect().await;
}

/// Deletes every Redis key under `prefix` (nonces and liveness keys would expire anyway).
pub async fn delete_redis_prefix(prefix: &str) {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

/// Ledger invariants over the whole database.
pub async fn assert_ledger_invariants(db: &PgPool) {
    let unbalanced: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT tx_id FROM ledger_entries GROUP BY tx_id HAVING sum(amount) <> 0) t",
    )
    .fetch_one(db)
    .await
    .unwrap();
    assert_eq!(unbalanced, 0, "every ledger transaction sums to zero");
    let negative: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ledger_accounts WHERE balance < 0 AND purpose <> 'issuance'",
    )
    .fetch_one(db)
    .await
    .unwrap();
    assert_eq!(negative, 0, "only issuance may be negative");
    let drift: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ledger_accounts a
         WHERE a.balance <> COALESCE((SELECT sum(amount) FROM ledger_entries e WHERE e.ledger_account_id = a.id), 0)",
    )
    .fetch_one(db)
    .await
    .unwrap();
    assert_eq!(drift, 0, "balances equal the sum of their entries");
    let total: Option<i64> = sqlx::query_scalar("SELECT sum(balance)::bigint FROM ledger_accounts")
        .fetch_one(db)
        .await
        .unwrap();
    assert_eq!(total.unwrap_or(0), 0, "money is neither created nor lost");
}

/// Money per job, over every job in `db` (all ended): held once and released once; a failed
/// job cost nothing and a succeeded one its quote; nodes were paid each done shard's fee
/// exactly once; nothing is left in escrow.
pub async fn assert_every_job_settled(db: &PgPool) {
    let unbalanced_jobs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs j WHERE
            (SELECT count(*) FROM ledger_transactions t WHERE t.job_id = j.id AND t.kind = 'escrow_hold') <> 1
         OR (SELECT count(*) FROM ledger_transactions t WHERE t.job_id = j.id AND t.kind = 'escrow_release') <> 1
         OR (j.status = 'failed' AND j.error->>'code' <> 'input_unusable' AND j.cost <> 0)
         OR (j.status = 'succeeded' AND j.cost <> j.quote)",
    )
    .fetch_one(db)
    .await
    .unwrap();
    assert_eq!(
        unbalanced_jobs, 0,
        "every job held once, released once, charged right"
    );
    let overpaid: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs j
         WHERE (j.status IN ('succeeded', 'canceled') OR j.error->>'code' = 'input_unusable') AND
            (SELECT COALESCE(sum(e.amount), 0) FROM ledger_entries e
               JOIN ledger_transactions t ON t.id = e.tx_id
               JOIN ledger_accounts a ON a.id = e.ledger_account_id
             WHERE t.job_id = j.id AND t.kind = 'escrow_release' AND a.purpose = 'earnings')
            <> (SELECT COALESCE(sum(fee), 0) FROM shards s
                WHERE s.job_id = j.id AND s.status = 'done' AND s.replica_of IS NULL)",
    )
    .fetch_one(db)
    .await
    .unwrap();
    assert_eq!(
        overpaid, 0,
        "nodes were paid each done shard's fee exactly once"
    );
    let held: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(balance), 0)::bigint FROM ledger_accounts WHERE purpose = 'held'",
    )
    .fetch_one(db)
    .await
    .unwrap();
    assert_eq!(held, 0, "no money left in escrow");
}

/// Forwards TCP to a service (Postgres, Redis) until cut: then open connections drop and new ones are refused.
pub struct CuttableProxy {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl CuttableProxy {
    pub async fn start(target: &'static str) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = Self {
            port,
            cut: Default::default(),
            links: Default::default(),
        };
        let (cut, links) = (proxy.cut.clone(), proxy.links.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if cut.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused, as good as
                }
                let link = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                links.lock().unwrap().push(link);
            }
        });
        proxy
    }

    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::SeqCst);
        if cut {
            for link in self.links.lock().unwrap().drain(..) {
                link.abort();
            }
        }
    }
}

/// A private Mosquitto on `port`, killed when dropped: a test may take it down and up again
/// without touching the shared broker.
pub struct PrivateBroker(std::process::Child);

impl PrivateBroker {
    pub async fn start(dir: &std::path::Path, port: u16) -> Self {
        Self::start_with(dir, port, "").await
    }

    /// A TLS listener, its certificate and key signed by `ca`.
    pub async fn start_tls(dir: &std::path::Path, port: u16, ca: &TestCa, host: &str) -> Self {
        let (cert, key) = ca.server_cert(host);
        let tls = format!(
            "cafile {}\ncertfile {}\nkeyfile {}\n",
            ca.ca_file().display(),
            cert.display(),
            key.display()
        );
        Self::start_with(dir, port, &tls).await
    }

    async fn start_with(dir: &std::path::Path, port: u16, listener_settings: &str) -> Self {
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        // `user root`: a broker started by root keeps the rights to read the test's key files.
        std::fs::write(
            &conf,
            format!(
                "user root\nlistener {port} 127.0.0.1\n{listener_settings}allow_anonymous true\n"
            ),
        )
        .unwrap();
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto runs");
        tokio::time::timeout(Duration::from_secs(10), async {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("mosquitto listens");
        Self(child)
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A certificate authority made for one test by the `openssl` command, in the test's own
/// directory, and the server certificates it signs.
pub struct TestCa {
    dir: std::path::PathBuf,
    name: String,
}

impl TestCa {
    pub fn new(dir: &std::path::Path, name: &str) -> Self {
        let ca = Self {
            dir: dir.to_owned(),
            name: name.to_string(),
        };
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN={name} test CA"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
                &format!("{name}-ca.key"),
                "-out",
                &format!("{name}-ca.pem"),
            ],
        );
        ca
    }

    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    /// A server certificate for `host` (an IP address or a DNS name): its PEM and key files.
    pub fn server_cert(&self, host: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let stem = format!("{}-server-{host}", self.name);
        let san = match host.parse::<std::net::IpAddr>() {
            Ok(_) => format!("IP:{host}"),
            Err(_) => format!("DNS:{host}"),
        };
        let ext = self.dir.join(format!("{stem}.ext"));
        std::fs::write(
            &ext,
            format!(
                "subjectAltName={san}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
            ),
        )
        .unwrap();
        let (key, csr, pem) = (
            format!("{stem}.key"),
            format!("{stem}.csr"),
            format!("{stem}.pem"),
        );
        openssl(
            &self.dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                &format!("/CN={host}"),
                "-keyout",
                &key,
                "-out",
                &csr,
            ],
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-days",
                "2",
                "-CA",
                &format!("{}-ca.pem", self.name),
                "-CAkey",
                &format!("{}-ca.key", self.name),
                "-set_serial",
                "1",
                "-extfile",
                &ext.display().to_string(),
                "-out",
                &pem,
            ],
        );
        (self.dir.join(pem), self.dir.join(key))
    }
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A free TCP port on the loopback, for a test's private broker or gateway.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process that is killed and reaped when dropped, so a test that panics leaves no
/// broker, gateway or worker running.
pub struct Process(pub std::process::Child);

impl Process {
    /// `kill -9`, and reaped.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until the gateway at `base` answers `/readyz` with 200; fails after `within` with
/// `why` (a log, say) in the message.
pub async fn wait_until_ready(base: &str, within: Duration, why: impl Fn() -> String) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let ready = tokio::time::timeout(within, async {
        while !http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(ready.is_ok(), "{base} never became ready{}", why());
}

/// Every job in `ids` ends within `within` and succeeds (nothing the test did is a reason to
/// fail one), and retried submits made no second job: `ids` are all the jobs in `db`.
pub async fn assert_all_succeeded(db: &PgPool, ids: &[Uuid], within: Duration, after: &str) {
    let deadline = Instant::now() + within;
    loop {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE id = ANY($1) AND status NOT IN ('succeeded', 'failed', 'canceled')",
        )
        .bind(ids)
        .fetch_one(db)
        .await
        .unwrap();
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{after}: {open} jobs never ended"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let not_succeeded: Vec<(Uuid, String, Option<Value>)> = sqlx::query_as(
        "SELECT id, status, error FROM jobs WHERE id = ANY($1) AND status <> 'succeeded' ORDER BY id LIMIT 10",
    )
    .bind(ids)
    .fetch_all(db)
    .await
    .unwrap();
    assert!(
        not_succeeded.is_empty(),
        "{after}: jobs that did not succeed, the first: {not_succeeded:?}"
    );
    let created: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(db)
        .await
        .unwrap();
    let mut distinct = ids.to_vec();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        created,
        distinct.len() as i64,
        "{after}: a retried submit made a second job"
    );
}

/// `xpand verify` passes on the sealed chain, through the gateway's public API.
pub async fn assert_verifies(base: &str) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_xpand"))
        .args(["verify", "--url", base])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "xpand verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What one submit came to, for a client that retries.
pub enum Submitted {
    Accepted(Uuid),
    /// The gateway failed or did not answer: try again, there or at another replica.
    Unavailable,
    /// Back-pressure (the account's cap on unfinished jobs, or its rate limit): wait, then try
    /// again anywhere.
    Busy,
}

/// One submit of `body` to the gateway at `base` with an idempotency key, as a client that
/// retries makes it. Refusing a valid job for any other reason (4xx) fails the test.
pub async fn try_submit(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    idempotency: &str,
    body: &Value,
) -> Submitted {
    let sent = http
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(key)
        .header("idempotency-key", idempotency)
        .json(body)
        .send()
        .await;
    let Ok(resp) = sent else {
        return Submitted::Unavailable;
    };
    let status = resp.status();
    if status.is_success() {
        let job: Option<Value> = resp.json().await.ok();
        return match job.and_then(|j| j["id"].as_str()?.parse().ok()) {
            Some(id) => Submitted::Accepted(id),
            None => Submitted::Unavailable,
        };
    }
    if !status.is_client_error() {
        return Submitted::Unavailable;
    }
    let text = resp.text().await.unwrap_or_default();
    if status == StatusCode::TOO_MANY_REQUESTS || text.contains("/problems/quota-exceeded") {
        return Submitted::Busy;
    }
    panic!("a valid job was refused: {text}");
}
