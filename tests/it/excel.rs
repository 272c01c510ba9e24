//! The Excel add-in (`clients/excel/`) as Excel runs it, as near as a test can: its built
//! functions file in headless Chromium, under a harness page that fakes `CustomFunctions`,
//! `OfficeRuntime.storage` and the streaming invocation (`clients/excel/test/`), against a real
//! gateway that lists the page's origin for CORS. The gateway starts with no worker, so that the
//! formula canceled first acts on a job that can only wait; a worker joins once that is checked.
//! Before anything runs, the bundle is rebuilt and `functions.json` regenerated (telemetry off,
//! loopback only) and compared with the committed one.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::ChildStdout;
use xpand::jobs::JobStatus;

use crate::common::{forecasts, sheet, TestApp};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/excel");
const CREDIT: i64 = 100_000_000;
/// Rows per shard: the 10-row range streams back in 5 slices.
const ROWS_PER_SHARD: usize = 2;

/// Serves the harness page and the built functions file from an origin of their own, as an
/// add-in's pages are.
async fn page_server() -> String {
    let file = |name: &'static str, content_type: &'static str| {
        axum::routing::get(move || async move {
            let body = tokio::fs::read_to_string(Path::new(DIR).join(name))
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            ([("content-type", content_type)], body)
        })
    };
    let app = axum::Router::new()
        .route("/", file("test/harness.html", "text/html; charset=utf-8"))
        .route(
            "/dist/functions.js",
            file("dist/functions.js", "text/javascript; charset=utf-8"),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    origin
}

/// Runs one of the add-in's commands in its folder; it must succeed.
async fn run_in_dir(program: &str, args: &[&str]) {
    let out = tokio::process::Command::new(program)
        .args(args)
        .current_dir(DIR)
        .output()
        .await
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The driver's next report line, which must be `step`.
async fn next_step(lines: &mut Lines<BufReader<ChildStdout>>, step: &str) -> Value {
    let line = tokio::time::timeout(Duration::from_secs(40), lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("no `{step}` from the driver within 40 s"))
        .unwrap()
        .unwrap_or_else(|| panic!("the driver ended before `{step}` (see its stderr)"));
    let report: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("{line}"));
    assert_eq!(report["step"], step, "{report:#}");
    report
}

fn rows(value: &Value) -> Vec<Vec<Value>> {
    serde_json::from_value(value.clone()).unwrap_or_else(|_| panic!("not an array: {value}"))
}

/// Each cell of `grid` is a number, as f64.
fn numbers(grid: &[Vec<Value>]) -> Vec<Vec<f64>> {
    grid.iter()
        .map(|row| {
            row.iter()
                .map(|v| v.as_f64().unwrap_or_else(|| panic!("not a number: {v}")))
                .collect()
        })
        .collect()
}

fn assert_close(got: &[Vec<f64>], want: &[Vec<f64>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: rows");
    for (r, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: row {r}");
        for (a, b) in g.iter().zip(w) {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{what}: row {r}: {g:?} vs {w:?}"
            );
        }
    }
}

/// The columns `from..to` of every row.
fn columns(grid: &[Vec<f64>], from: usize, to: usize) -> Vec<Vec<f64>> {
    grid.iter().map(|row| row[from..to].to_vec()).collect()
}

/// The job a formula's submit frame carried.
fn submitted(sent: &Value, horizon: u64) -> Value {
    sent.as_array()
        .unwrap()
        .iter()
        .find(|f| f["op"] == "submit" && f["job"]["params"]["horizon"] == horizon)
        .unwrap_or_else(|| panic!("no submit with horizon {horizon} in {sent}"))["job"]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_excel_function_streams_spills_names_cells_and_cancels() {
    let modules = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/browser/node_modules/playwright-core"
    );
    assert!(
        Path::new(modules).is_dir() && Path::new(DIR).join("node_modules").is_dir(),
        "run scripts/setup-browser.sh and scripts/setup-excel-addin.sh (make test does)"
    );
    run_in_dir("node", &["build.mjs"]).await;
    run_in_dir("./metadata.sh", &["--check"]).await;

    let origin = page_server().await;
    let allowed = origin.clone();
    let mut app = TestApp::spawn_with(move |c| {
        c.cors_origins = vec![allowed];
        c.forecast_rows_per_shard = ROWS_PER_SHARD;
    })
    .await;
    let (_, key) = app.customer(CREDIT).await;

    // The formulas. `refused` has text at row 4, column 6; `main` has two blank cells, one as
    // Excel may pass it ("") and one as null.
    let mut refused = json!(sheet(5, 8));
    refused[3][5] = json!("n/a");
    let mut main = json!(sheet(10, 24));
    main[1][5] = json!("");
    main[4][10] = Value::Null;
    let level = json!({ "range": sheet(4, 24), "horizon": 5, "level": 80 });
    let plan = json!({
        "gateway": app.base,
        "apiKey": key,
        "page": format!("{origin}/"),
        "cancel": { "range": sheet(4, 24), "horizon": 3 },
        "refused": { "range": refused, "horizon": 2 },
        "main": { "range": main, "horizon": 4 },
        "level": level,
    });
    let mut driver = tokio::process::Command::new("node")
        .args(["test/excel.mjs", &plan.to_string()])
        .current_dir(DIR)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let mut lines = BufReader::new(driver.stdout.take().unwrap()).lines();

    // 1. Canceled while it waited: the gateway says so, and every micro-credit came back.
    let report = next_step(&mut lines, "canceled").await;
    let id = report["job"].as_str().unwrap().parse().unwrap();
    let job = app.job(&key, id).await;
    assert_eq!(job.status, JobStatus::Canceled, "{job:?}");
    assert_eq!(job.cost, Some(0), "no shard was done: {job:?}");
    assert_eq!(app.balances(&key).await, (CREDIT, 0), "refunded in full");
    let cancel_op = json!({ "op": "cancel", "job_id": report["job"].clone() });
    assert!(
        report["sent"].as_array().unwrap().contains(&cancel_op),
        "onCanceled sent the socket's cancel op: {}",
        report["sent"]
    );
    // What the canceled formula showed: its placeholders only, 4 rows of 3.
    let placeholders = json!(vec![vec![""; 3]; 4]);
    assert_eq!(report["cancel_results"], json!([placeholders]));
    // The text cell: placeholders, then #VALUE! naming the cell as the sheet's user sees it.
    let refused_results = report["refused_results"].as_array().unwrap();
    assert_eq!(refused_results.len(), 2, "{refused_results:?}");
    assert_eq!(refused_results[0], json!(vec![vec![""; 2]; 5]));
    assert_eq!(
        refused_results[1],
        json!({ "error": "#VALUE!",
                "message": "row 4, column 6 of the range: must be a number or blank, got text" })
    );

    // 2. A worker joins; the formulas stream to their end.
    app.start_worker().await;
    let mut stdin = driver.stdin.take().unwrap();
    stdin.write_all(b"go\n").await.unwrap();
    let report = next_step(&mut lines, "done").await;

    // Blank cells went to the gateway as null, and the job was not refused for them.
    let job = submitted(&report["sent"], 4);
    assert_eq!(job["input"]["series"][1][5], Value::Null);
    assert_eq!(job["input"]["series"][4][10], Value::Null);
    assert_eq!(job["max_fee"], 10_000_000, "the default fee limit");

    // Placeholders first, then the slices as they came, each keeping what was shown before.
    let results: Vec<Vec<Vec<Value>>> = report["main_results"]
        .as_array()
        .unwrap()
        .iter()
        .map(rows)
        .collect();
    assert_eq!(
        results[0],
        vec![vec![json!(""); 4]; 10],
        "placeholders first"
    );
    for pair in results.windows(2) {
        for (before, after) in pair[0].iter().flatten().zip(pair[1].iter().flatten()) {
            assert!(before == "" || before == after, "a shown value changed");
        }
    }
    let blank_rows = |grid: &Vec<Vec<Value>>| grid.iter().filter(|r| r[0] == "").count();
    let streamed: Vec<usize> = results.iter().map(blank_rows).collect();
    assert!(
        streamed.iter().any(|&b| b > 0 && b < 10),
        "some update showed part of the rows: rows still blank at each update {streamed:?}"
    );
    let last = results.last().unwrap();
    assert_eq!(blank_rows(last), 0, "{streamed:?}");

    // The final spill is what REST answers for the same rows.
    let mut series = main.clone();
    series[1][5] = Value::Null;
    let (_, rest) = app
        .submit(
            &key,
            &json!({ "kind": "forecast", "input": { "series": series },
                     "params": { "horizon": 4 }, "max_fee": 10_000_000 }),
        )
        .await;
    let rest = app.wait_for(&key, rest.id).await;
    assert_close(&numbers(last), &forecasts(&rest), "main");

    // With a level: forecasts, then the lower bounds, then the upper bounds.
    let results: Vec<Vec<Vec<Value>>> = report["level_results"]
        .as_array()
        .unwrap()
        .iter()
        .map(rows)
        .collect();
    // Each slice brings its rows' bounds with its forecasts.
    for grid in &results {
        for row in grid {
            let filled = row.iter().filter(|v| *v != "").count();
            assert!(filled == 0 || filled == 15, "a row half shown: {row:?}");
        }
    }
    assert!(results
        .iter()
        .any(|g| g.iter().any(|r| r[0] == "") && g.iter().any(|r| r[0] != "")));
    let last = numbers(results.last().unwrap());
    assert_eq!(last.len(), 4);
    assert!(last.iter().all(|row| row.len() == 15), "{last:?}");
    let (_, rest) = app
        .submit(
            &key,
            &json!({ "kind": "forecast", "input": { "series": sheet(4, 24) },
                     "params": { "horizon": 5, "level": 80 }, "max_fee": 10_000_000 }),
        )
        .await;
    let rest = app.wait_for(&key, rest.id).await;
    let output = rest.output.as_ref().unwrap();
    let interval = &output["intervals"][0];
    assert_eq!(interval["level"].as_f64(), Some(80.0));
    let bound =
        |name: &str| -> Vec<Vec<f64>> { serde_json::from_value(interval[name].clone()).unwrap() };
    assert_close(&columns(&last, 0, 5), &forecasts(&rest), "level: forecasts");
    assert_close(&columns(&last, 5, 10), &bound("lower"), "level: lower");
    assert_close(&columns(&last, 10, 15), &bound("upper"), "level: upper");

    let status = tokio::time::timeout(Duration::from_secs(10), driver.wait())
        .await
        .expect("the driver ends")
        .unwrap();
    assert!(status.success(), "the driver failed: {status}");
    app.assert_ledger_invariants().await;
    app.teardown().await;
}
