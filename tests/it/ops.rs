//! Operations endpoints and the OpenAPI contract.

use std::time::Duration;

use serde_json::Value;

use crate::common::{free_port, CuttableProxy, PrivateBroker, TestApp};
use xpand_worker::BrokerLink;

#[tokio::test]
async fn served_openapi_matches_the_committed_spec() {
    let app = TestApp::spawn().await;
    let served: Value = app.get_public("/openapi.json").await.json().await.unwrap();
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json"))
            .expect("openapi/openapi.json exists");
    let committed: Value = serde_json::from_str(&committed).expect("openapi/openapi.json is JSON");
    assert!(
        served == committed,
        "openapi/openapi.json is stale: run `cargo run -q -- openapi > openapi/openapi.json`"
    );
    for path in [
        "/v1/jobs",
        "/v1/jobs/{id}/events",
        "/v1/ws",
        "/v1/auth/token",
        "/v1/account/ledger",
    ] {
        assert!(served["paths"].get(path).is_some(), "{path} is documented");
    }
    let docs = app.get_public("/docs").await;
    assert_eq!(docs.status(), 200);
    let html = docs.text().await.unwrap();
    assert!(html.contains("/openapi.json"));
    assert!(
        !html.contains("https://"),
        "the docs page loads nothing from elsewhere"
    );
    app.teardown().await;
}

/// The pages run only their own inline script and style, talk only to this origin, and cannot
/// be framed. (That they still work under the policy: scripts/check-docs-page.sh and the
/// browser test in video.rs.)
#[tokio::test]
async fn pages_carry_a_content_security_policy_and_refuse_frames() {
    use base64::Engine as _;
    use sha2::{Digest, Sha256};
    let app = TestApp::spawn().await;
    for path in ["/docs", "/anonymize"] {
        let resp = app.get_public(path).await;
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.headers()["x-frame-options"], "DENY", "{path}");
        let policy = resp.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_string();
        let html = resp.text().await.unwrap();
        let directive = |name: &str| {
            policy
                .split(';')
                .map(str::trim)
                .find_map(|d| d.strip_prefix(name)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("{path}: no {name} in {policy}"))
                .to_string()
        };
        assert_eq!(directive("default-src"), "'self'", "{path}");
        assert_eq!(directive("frame-ancestors"), "'none'", "{path}");
        assert!(!policy.contains("unsafe"), "{path}: {policy}");
        // The page's one inline script and one stylesheet are allowed by their hash alone.
        for (tag, name) in [("script", "script-src"), ("style", "style-src")] {
            let body = html
                .split_once(&format!("<{tag}>"))
                .and_then(|(_, rest)| rest.split_once(&format!("</{tag}>")))
                .unwrap_or_else(|| panic!("{path} has an inline {tag}"))
                .0;
            let hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body));
            assert_eq!(directive(name), format!("'sha256-{hash}'"), "{path}");
        }
    }
    // Other responses are not pages: no policy to keep in step with them.
    let resp = app.get_public("/healthz").await;
    assert!(resp.headers().get("content-security-policy").is_none());
    app.teardown().await;
}

/// The docs page renders in headless Chromium as the gateway serves it, under its policy:
/// every operation and schema shows and nothing is blocked (scripts/check-docs-page.sh).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docs_page_renders_under_its_content_security_policy() {
    let app = TestApp::spawn().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check-docs-page.sh");
    let base = app.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(script)
            .env("XPAND_URL", base)
            .output()
            .expect("the check runs")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "docs page check failed (chromium missing? run scripts/setup-browser.sh):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    app.teardown().await;
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let app = TestApp::spawn().await;
    let health = app.get_public("/healthz").await;
    assert_eq!(health.status(), 200);
    // The broker connection comes up asynchronously.
    let mut ready = Value::Null;
    for _ in 0..100 {
        let resp = app
            .http
            .get(format!("{}/readyz", app.base))
            .send()
            .await
            .unwrap();
        ready = resp.json().await.unwrap();
        if ready["broker"] == true {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        ready,
        serde_json::json!({"postgres": true, "redis": true, "broker": true})
    );

    let (_, key) = app.customer(10_000_000).await;
    app.post_json(&key, "/v1/jobs", &crate::common::forecast_job(8, 2))
        .await;
    let metrics = app.metrics().await;
    // Whole lines: "… 1" must not pass for "… 10".
    let series: Vec<&str> = metrics.lines().collect();
    assert!(
        series.contains(&"xpand_jobs{status=\"queued\"} 1"),
        "{metrics}"
    );
    assert!(
        series.contains(
            &"xpand_http_requests_total{method=\"POST\",route=\"/v1/jobs\",status=\"201\"} 1"
        ),
        "{metrics}"
    );
    // The sealer runs hourly here, so every entry (the deposit's and the escrow hold's) is
    // still unsealed, and the gauge says how many.
    let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_entries")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(entries >= 4, "a deposit and a hold post two entries each");
    let unsealed = format!("xpand_ledger_unsealed_entries {entries}");
    assert!(series.contains(&unsealed.as_str()), "{metrics}");
    app.teardown().await;
}

