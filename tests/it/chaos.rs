//! Chaos, with real processes on their own Mosquitto and a stream of forecast jobs, in two
//! topologies:
//! - comfortable: two `xpand serve` replicas and three `xpand-worker`s, `kill -9` of workers and
//!   gateways at random (each restarted a moment later) plus one broker restart;
//! - minimal, what a new user runs first: one gateway and two workers with redundancy sampling
//!   on, one worker killed for good a third of the way in.
//!
//! Afterwards every job has ended, each failed or canceled one was refunded in full, no shard
//! was paid twice, the ledger's invariants hold and `xpand verify` passes on the sealed chain.
//!
//! The window is `XPAND_CHAOS_SECS` (default 25 s); the figures it prints (jobs, kills,
//! re-queue delay after a worker died) are the ones in docs/performance.md.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rand::seq::SliceRandom;
use rand::Rng;
use sqlx::PgPool;
use uuid::Uuid;
use xpand_protocol::NodeKey;

use crate::common::{
    assert_all_succeeded, assert_every_job_settled, assert_ledger_invariants, assert_verifies,
    create_database, delete_redis_prefix, forecast_job, free_port, pg_server, redis_url,
    try_submit, wait_until_ready, Leftovers, Process, Submitted,
};

/// What the processes share.
struct Cluster {
    dir: PathBuf,
    db_url: String,
    mqtt_port: u16,
    prefix: String,
    gateway_key: NodeKey,
    redundancy_bps: u32,
}

/// The shape of one chaos run.
struct Topology {
    gateways: usize,
    workers: usize,
    /// Share of results checked by a second node, in basis points.
    redundancy_bps: u32,
    /// Kill one worker once, a third of the way in, and never restart it; nothing else dies.
    one_worker_killed_for_good: bool,
    /// Clients submitting jobs back to back.
    submitters: usize,
}

impl Cluster {
    fn broker(&self) -> Process {
        let conf = self.dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n",
                self.mqtt_port
            ),
        )
        .unwrap();
        Process(
            Command::new("mosquitto")
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("mosquitto runs"),
        )
    }

    fn gateway(&self, port: u16) -> Process {
        let child = Command::new(env!("CARGO_BIN_EXE_xpand"))
            .arg("serve")
            .env("XPAND_LISTEN", format!("127.0.0.1:{port}"))
            .env("DATABASE_URL", &self.db_url)
            .env("REDIS_URL", redis_url())
            .env("MQTT_URL", format!("mqtt://127.0.0.1:{}", self.mqtt_port))
            .env("XPAND_TOPIC_PREFIX", &self.prefix)
            .env("XPAND_REDIS_PREFIX", &self.prefix)
            .env("XPAND_GATEWAY_KEY_FILE", self.dir.join("gateway.key"))
            .env("XPAND_FILES_DIR", self.dir.join("files"))
            .env("XPAND_SCRATCH_DIR", self.dir.join("scratch"))
            .env("XPAND_LEASE_SECS", "2")
            .env("XPAND_NODE_TTL_SECS", "3")
            .env("XPAND_SEAL_INTERVAL_SECS", "2")
            .env("XPAND_JOB_TIMEOUT_SECS", "300")
            .env("XPAND_MAX_SHARD_ATTEMPTS", "20")
            .env("XPAND_VERIFY_NEW_NODE_SHARDS", "0")
            .env("XPAND_REDUNDANCY_BPS", self.redundancy_bps.to_string())
            .env("XPAND_VERIFY_WAIT_SECS", "5")
            .env("XPAND_DB_POOL", "6")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("xpand serve runs");
        Process(child)
    }

    fn worker(&self, key_file: &Path) -> Process {
        let exe = Path::new(env!("CARGO_BIN_EXE_xpand")).with_file_name("xpand-worker");
        let child = Command::new(exe)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .arg("--key-file")
            .arg(key_file)
            .args(["--gateway-key", self.gateway_key.id()])
            .args(["--max-concurrent-shards", "2", "--inference-threads", "1"])
            .args(["--heartbeat-ms", "500"])
            .env(
                "XPAND_MQTT_URL",
                format!("mqtt://127.0.0.1:{}", self.mqtt_port),
            )
            .env("XPAND_TOPIC_PREFIX", &self.prefix)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("xpand-worker runs (cargo builds it with the workspace)");
        Process(child)
    }
}

