//! The spec against the gateway: schemathesis (from PyPI, `scripts/setup-schemathesis.sh`)
//! generates requests for every operation of the document the gateway serves, authenticated as
//! a customer, and runs every check: no server error, every status, header and body as
//! documented, what the schema allows accepted and what it forbids refused, and the stateful
//! links. The checks turned off for one operation each, and the generator's settings, are in
//! `schemathesis.toml` with the reason. Bounded: a fixed seed, a fixed number of examples per
//! operation, and a wall-clock limit.

use std::time::Duration;

use crate::common::TestApp;

/// Wall-clock bound on the whole run.
const LIMIT: Duration = Duration::from_secs(300);

fn schemathesis() -> std::path::PathBuf {
    let venv = std::env::var("XPAND_SCHEMATHESIS_VENV").unwrap_or_else(|_| {
        format!(
            "{}/.cache/xpand/schemathesis-venv",
            std::env::var("HOME").unwrap()
        )
    });
    std::path::Path::new(&venv).join("bin/schemathesis")
}

#[tokio::test]
async fn the_gateway_answers_every_generated_request_as_documented() {
    let bin = schemathesis();
    assert!(
        bin.exists(),
        "{} is missing: run scripts/setup-schemathesis.sh (make test does)",
        bin.display()
    );
    let mut app = TestApp::spawn().await;
    app.start_worker().await;
    let (_, key) = app.customer(1_000_000_000).await;
    let report = std::env::temp_dir().join(format!("xpand-schemathesis-{}", app.db_name));
    std::fs::create_dir_all(&report).unwrap();
    let run = tokio::process::Command::new(&bin)
        .arg("--config-file")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/it/schemathesis.toml"
        ))
        .arg("run")
        .arg(format!("{}/openapi.json", app.base))
        .args(["--header", &format!("Authorization: Bearer {key}")])
        .args(["--max-examples", "25", "--seed", "20261202"])
        .args(["--request-timeout", "10", "--generation-database", "none"])
        // Streams never end on their own, and a worker's segment upload is a video body no
        // generator can write; each is covered by its own tests.
        .args([
            "--exclude-path",
            "/v1/ws",
            "--exclude-path",
            "/v1/jobs/{id}/events",
        ])
        .args(["--exclude-path", "/v1/transfers/{assignment}/output"])
        .arg("--report-dir")
        .arg(&report)
        // Its cache of crashes (`.schemathesis/`) goes where the report goes, not into the repo.
        .current_dir(&report)
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(LIMIT, run)
        .await
        .expect("schemathesis ran past its limit")
        .expect("schemathesis starts");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let _ = std::fs::remove_dir_all(&report);
    // The totals, for `--no-capture` (docs/testing.md records them).
    println!("{text}");
    assert!(
        output.status.success(),
        "schemathesis found the gateway and its document disagreeing:\n{text}"
    );
    app.assert_ledger_invariants().await;
    app.teardown().await;
}