/// A gateway session that stops talking inside a transaction (a network partition, a frozen
/// process) is ended by Postgres after a few seconds, so its row locks stop blocking the other
/// replicas. Found by tests/it/network.rs: such a lock on a customer's balance held every
/// replica's submits for that customer until the partition healed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_a_gateway_left_open_gives_up_its_locks() {
    use sqlx::Connection as _;
    let app = TestApp::spawn().await;
    let (account, _) = app.customer(1_000).await;
    // The gateway's own pool, as the partitioned replica held it.
    let mut stuck = app.db.begin().await.unwrap();
    sqlx::query("SELECT id FROM accounts WHERE id = $1 FOR UPDATE")
        .bind(account)
        .execute(&mut *stuck)
        .await
        .unwrap();
    // Another replica's statement on the same row gets through once the session is ended, well
    // within its own 30 s budget; before, it waited for the partition to heal.
    let mut other = sqlx::PgConnection::connect_with(&app.db.connect_options())
        .await
        .unwrap();
    sqlx::query("SET statement_timeout = '30s'")
        .execute(&mut other)
        .await
        .unwrap();
    sqlx::query("UPDATE accounts SET name = name WHERE id = $1")
        .bind(account)
        .execute(&mut other)
        .await
        .expect("the lock was released");
    // The stuck transaction is gone with its session: nothing it did can commit.
    let after = sqlx::query("SELECT 1").execute(&mut *stuck).await;
    assert!(after.is_err(), "the idle transaction's session was ended");
    drop(stuck);
    other.close().await.unwrap();
    app.teardown().await;
}

/// While Postgres is unreachable, requests get 503 problems (retry later), nothing is
/// half-written, and the gateway recovers on its own when the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_postgres_is_down_requests_get_503_and_nothing_is_half_written() {
    let proxy = CuttableProxy::start("127.0.0.1:5432").await;
    let port = proxy.port;
    let mut app = TestApp::spawn_with(|c| {
        c.database_url = c.database_url.replace(":5432/", &format!(":{port}/"));
    })
    .await;
    app.start_worker().await;
    let (_, key) = app.customer(50_000_000).await;
    let before = app.balances(&key).await;

    proxy.set_cut(true);
    let resp = app
        .post_json(&key, "/v1/jobs", &crate::common::forecast_job(16, 4))
        .await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let problem: Value = resp.json().await.unwrap();
    assert_eq!(
        problem["type"], "https://xpand.dev/problems/unavailable",
        "{problem}"
    );
    assert_eq!(app.get(&key, "/v1/account").await.status(), 503);
    assert_eq!(app.get(&key, "/readyz").await.status(), 503);

    proxy.set_cut(false);
    tokio::time::timeout(Duration::from_secs(30), async {
        while !app.get(&key, "/readyz").await.status().is_success() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the gateway recovers when the database is back");
    assert_eq!(
        app.balances(&key).await,
        before,
        "the refused submit moved nothing"
    );
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(jobs, 0, "no half-made job");
    let job: Value = app
        .post_json(&key, "/v1/jobs", &crate::common::forecast_job(16, 4))
        .await
        .json()
        .await
        .unwrap();
    let job = app.wait_for_job(&key, job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "succeeded");
    app.teardown().await;
}

/// While Redis is unreachable nothing is dispatched (liveness lives there) and readiness says
/// so; when it is back, the queued job runs and its events flow again over SSE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_delays_work_and_loses_nothing() {
    use futures::StreamExt;
    let proxy = CuttableProxy::start("127.0.0.1:6379").await;
    let port = proxy.port;
    let mut app = TestApp::spawn_with(|c| c.redis_url = format!("redis://127.0.0.1:{port}")).await;
    app.start_worker().await;
    let (_, key) = app.customer(50_000_000).await;

    proxy.set_cut(true);
    let job: Value = app
        .post_json(&key, "/v1/jobs", &crate::common::forecast_job(16, 4))
        .await
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(app.get(&key, "/readyz").await.status(), 503);
    let waiting = app.get_json(&key, &format!("/v1/jobs/{id}")).await;
    assert_eq!(waiting["status"], "queued", "nothing is dispatched blind");

    proxy.set_cut(false);
    let job = tokio::time::timeout(Duration::from_secs(60), app.wait_for_job(&key, &id))
        .await
        .expect("the job runs once Redis is back");
    assert_eq!(job["status"], "succeeded", "{job}");

    // The event subscription reconnects with back-off (at most 5 s apart); after that a new
    // job's events arrive over SSE again. (Events published while it was down are not replayed:
    // a client that missed them reads the job.)
    tokio::time::sleep(Duration::from_secs(5)).await;
    let job: Value = app
        .post_json(&key, "/v1/jobs", &crate::common::forecast_job(16, 4))
        .await
        .json()
        .await
        .unwrap();
    let resp = app
        .get(
            &key,
            &format!("/v1/jobs/{}/events", job["id"].as_str().unwrap()),
        )
        .await;
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, body.next()).await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        if text.contains("\"event\":\"succeeded\"") {
            break;
        }
    }
    assert!(text.contains("\"event\":\"succeeded\""), "{text}");
    app.assert_ledger_invariants().await;
    app.teardown().await;
}

