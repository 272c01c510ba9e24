//! The user commands (`xpand jobs|files|account`, src/cli/) run as a user runs them: the real
//! binary, its stdout, stderr and exit code, against a real gateway. The gateway starts with
//! no worker, so a submitted job waits for one: it can be canceled, and `watch` can be started
//! on it before a worker joins and seen following it to the end.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt as _;

use crate::common::{sheet, TestApp};

/// What one run of the binary did.
pub(crate) struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    /// Exit code `code`, or the test fails with what the command said.
    pub(crate) fn expect(self, code: i32) -> Self {
        assert_eq!(
            self.code, code,
            "exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// The binary with `args`, in `dir`, against `app`, with `key` as XPAND_API_KEY (none: unset).
fn command(app: &TestApp, key: Option<&str>, dir: &Path, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_xpand"));
    cmd.args(args)
        .current_dir(dir)
        .env("XPAND_URL", &app.base)
        .env_remove("XPAND_API_KEY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(key) = key {
        cmd.env("XPAND_API_KEY", key);
    }
    cmd
}

async fn finish(child: tokio::process::Child, args: &[&str]) -> Run {
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("xpand {args:?} ran over 30 s"))
        .unwrap();
    Run {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// Runs the binary to its end, `stdin` as its standard input.
pub(crate) async fn xpand(
    app: &TestApp,
    key: Option<&str>,
    dir: &Path,
    args: &[&str],
    stdin: &[u8],
) -> Run {
    let mut child = command(app, key, dir, args).spawn().expect("xpand runs");
    let mut input = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut input, stdin)
        .await
        .unwrap();
    drop(input);
    finish(child, args).await
}

fn forecasts(job: &Value) -> &Value {
    let f = &job["output"]["forecasts"];
    assert!(f.is_array(), "a forecast output: {job}");
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_submits_watches_cancels_lists_and_moves_files() {
    let started = Instant::now();
    let mut app = TestApp::spawn_with(|c| c.forecast_rows_per_shard = 8).await;
    let credit = 100_000_000;
    let (_, api_key) = app.customer(credit).await;
    let key = Some(api_key.as_str());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = json!({ "series": sheet(24, 36) });
    std::fs::write(d.join("rows.json"), input.to_string()).unwrap();

    // Credentials: a key the gateway refuses is exit 4, and so is no key at all.
    let bad = xpand(&app, Some("xp_0000"), d, &["account"], b"")
        .await
        .expect(4);
    assert!(bad.stderr.contains("Unauthorized (401)"), "{}", bad.stderr);
    assert!(bad.stdout.is_empty());
    let none = xpand(&app, None, d, &["account"], b"").await.expect(4);
    assert!(none.stderr.contains("XPAND_API_KEY"), "{}", none.stderr);
    // ... and `.xpand/dev-api-key`, as `xpand up` writes it, is read when the variable is unset.
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir(home.path().join(".xpand")).unwrap();
    std::fs::write(
        home.path().join(".xpand/dev-api-key"),
        format!("{}\n", &api_key),
    )
    .unwrap();
    let account = xpand(&app, None, home.path(), &["account", "--json"], b"")
        .await
        .expect(0)
        .json();
    assert_eq!(account["available"], credit);

    // A cell that is not a number: exit 5, the cell named, nothing submitted or charged.
    let mut broken = input.clone();
    broken["series"][3][5] = json!("n/a");
    let refused = xpand(
        &app,
        key,
        d,
        &[
            "jobs",
            "submit",
            "--kind",
            "forecast",
            "--input",
            "-",
            "--params",
            r#"{"horizon":6}"#,
        ],
        broken.to_string().as_bytes(),
    )
    .await
    .expect(5);
    assert!(
        refused.stderr.contains("input.series[3][5]: "),
        "{}",
        refused.stderr
    );
    assert!(refused.stdout.is_empty(), "{}", refused.stdout);
    // A max fee below the quote: exit 6. Bad JSON in --params: exit 2, like a bad flag.
    let submit = [
        "jobs",
        "submit",
        "--kind",
        "forecast",
        "--input",
        "rows.json",
    ];
    let low = xpand(
        &app,
        key,
        d,
        &[
            &submit[..],
            &["--params", r#"{"horizon":6}"#, "--max-fee", "1"],
        ]
        .concat(),
        b"",
    )
    .await
    .expect(6);
    assert!(
        low.stderr.contains("max_fee below quote (402)"),
        "{}",
        low.stderr
    );
    xpand(
        &app,
        key,
        d,
        &[&submit[..], &["--params", "{horizon"]].concat(),
        b"",
    )
    .await
    .expect(2);
    xpand(&app, key, d, &["jobs", "get", "not-a-uuid"], b"")
        .await
        .expect(2);
    assert_eq!(app.balances(&api_key).await, (credit, 0));

    // No worker yet: a submitted job waits. get, list and cancel it; the escrow comes back.
    let params = ["--params", r#"{"horizon":6}"#];
    let queued = xpand(
        &app,
        key,
        d,
        &[&submit[..], &params, &["--json"]].concat(),
        b"",
    )
    .await
    .expect(0)
    .json();
    assert_eq!(queued["status"], "queued");
    let id = queued["id"].as_str().unwrap().to_string();
    assert!(app.balances(&api_key).await.1 > 0, "the quote is held");
    let got = xpand(&app, key, d, &["jobs", "get", &id, "--json"], b"")
        .await
        .expect(0)
        .json();
    assert_eq!(got["id"], queued["id"]);
    let human = xpand(&app, key, d, &["jobs", "get", &id], b"")
        .await
        .expect(0);
    assert!(human.stdout.contains("status   queued"), "{}", human.stdout);
    let listed = xpand(
        &app,
        key,
        d,
        &["jobs", "list", "--status", "queued", "--json"],
        b"",
    )
    .await
    .expect(0)
    .json();
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(listed["jobs"][0]["id"], queued["id"]);
    let table = xpand(&app, key, d, &["jobs", "list"], b"").await.expect(0);
    assert!(
        table
            .stdout
            .starts_with(&format!("{id}\tqueued\tforecast\t0/3\t")),
        "{}",
        table.stdout
    );
    let canceled = xpand(&app, key, d, &["jobs", "cancel", &id, "--json"], b"")
        .await
        .expect(0)
        .json();
    assert_eq!(canceled["status"], "canceled");
    assert_eq!(
        app.balances(&api_key).await,
        (credit, 0),
        "refunded in full"
    );
    // Watching a job that ended canceled ends at once, exit 3.
    let watched = xpand(&app, key, d, &["jobs", "watch", &id], b"")
        .await
        .expect(3);
    assert!(
        watched.stdout.contains("status   canceled"),
        "{}",
        watched.stdout
    );
    assert!(watched.stderr.contains("canceled"), "{}", watched.stderr);

    // `watch` follows a job from queued to its end: started before any worker exists.
    let queued = xpand(
        &app,
        key,
        d,
        &[&submit[..], &params, &["--json"]].concat(),
        b"",
    )
    .await
    .expect(0)
    .json();
    let id = queued["id"].as_str().unwrap().to_string();
    let watch_args = ["jobs", "watch", &id, "--json"];
    let mut watch = command(&app, key, d, &watch_args).spawn().unwrap();
    // The worker starts once the watch has the job's first event, read off its stderr.
    let mut lines = tokio::io::BufReader::new(watch.stderr.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("watch says where the job is")
        .unwrap();
    assert_eq!(
        first.as_deref(),
        Some(format!("job {id}: queued, 0/3 shards").as_str())
    );
    let rest = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            rest.push(line);
        }
        rest
    });
    app.start_worker().await;
    let watched = finish(watch, &watch_args).await.expect(0);
    let job = watched.json();
    assert_eq!(job["status"], "succeeded");
    let rest = rest.await.unwrap();
    assert_eq!(
        rest.last().map(String::as_str),
        Some(format!("job {id}: succeeded, 3/3 shards").as_str()),
        "{rest:?}"
    );
    let read = app.get_json(&api_key, &format!("/v1/jobs/{id}")).await;
    assert_eq!(
        (&job["id"], forecasts(&job)),
        (&read["id"], forecasts(&read))
    );

    // --wait --json, from a file and from stdin: the forecasts POST /v1/jobs gives.
    let api = app
        .http
        .post(format!("{}/v1/jobs", app.base))
        .bearer_auth(&api_key)
        .header("Prefer", "wait")
        .json(&json!({"kind": "forecast", "input": input, "params": {"horizon": 6}, "max_fee": 1_000_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 201);
    let api: Value = api.json().await.unwrap();
    assert_eq!(api["status"], "succeeded");
    let from_file = xpand(
        &app,
        key,
        d,
        &[&submit[..], &params, &["--wait", "--json"]].concat(),
        b"",
    )
    .await
    .expect(0)
    .json();
    let stdin_args = [
        "jobs",
        "submit",
        "--kind",
        "forecast",
        "--input",
        "-",
        "--params",
        r#"{"horizon":6}"#,
        "--wait",
        "--json",
    ];
    let from_stdin = xpand(&app, key, d, &stdin_args, input.to_string().as_bytes())
        .await
        .expect(0)
        .json();
    assert_eq!(from_file["status"], "succeeded");
    assert_eq!(forecasts(&from_file), forecasts(&api));
    assert_eq!(forecasts(&from_stdin), forecasts(&api));
    assert_ne!(
        from_file["id"], from_stdin["id"],
        "a fresh idempotency key each time"
    );
    // The same --idempotency-key twice: one job.
    let once = [
        &submit[..],
        &params,
        &["--json", "--idempotency-key", "cli-test-1"],
    ]
    .concat();
    let first = xpand(&app, key, d, &once, b"").await.expect(0).json();
    let again = xpand(&app, key, d, &once, b"").await.expect(0).json();
    assert_eq!(first["id"], again["id"]);
    // Human output: the summary and the rows.
    let human = xpand(
        &app,
        key,
        d,
        &[&submit[..], &params, &["--wait"]].concat(),
        b"",
    )
    .await
    .expect(0);
    assert!(
        human.stdout.contains("status   succeeded"),
        "{}",
        human.stdout
    );
    // One line per row after the heading, to six significant digits.
    let lines: Vec<&str> = human.stdout.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("forecasts ("))
        .unwrap();
    let shown = &lines[at + 1..];
    let rows = forecasts(&api).as_array().unwrap();
    assert_eq!(shown.len(), rows.len(), "{}", human.stdout);
    for (line, row) in shown.iter().zip(rows) {
        let values: Vec<f64> = line
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        let row: Vec<f64> = row
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(values.len(), row.len());
        for (shown, exact) in values.iter().zip(&row) {
            assert!(
                (shown - exact).abs() <= 1e-5 * exact.abs(),
                "{shown} for {exact}"
            );
        }
    }

    // Files: upload, download byte-equal (to a path and to stdout), rm.
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    std::fs::write(d.join("clip.bin"), &bytes).unwrap();
    let info = xpand(
        &app,
        key,
        d,
        &["files", "upload", "clip.bin", "--json"],
        b"",
    )
    .await
    .expect(0)
    .json();
    assert_eq!(info["size"], bytes.len());
    let file = info["id"].as_str().unwrap().to_string();
    xpand(
        &app,
        key,
        d,
        &["files", "download", &file, "-o", "back.bin"],
        b"",
    )
    .await
    .expect(0);
    assert!(
        std::fs::read(d.join("back.bin")).unwrap() == bytes,
        "the download is the upload"
    );
    xpand(
        &app,
        key,
        d,
        &["files", "download", &file, "-o", "back.bin"],
        b"",
    )
    .await
    .expect(1);
    let piped = command(&app, key, d, &["files", "download", &file, "-o", "-"])
        .output()
        .await
        .unwrap();
    assert!(piped.status.success() && piped.stdout == bytes);
    let rm = xpand(&app, key, d, &["files", "rm", &file], b"")
        .await
        .expect(0);
    assert!(rm.stdout.contains(&file));
    let gone = xpand(
        &app,
        key,
        d,
        &["files", "download", &file, "-o", "gone.bin"],
        b"",
    )
    .await
    .expect(1);
    assert!(gone.stderr.contains("Not found (404)"), "{}", gone.stderr);
    assert!(!d.join("gone.bin").exists());

    // The account: the API's balances, and its ledger.
    let account = xpand(&app, key, d, &["account", "--json"], b"")
        .await
        .expect(0)
        .json();
    let (available, held) = app.balances(&api_key).await;
    assert_eq!(
        (account["available"].as_i64(), account["held"].as_i64()),
        (Some(available), Some(held))
    );
    let human = xpand(&app, key, d, &["account"], b"").await.expect(0);
    assert!(
        human
            .stdout
            .contains(&format!("available  {available} micro-credits")),
        "{}",
        human.stdout
    );
    let api_ledger = app.get_json(&api_key, "/v1/account/ledger?limit=200").await;
    let all = api_ledger["entries"].as_array().unwrap();
    assert!(all.len() > 3, "{api_ledger}");
    let ledger = xpand(
        &app,
        key,
        d,
        &["account", "ledger", "--json", "--limit", "500"],
        b"",
    )
    .await
    .expect(0)
    .json();
    assert_eq!(&ledger["entries"], &api_ledger["entries"]);
    let table = xpand(&app, key, d, &["account", "ledger", "-L", "2"], b"")
        .await
        .expect(0);
    assert_eq!(table.stdout.lines().count(), 2, "{}", table.stdout);

    app.assert_ledger_invariants().await;
    app.teardown().await;
    eprintln!("the CLI test took {:?}", started.elapsed());
}
