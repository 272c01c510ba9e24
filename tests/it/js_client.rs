//! The JavaScript client (`clients/js/`) run as its users run it: Node's test runner against a
//! real gateway. The gateway starts with no worker so that the client's first tests (a cancel,
//! a socket dropped mid-job) act on jobs that can only wait; a worker joins a few seconds in.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::common::TestApp;

/// When the worker joins, after Node starts: time for the tests that need a waiting job.
const WORKER_DELAY: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_js_client_submits_streams_cancels_and_survives_a_dropped_socket() {
    let mut app = TestApp::spawn_with(|c| c.forecast_rows_per_shard = 8).await;
    let (_, key) = app.customer(100_000_000).await;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/js");
    assert!(
        Path::new(dir).join("node_modules").is_dir(),
        "clients/js has no node_modules: run scripts/setup-js-client.sh (make test does)"
    );
    let node = tokio::process::Command::new("node")
        .args([
            "--experimental-websocket",
            "--no-warnings",
            "--test",
            "--test-concurrency=1",
            "--test-force-exit",
            "test/",
        ])
        .current_dir(dir)
        .env("XPAND_URL", &app.base)
        .env("XPAND_API_KEY", &key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    tokio::time::sleep(WORKER_DELAY).await;
    app.start_worker().await;
    let out = tokio::time::timeout(Duration::from_secs(120), node.wait_with_output())
        .await
        .expect("the client's tests end within two minutes")
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the client's tests failed:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("# pass 7"), "{report}");
    app.assert_ledger_invariants().await;
    app.teardown().await;
}
