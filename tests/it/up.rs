//! `xpand up`, the command `make run` calls, run as a user would: it creates its database,
//! starts the gateway and a worker process, writes a funded dev key, and stops cleanly on SIGTERM.

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
    let mut child = Command::new(env!("CARGO_BIN_EXE_xpand"))
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
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("xpand runs");

    // The banner names the address; read it off stdout, and keep draining stdout after it (a
    // closed pipe would make the process's next print fail).
    let stdout = child.stdout.take().unwrap();
    let (address_tx, address_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut address_tx = Some(address_tx);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
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
    let resp = http
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(&key)
        .json(&forecast_job(12, 6))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 201, "{text}");
    let job: Value = serde_json::from_str(&text).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        let job: Value = http
            .get(format!("{base}/v1/jobs/{}", job["id"].as_str().unwrap()))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if job["status"] == "succeeded" {
            break job;
        }
        assert!(Instant::now() < deadline, "the job never finished: {job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done["output"]["forecasts"].as_array().unwrap().len(), 12);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "xpand up stops cleanly: {exit}");

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