/// Polls `/readyz` until its status is `ready`, or fails naming `what`.
async fn wait_ready(app: &TestApp, key: &str, ready: bool, what: &str) -> Value {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let resp = app.get(key, "/readyz").await;
            if resp.status().is_success() == ready {
                return resp.json().await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}"))
}

/// While the MQTT broker is down, readiness says so and a submitted job waits instead of failing
/// or being charged; once the broker is back the gateway and the worker reconnect and the job
/// runs, paid once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_outage_delays_work_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let broker = PrivateBroker::start(dir.path(), port).await;
    let mut app = TestApp::spawn_with(|c| c.mqtt = BrokerLink::loopback(port)).await;
    app.start_worker().await;
    let (_, key) = app.customer(50_000_000).await;
    let job: Value = app
        .post_json(&key, "/v1/jobs", &crate::common::forecast_job(16, 4))
        .await
        .json()
        .await
        .unwrap();
    let job = app.wait_for_job(&key, job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "succeeded", "{job}");

    drop(broker);
    let readiness = wait_ready(&app, &key, false, "readyz stayed 200 with the broker down").await;
    assert_eq!(readiness["broker"], false, "{readiness}");
    let (available, _) = app.balances(&key).await;
    let job: Value = app
        .post_json(&key, "/v1/jobs", &crate::common::forecast_job(16, 4))
        .await
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    let quote = job["quote"].as_i64().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let waiting = app.get_json(&key, &format!("/v1/jobs/{id}")).await;
    assert!(
        ["queued", "running"].contains(&waiting["status"].as_str().unwrap()),
        "the job must wait for the broker: {waiting}"
    );
    assert_eq!(
        app.balances(&key).await,
        (available - quote, quote),
        "held, not charged"
    );

    let _broker = PrivateBroker::start(dir.path(), port).await;
    let back = std::time::Instant::now();
    wait_ready(&app, &key, true, "readyz stayed 503 with the broker back").await;
    let ready_after = back.elapsed();
    let job = tokio::time::timeout(Duration::from_secs(60), app.wait_for_job(&key, &id))
        .await
        .expect("the job runs once the broker is back");
    assert_eq!(job["status"], "succeeded", "{job}");
    eprintln!(
        "broker back: ready after {ready_after:?}, the waiting job done after {:?}",
        back.elapsed()
    );
    assert_eq!(
        app.balances(&key).await,
        (available - quote, 0),
        "charged the quote once"
    );
    crate::common::assert_every_job_settled(&app.db).await;
    app.assert_ledger_invariants().await;
    app.teardown().await;
}