/// Submits forecast jobs until `stop`, each to a random live gateway, retrying another with the
/// same idempotency key when a gateway dies under the request. Returns the job ids.
async fn submitter(gateways: Vec<String>, key: String, stop: Arc<AtomicBool>) -> Vec<Uuid> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut jobs = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let idempotency = Uuid::new_v4().to_string();
        let body = forecast_job(24, 6);
        for attempt in 0.. {
            let base = gateways.choose(&mut rand::thread_rng()).unwrap();
            if let Submitted::Accepted(id) =
                try_submit(&http, base, &key, &idempotency, &body).await
            {
                jobs.push(id);
                break;
            }
            assert!(attempt < 100, "no gateway took the job for 100 tries");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    jobs
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_survive_kill_9_of_workers_and_gateways_and_a_broker_restart() {
    run(Topology {
        gateways: 2,
        workers: 3,
        redundancy_bps: 500,
        one_worker_killed_for_good: false,
        submitters: 3,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_gateway_two_workers_survive_one_worker_dying_for_good() {
    run(Topology {
        gateways: 1,
        workers: 2,
        redundancy_bps: 2_000,
        one_worker_killed_for_good: true,
        // One worker is left to drain what was submitted: one client keeps the backlog short.
        submitters: 1,
    })
    .await;
}

async fn run(topology: Topology) {
    let window = Duration::from_secs(
        std::env::var("XPAND_CHAOS_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(25),
    );
    let db_name = create_database().await;
    let dir = tempfile::tempdir().unwrap();
    let tag = &Uuid::new_v4().simple().to_string()[..12];
    let gateway_key = NodeKey::create_file(&dir.path().join("gateway.key")).unwrap();
    let cluster = Cluster {
        dir: dir.path().to_path_buf(),
        db_url: format!("{}/{db_name}", pg_server()),
        mqtt_port: free_port(),
        prefix: format!("xpand-chaos-{tag}"),
        gateway_key,
        redundancy_bps: topology.redundancy_bps,
    };
    // Declared before the processes, so on a panic they are killed before it drops the database.
    let mut leftovers = Leftovers::new(&db_name, &cluster.prefix, Vec::new());
    let mut broker = cluster.broker();
    let ports: Vec<u16> = (0..topology.gateways).map(|_| free_port()).collect();
    let mut gateways: Vec<Process> = ports.iter().map(|p| cluster.gateway(*p)).collect();
    let bases: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    for base in &bases {
        wait_until_ready(base, Duration::from_secs(60), String::new).await;
    }
    let db = PgPool::connect(&cluster.db_url).await.unwrap();
    let mut key_files = Vec::new();
    let mut workers = Vec::new();
    for i in 0..topology.workers {
        let path = dir.path().join(format!("node-{i}.key"));
        let key = NodeKey::create_file(&path).unwrap();
        xpand::nodes::register(&db, key.id(), &format!("chaos-{i}"))
            .await
            .unwrap();
        workers.push(cluster.worker(&path));
        key_files.push((path, key.id().to_string()));
    }
    let (_, api_key) = xpand::accounts::create_customer(&db, "chaos", 1_000_000_000)
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let submitters: Vec<_> = (0..topology.submitters)
        .map(|_| tokio::spawn(submitter(bases.clone(), api_key.clone(), stop.clone())))
        .collect();

    // kill -9 something every 1.5–3 s; the broker once, half way. Or, in the minimal topology,
    // one worker for good.
    let mut kills: Vec<(String, DateTime<Utc>)> = Vec::new();
    let (mut worker_kills, mut gateway_kills, mut broker_restarted) = (0, 0, false);
    // When a node or the broker went down: what may leave a result with nobody to check it.
    let mut disruptions: Vec<DateTime<Utc>> = Vec::new();
    let started = Instant::now();
    if topology.one_worker_killed_for_good {
        tokio::time::sleep(window / 3).await;
        workers[1].kill();
        kills.push((key_files[1].1.clone(), Utc::now()));
        disruptions.push(Utc::now());
        worker_kills += 1;
        tokio::time::sleep(window.saturating_sub(started.elapsed())).await;
    }
    while !topology.one_worker_killed_for_good && started.elapsed() < window {
        let pause = rand::thread_rng().gen_range(1500..3000);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        if !broker_restarted && started.elapsed() > window / 2 {
            broker.kill();
            disruptions.push(Utc::now());
            tokio::time::sleep(Duration::from_millis(1000)).await;
            broker = cluster.broker();
            broker_restarted = true;
        } else if rand::thread_rng().gen_bool(0.65) {
            let i = rand::thread_rng().gen_range(0..workers.len());
            workers[i].kill();
            kills.push((key_files[i].1.clone(), Utc::now()));
            disruptions.push(Utc::now());
            worker_kills += 1;
            tokio::time::sleep(Duration::from_millis(800)).await;
            workers[i] = cluster.worker(&key_files[i].0);
        } else {
            let i = rand::thread_rng().gen_range(0..gateways.len());
            gateways[i].kill();
            gateway_kills += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
            gateways[i] = cluster.gateway(ports[i]);
        }
    }
    stop.store(true, Ordering::Relaxed);
    // The chaos the run is about did happen.
    assert!(worker_kills >= 1, "no worker was killed");
    if !topology.one_worker_killed_for_good {
        assert!(broker_restarted, "the broker was not restarted");
        assert!(
            worker_kills + gateway_kills >= 3,
            "only {worker_kills} worker and {gateway_kills} gateway kills"
        );
    }
    let mut job_ids = Vec::new();
    for s in submitters {
        job_ids.extend(s.await.unwrap());
    }
    assert!(job_ids.len() >= 20, "only {} jobs ran", job_ids.len());

    // Every job ends and succeeds: each shard has 20 attempts and 300 s, and kills cost a
    // shard one attempt at most. A run where jobs fail (at cost 0, which the money checks below
    // accept) is a broken one. Idempotency keys made retried submissions one job each.
    assert_all_succeeded(&db, &job_ids, Duration::from_secs(120), "after the chaos").await;
    let mut distinct = job_ids.clone();
    distinct.sort();
    distinct.dedup();

    assert_every_job_settled(&db).await;
    assert_ledger_invariants(&db).await;

    // The sealed chain verifies through the public API.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_verifies(&bases[0]).await;

    // How long a dead worker's shards waited: from the kill to their re-queue (the restarted
    // process's announce, the lapse of its heartbeats, or its lease).
    let mut redispatch = Vec::new();
    for (node, killed_at) in &kills {
        let lapsed: Vec<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT at FROM node_failures WHERE node_id = $1
               AND reason IN ('lease_lapsed', 'node_lost')
               AND at > $2 AND at < $2 + interval '10 seconds'",
        )
        .bind(node)
        .bind(killed_at)
        .fetch_all(&db)
        .await
        .unwrap();
        redispatch.extend(
            lapsed
                .iter()
                .map(|at| (*at - *killed_at).num_milliseconds() as f64 / 1000.0),
        );
    }
    redispatch.sort_by(f64::total_cmp);
    // Redundancy sampling ran: replicas were dispatched and answered.
    let replicas_done: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM shards WHERE replica_of IS NOT NULL AND status = 'done'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert!(replicas_done > 0, "no replica ran");
    // A held result is accepted unchecked only when nobody could check it: in the minimal
    // topology after its checker died for good, in the comfortable one around a kill or the
    // broker's restart (all nodes briefly unreachable). Never while every node was up.
    let unverified: Vec<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT completed_at FROM shards WHERE unverified ORDER BY completed_at",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    let slack = chrono::Duration::seconds(10);
    let explained = |at: &DateTime<Utc>| {
        disruptions.iter().any(|d| {
            *at > *d - slack && (topology.one_worker_killed_for_good || *at < *d + slack * 2)
        })
    };
    let unexplained: Vec<&DateTime<Utc>> = unverified.iter().filter(|at| !explained(at)).collect();
    assert!(
        unexplained.is_empty(),
        "results accepted unverified while their checkers were up (disruptions at \
         {disruptions:?}): {unexplained:?}"
    );
    let unverified = unverified.len();
    eprintln!(
        "chaos ({} gateways, {} workers, redundancy {} bps): {} s, {} jobs, all succeeded, \
         {worker_kills} worker and {gateway_kills} gateway kill -9s, broker restarted: \
         {broker_restarted}, {unverified} shards accepted unverified; shards re-queued after a \
         worker died: {} (p50 {:.2} s, p99 {:.2} s after the kill)",
        topology.gateways,
        topology.workers,
        topology.redundancy_bps,
        window.as_secs(),
        distinct.len(),
        redispatch.len(),
        if redispatch.is_empty() {
            0.0
        } else {
            percentile(&redispatch, 0.5)
        },
        if redispatch.is_empty() {
            0.0
        } else {
            percentile(&redispatch, 0.99)
        },
    );

    for child in workers.iter_mut().chain(gateways.iter_mut()) {
        child.kill();
    }
    broker.kill();
    db.close().await;
    delete_redis_prefix(&cluster.prefix).await;
    let mut conn =
        <sqlx::PgConnection as sqlx::Connection>::connect(&format!("{}/postgres", pg_server()))
            .await
            .unwrap();
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"))
        .execute(&mut conn)
        .await;
    leftovers.disarm();
}
