//! A node that is registered gets work, whatever the order of registration, announce and the
//! gateway's start: the directory forgets "unknown" at registration, and a live node without a
//! stored capability statement is asked for one.

use std::time::Duration;

use serde_json::Value;
use xpand_protocol::NodeKey;

use crate::common::{forecast_job, TestApp};

async fn one_job_succeeds(app: &TestApp) {
    let (_, customer) = app.customer(50_000_000).await;
    let job: Value = app
        .post_json(&customer, "/v1/jobs", &forecast_job(16, 3))
        .await
        .json()
        .await
        .unwrap();
    let job = app
        .wait_for_job(&customer, job["id"].as_str().unwrap())
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
}

/// As an operator does it: `xpand admin register-node` on a running gateway, then the worker
/// at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_registered_on_a_running_gateway_gets_work_at_once() {
    let mut app = TestApp::spawn().await;
    let key = NodeKey::generate();
    xpand::nodes::register(&app.db, key.id(), "late")
        .await
        .unwrap();
    app.run_worker(key.clone()).await;
    app.wait_until_alive(key.id()).await;
    one_job_succeeds(&app).await;
    app.teardown().await;
}

/// The worker announces before anyone registered it (its statement is dropped and "unknown" is
/// cached), then is registered: it must still get work, through the registration notice and the
/// gateway asking a statement-less live node to announce again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_announced_before_its_registration_gets_work() {
    let mut app = TestApp::spawn().await;
    let key = NodeKey::generate();
    app.run_worker(key.clone()).await;
    tokio::time::timeout(Duration::from_secs(30), async {
        while app.rejected("unknown_node").await < 2 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the unregistered node's announce and heartbeat are dropped as unknown_node");
    let registered: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM nodes WHERE id = $1)")
        .bind(key.id())
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(!registered);
    xpand::nodes::register(&app.db, key.id(), "early")
        .await
        .unwrap();
    app.wait_until_alive(key.id()).await;
    one_job_succeeds(&app).await;
    app.teardown().await;
}
