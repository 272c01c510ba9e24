//! `xpand up`, the command `make run` calls, run as a user would: it creates its database,
//! starts the gateway and a worker process, writes a funded dev key, restarts a worker that is
//! killed, refuses a second instance, and stops cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::{Connection, PgConnection};

use crate::common::{
    clear_retained, delete_redis_prefix, forecast_job, pg_server, redis_url, MQTT_HOST, MQTT_PORT,
};

#[tokio::test]
async fn xpand_up_runs_a_whole_local_network() {
    let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let db_name = format!("xpand_t_{secs}_{tag}");
    let state_dir = std::env::temp_dir().join(format!("xpand-up-{tag}"));
    std::fs::create_dir_all(&state_dir).unwrap();
    let up = || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_xpand"));
        command
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args([
                "up",
                "--workers",
                "1",
                "--listen",
                "127.0.0.1:0",
                "--state-dir",
            ])
            .arg(&state_dir)
            .env("DATABASE_URL", format!("{}/{db_name}", pg_server()))
            .env("REDIS_URL", redis_url())
            .env("MQTT_URL", format!("mqtt://{MQTT_HOST}:{MQTT_PORT}"))
            .env("XPAND_TOPIC_PREFIX", format!("xpand-test/up-{tag}"))
            .env("XPAND_REDIS_PREFIX", format!("xpand-test:up-{tag}"))
            .env("XPAND_GATEWAY_KEY_FILE", state_dir.join("gateway.key"))
            .env("RUST_LOG", "info");
        command
    };
    let mut child = Running(Some(
        up().stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("xpand runs"),
    ));
    let pid = child.id();

    // The banner names the address; read it off stdout, and keep draining stdout after it (a
    // closed pipe would make the process's next print fail).
    let stdout = child.0.as_mut().unwrap().stdout.take().unwrap();
    let (address_tx, address_rx) = tokio::sync::oneshot::channel();
    let printed = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let transcript = printed.clone();
    std::thread::spawn(move || {
        let mut address_tx = Some(address_tx);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            transcript.lock().unwrap().push_str(&line);
            transcript.lock().unwrap().push('\n');
            if let Some(rest) = line.strip_prefix("xpand is up at ") {
                let base = rest.split_whitespace().next().unwrap().to_string();
                if let Some(tx) = address_tx.take() {
                    let _ = tx.send(base);
                }
            }
        }
    });
    let base = tokio::time::timeout(Duration::from_secs(60), address_rx)
        .await
        .expect("xpand up prints its address within 60 s")
        .expect("xpand up prints its address");
    let key = std::fs::read_to_string(state_dir.join("dev-api-key")).unwrap();
    let http = reqwest::Client::new();
    run_a_job(&http, &base, &key).await;

    // A second instance on the same state directory says who runs instead of starting.
    let second = up().output().unwrap();
    assert!(!second.status.success());
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(
        said.contains("already running") && said.contains(&format!("PID {pid}")),
        "{said}"
    );

    // kill -9 of the worker: it is reaped and started again, and its node works again.
    let key_file = state_dir.join("worker-0.key");
    let [first] = worker_pids(&key_file)[..] else {
        panic!("one worker process expected");
    };
    let killed_at = Instant::now();
    assert!(Command::new("kill")
        .args(["-KILL", &first.to_string()])
        .status()
        .unwrap()
        .success());
    let restarted = loop {
        match worker_pids(&key_file)[..] {
            [pid] if pid != first => break pid,
            _ => {}
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "the worker was not restarted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "local worker restarted as PID {restarted} {:?} after kill -9",
        killed_at.elapsed()
    );
    // Submitted while the new process is still starting: the gateway believes the node alive
    // and may assign to it; the new process's announce hands those shards back at once.
    let resumed = Instant::now();
    run_a_job(&http, &base, &key).await;
    eprintln!(
        "a job submitted at the restart finished in {:?}",
        resumed.elapsed()
    );
    let logged = printed.lock().unwrap().clone();
    assert!(
        logged.contains("local worker exited; restarting it"),
        "{logged}"
    );

    let stopping = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut stopped = child.0.take().unwrap();
    let exit = tokio::task::spawn_blocking(move || stopped.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "xpand up stops cleanly: {exit}");
    eprintln!("xpand up stopped {:?} after SIGTERM", stopping.elapsed());
    // Liveness, not speed: with nothing in flight it must not hang on its workers.
    assert!(stopping.elapsed() < Duration::from_secs(20));
    assert!(
        worker_pids(&key_file).is_empty(),
        "no worker outlives xpand up"
    );

    // Leave nothing behind: the worker's retained announce, the database, the state directory.
    let worker = xpand_protocol::NodeKey::read_file(&state_dir.join("worker-0.key")).unwrap();
    clear_retained(&format!("xpand-test/up-{tag}"), &[worker.id().to_string()]).await;
    delete_redis_prefix(&format!("xpand-test:up-{tag}")).await;
    let mut conn = PgConnection::connect(&format!("{}/postgres", pg_server()))
        .await
        .unwrap();
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"))
        .execute(&mut conn)
        .await
        .unwrap();
    std::fs::remove_dir_all(&state_dir).unwrap();
}

/// `xpand up` as the test runs it: killed (its workers get SIGTERM from the kernel) if the test
/// fails before stopping it.
struct Running(Option<std::process::Child>);

impl Running {
    fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, |c| c.id())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The PIDs of processes running with `key_file` as their node key.
fn worker_pids(key_file: &std::path::Path) -> Vec<u32> {
    let out = Command::new("pgrep")
        .arg("-f")
        .arg(format!("key-file {}", key_file.display()))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

/// Submits a small forecast and waits for its result.
async fn run_a_job(http: &reqwest::Client, base: &str, key: &str) {
    let resp = http
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(key)
        .json(&forecast_job(12, 6))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 201, "{text}");
    let job: Value = serde_json::from_str(&text).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job: Value = http
            .get(format!("{base}/v1/jobs/{}", job["id"].as_str().unwrap()))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if job["status"] == "succeeded" {
            assert_eq!(job["output"]["forecasts"].as_array().unwrap().len(), 12);
            return;
        }
        assert!(Instant::now() < deadline, "the job never finished: {job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
