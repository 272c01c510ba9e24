//! The Python SDK (`clients/python/`) run as its users run it: its pytest suite, in the venv
//! `scripts/setup-python-sdk.sh` makes, against a real gateway. The gateway starts with no
//! worker, so that the suite's first tests (a job streamed and canceled, sync and async) act on
//! jobs that can only wait; a worker (forecast and face models) joins once they have canceled
//! them. A short clip with a face is made here for `anonymize`.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use xpand_media::clips::make_clip;

use crate::common::TestApp;

/// Jobs the suite's `before_worker` tests cancel while no worker can take them.
const CANCELED_BEFORE_WORKER: i64 = 2;
/// The longest the worker waits for them (a suite that fails early must still end).
const WORKER_DEADLINE: Duration = Duration::from_secs(20);
/// The tests in `clients/python/tests/`.
const PYTEST_PASSED: &str = "26 passed";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_submits_streams_retries_and_anonymizes() {
    let mut app = TestApp::spawn_with(|c| c.forecast_rows_per_shard = 8).await;
    let (_, key) = app.customer(100_000_000).await;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/python");
    let python = Path::new(dir).join(".venv/bin/python");
    assert!(
        python.is_file(),
        "clients/python has no .venv: run scripts/setup-python-sdk.sh (make test does)"
    );
    let clips = tempfile::tempdir().unwrap();
    let clip = make_clip(clips.path(), 320, 240, 2, false);
    let pytest = tokio::process::Command::new(python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"])
        .current_dir(dir)
        .env("XPAND_URL", &app.base)
        .env("XPAND_API_KEY", &key)
        .env("XPAND_TEST_CLIP", &clip)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the venv's python runs");
    let start = Instant::now();
    while canceled_jobs(&app).await < CANCELED_BEFORE_WORKER && start.elapsed() < WORKER_DEADLINE {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.start_worker().await;
    let out = tokio::time::timeout(Duration::from_secs(120), pytest.wait_with_output())
        .await
        .expect("the SDK's tests end within two minutes")
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the SDK's tests failed:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains(PYTEST_PASSED), "{report}");
    eprintln!("pytest: {}", report.lines().last().unwrap_or_default());
    app.assert_ledger_invariants().await;
    app.teardown().await;
}

async fn canceled_jobs(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status::text = 'canceled'")
        .fetch_one(&app.db)
        .await
        .unwrap()
}
