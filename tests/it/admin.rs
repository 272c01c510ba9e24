//! `xpand admin`, run as an operator runs it (the binary, against the gateway's database) while
//! the gateway serves: accounts and deposits show through the API, refusals change nothing,
//! and a node registered there gets work while a node banned there is refused and gets none.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use uuid::Uuid;
use xpand_protocol::NodeKey;

use crate::common::{forecast_job, TestApp};

/// `xpand admin <args>` against the test's database.
fn admin(app: &TestApp, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xpand"))
        .args(["admin", "--database-url", &app.config.database_url])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("xpand runs")
}

/// Its stdout; the command must have succeeded.
fn succeeds(out: Output) -> String {
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "xpand admin failed: {stdout}{stderr}");
    stdout
}

/// Its stderr; the command must have failed.
fn fails(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "xpand admin succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_and_deposits_made_with_xpand_admin_show_through_the_api() {
    let app = TestApp::spawn().await;
    let created = succeeds(admin(
        &app,
        &["create-account", "--name", "ops", "--credit", "5000000"],
    ));
    let field = |name: &str| {
        created
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name:?} in {created:?}"))
            .trim()
            .to_string()
    };
    let (account, key) = (field("account "), field("api key "));
    assert_eq!(app.balances(&key).await, (5_000_000, 0));

    let deposited = succeeds(admin(&app, &["deposit", &account, "250"]));
    assert_eq!(deposited.trim(), "deposited 250; available 5000250");
    assert_eq!(app.balances(&key).await, (5_000_250, 0));

    // Refused, each naming what is wrong, and nothing moves.
    let accounts = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM accounts")
            .fetch_one(&app.db)
            .await
            .unwrap()
    };
    let before = accounts().await;
    let zero = fails(admin(&app, &["deposit", &account, "0"]));
    assert!(zero.contains("must be > 0"), "{zero}");
    let stranger = Uuid::new_v4().to_string();
    let unknown = fails(admin(&app, &["deposit", &stranger, "10"]));
    assert!(unknown.contains("no customer account"), "{unknown}");
    let negative = fails(admin(&app, &["create-account", "--credit=-5"]));
    assert!(negative.contains("--credit must be >= 0"), "{negative}");
    assert_eq!(app.balances(&key).await, (5_000_250, 0));
    assert_eq!(
        accounts().await,
        before,
        "a refused create-account made none"
    );
    app.assert_ledger_invariants().await;
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_banned_with_xpand_admin_is_refused_and_gets_no_work() {
    let mut app = TestApp::spawn().await;
    let key = NodeKey::generate();
    let node = key.id().to_string();
    let registered = succeeds(admin(
        &app,
        &["register-node", &node, "--name", "soon-banned"],
    ));
    assert!(
        registered.starts_with(&format!("node {node} registered")),
        "{registered}"
    );
    app.run_worker(key).await;
    app.wait_until_alive(&node).await;
    let (_, customer) = app.customer(50_000_000).await;
    let first: Value = app
        .post_json(&customer, "/v1/jobs", &forecast_job(4, 3))
        .await
        .json()
        .await
        .unwrap();
    let first = app
        .wait_for_job(&customer, first["id"].as_str().unwrap())
        .await;
    assert_eq!(first["status"], "succeeded", "{first}");

    let banned = succeeds(admin(&app, &["ban-node", &node]));
    assert_eq!(banned.trim(), format!("node {node} banned"));
    // Its heartbeats are dropped from now on...
    let before = app.rejected("banned_node").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.rejected("banned_node").await < before + 2 {
        assert!(
            Instant::now() < deadline,
            "the banned node's messages are still taken"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...and it gets no work: a job waits, with no shard sent to it.
    let second: Value = app
        .post_json(&customer, "/v1/jobs", &forecast_job(4, 3))
        .await
        .json()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let job = app
        .get_json(
            &customer,
            &format!("/v1/jobs/{}", second["id"].as_str().unwrap()),
        )
        .await;
    assert_eq!(job["status"], "queued", "{job}");
    let sent: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM shards WHERE job_id = $1::uuid AND node_id IS NOT NULL",
    )
    .bind(second["id"].as_str().unwrap())
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(sent, 0, "a shard went to the banned node");

    let missing = fails(admin(&app, &["ban-node", &"ab".repeat(32)]));
    assert!(missing.contains("no node"), "{missing}");
    app.teardown().await;
}
