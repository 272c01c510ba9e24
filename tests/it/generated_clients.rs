//! Clients generated from the document a gateway serves, the way their users make them:
//! openapi-python-client, and openapi-typescript with openapi-fetch (installed by
//! `scripts/setup-generated-clients.sh`). Each must generate without a warning, pass its
//! ecosystem's strict type check together with the program in `tests/generated/`, and that
//! program must then upload and download a file and run a forecast against a real gateway.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::TestApp;

/// Generating, checking and running one client, together.
const LIMIT: Duration = Duration::from_secs(180);

fn source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/generated")
}

fn venv() -> PathBuf {
    std::env::var("XPAND_GENERATED_VENV").map_or_else(
        |_| Path::new(&std::env::var("HOME").unwrap()).join(".cache/xpand/generated-venv"),
        PathBuf::from,
    )
}

/// Runs `program` in `dir` with the gateway's URL and key, and returns its output (stdout, then
/// stderr); fails the test, quoting both, when it does not succeed.
async fn run(app: &TestApp, key: &str, dir: &Path, program: &Path, args: &[&str]) -> String {
    let path = format!(
        "{}:{}",
        venv().join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let run = tokio::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("PATH", path)
        .env("XPAND_URL", &app.base)
        .env("XPAND_API_KEY", key)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("MYPY_CACHE_DIR", dir.join(".mypy_cache"))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(LIMIT, run)
        .await
        .unwrap_or_else(|_| panic!("{} {args:?} ran past {LIMIT:?}", program.display()))
        .unwrap_or_else(|e| panic!("{} starts: {e}", program.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{} {args:?} failed:\n{text}",
        program.display()
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_python_and_typescript_clients_upload_and_forecast() {
    let bin = venv().join("bin");
    assert!(
        bin.join("openapi-python-client").is_file() && source().join("node_modules").is_dir(),
        "the generators are missing: run scripts/setup-generated-clients.sh (make test does)"
    );
    let mut app = TestApp::spawn().await;
    app.start_worker().await;
    let (_, key) = app.customer(100_000_000).await;
    let work = tempfile::tempdir().unwrap();

    // Python: generate, type-check with the program, run it.
    let spec = format!("{}/openapi.json", app.base);
    let generated = run(
        &app,
        &key,
        work.path(),
        &bin.join("openapi-python-client"),
        &["generate", "--url", &spec, "--output-path", "py"],
    )
    .await;
    assert!(
        !generated.contains("WARNING") && !generated.contains("Unable to"),
        "openapi-python-client warned:\n{generated}"
    );
    let py = work.path().join("py");
    std::fs::copy(source().join("forecast.py"), py.join("forecast.py")).unwrap();
    run(
        &app,
        &key,
        &py,
        &bin.join("mypy"),
        &["--strict", "xpand_client", "forecast.py"],
    )
    .await;
    let ran = run(&app, &key, &py, &bin.join("python"), &["forecast.py"]).await;
    assert!(ran.contains("2 rows"), "{ran}");

    // TypeScript: generate the types, compile under --strict with the program, run it.
    let ts = work.path().join("ts");
    std::fs::create_dir(&ts).unwrap();
    for file in ["forecast.ts", "tsconfig.json", "package.json"] {
        std::fs::copy(source().join(file), ts.join(file)).unwrap();
    }
    std::os::unix::fs::symlink(source().join("node_modules"), ts.join("node_modules")).unwrap();
    let node = Path::new("node");
    let generate = source().join("generate.mjs");
    run(
        &app,
        &key,
        &ts,
        node,
        &[generate.to_str().unwrap(), "openapi.d.ts"],
    )
    .await;
    run(
        &app,
        &key,
        &ts,
        node,
        &["node_modules/typescript/bin/tsc", "-p", "."],
    )
    .await;
    let ran = run(&app, &key, &ts, node, &["out/forecast.js"]).await;
    assert!(ran.contains("2 rows"), "{ran}");

    app.assert_ledger_invariants().await;
    app.teardown().await;
}
