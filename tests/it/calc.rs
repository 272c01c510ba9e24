//! The LibreOffice Calc extension (`clients/calc/`) run as its users run it: a headless Calc
//! with `xpand.oxt` installed in a throw-away profile opens `clients/calc/sample.ods`, and
//! `tests/calc/drive.py` (Python UNO) enters XPAND.FORECAST array formulas and reads the cells.
//! One soffice serves every check, in order: deleting a formula cancels its job; a connection
//! cut (by a proxy between soffice and the gateway) while a job runs is reopened, the job
//! re-subscribed and its output shown, charged once; a range with a blank cell fills with what
//! `POST /v1/jobs` computes, progressively; a text cell shows an error naming it; a 5,000-row
//! range; intervals; an exhausted balance shows the gateway's 402 message, charges nothing, and
//! the formula entered again once topped up runs.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};
use uuid::Uuid;
use xpand::http::jobs::JobPage;
use xpand::jobs::Job;

use crate::common::{parse_value, problem, CuttableProxy, TestApp};

/// The placeholder the extension shows in a cell whose row has not arrived.
const PLACEHOLDER: &str = "\u{2026}";
const HORIZON: usize = 12;
/// The sample sheet's input range and where its forecasts go.
const INPUT: &str = "A1:AV40";
const OUTPUT: &str = "AX1:BI40";
/// The lost-connection check's range and output.
const LOST_INPUT: &str = "A1:AV20";
const LOST_OUTPUT: &str = "AX1:BI20";

/// tests/calc/drive.py, talked to one JSON line at a time.
struct Calc {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    profile: std::path::PathBuf,
    /// soffice's process group, ended on drop (a failed test kills the driver, not soffice).
    office: Option<u64>,
}

impl Drop for Calc {
    fn drop(&mut self) {
        if let Some(group) = self.office.take() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{group}")])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Calc {
    /// Starts soffice with the extension pointed at `url` (the gateway, or a proxy to it).
    async fn start(url: &str, key: &str) -> Self {
        let root = env!("CARGO_MANIFEST_DIR");
        let oxt = Path::new(root).join("clients/calc/xpand.oxt");
        assert!(
            oxt.is_file(),
            "clients/calc/xpand.oxt is missing: run `make clients` (make test does)"
        );
        let profile = std::env::temp_dir().join(format!("xpand-calc-{}", uuid::Uuid::new_v4()));
        let mut child = tokio::process::Command::new("/usr/bin/python3")
            .arg(Path::new(root).join("tests/calc/drive.py"))
            .arg(&profile)
            .arg(&oxt)
            .arg(Path::new(root).join("clients/calc/sample.ods"))
            .env("XPAND_URL", url)
            .env("XPAND_API_KEY", key)
            .env("XPAND_CALC_LOG", profile.join("xpand.log"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("/usr/bin/python3 runs (scripts/setup-libreoffice.sh installs python3-uno)");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut calc = Calc {
            child,
            stdin,
            lines,
            profile,
            office: None,
        };
        let ready = calc.answer(Duration::from_secs(60)).await;
        assert_eq!(ready["ready"], true, "{ready}");
        calc.office = ready["office_pid"].as_u64();
        println!(
            "calc: soffice started, extension installed, sheet open in {:.2} s",
            ready["startup_s"].as_f64().unwrap()
        );
        calc
    }

    async fn answer(&mut self, within: Duration) -> Value {
        let line = tokio::time::timeout(within, self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("drive.py did not answer within {within:?}{}", self.log()))
            .unwrap();
        let line = line.unwrap_or_else(|| panic!("drive.py ended{}", self.log()));
        let answer: Value = serde_json::from_str(&line).unwrap();
        assert!(
            answer.get("error").is_none(),
            "drive.py: {answer}{}",
            self.log()
        );
        answer
    }

    async fn call(&mut self, command: Value) -> Value {
        let line = format!("{command}\n");
        self.stdin.write_all(line.as_bytes()).await.unwrap();
        self.answer(Duration::from_secs(120)).await
    }

    async fn read(&mut self, sheet: &str, range: &str) -> Vec<Vec<Value>> {
        let answer = self
            .call(json!({"cmd": "read", "sheet": sheet, "range": range}))
            .await;
        parse_value(&answer["cells"])
    }

    /// Reads `cell` until `shows` holds for its text, within `within`; the text.
    async fn wait_for_text(
        &mut self,
        sheet: &str,
        cell: &str,
        within: Duration,
        shows: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + within;
        loop {
            let top = self.read(sheet, &format!("{cell}:{cell}")).await;
            if let Some(text) = top[0][0].as_str().filter(|t| shows(t)) {
                return text.to_string();
            }
            if Instant::now() > deadline {
                panic!("{cell} shows {} after {within:?}{}", top[0][0], self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Reads `range` until every cell holds a number, within `within`; the cells.
    async fn wait_filled(&mut self, sheet: &str, range: &str, within: Duration) -> Vec<Vec<Value>> {
        let deadline = Instant::now() + within;
        loop {
            let cells = self.read(sheet, range).await;
            if cells.iter().flatten().all(Value::is_number) {
                return cells;
            }
            if Instant::now() > deadline {
                panic!("{range} still shows {}{}", cells[0][0], self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// soffice's own output, for a failure message.
    fn log(&self) -> String {
        let read = |name| std::fs::read_to_string(self.profile.join(name)).unwrap_or_default();
        format!(
            "\nsoffice.log:\n{}\nthe extension's log:\n{}",
            read("soffice.log"),
            read("xpand.log")
        )
    }

    async fn quit(mut self) {
        self.call(json!({"cmd": "quit"})).await;
        let _ = tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await;
        self.office = None; // the driver ended it
    }
}

/// A sheet's cells as the gateway's `input.series`: an empty cell is `null`.
fn series(cells: &[Vec<Value>]) -> Value {
    let rows: Vec<Vec<Value>> = cells
        .iter()
        .map(|row| {
            row.iter()
                .map(|v| match v {
                    Value::String(s) if s.trim().is_empty() => Value::Null,
                    other => other.clone(),
                })
                .collect()
        })
        .collect();
    json!(rows)
}

/// What `POST /v1/jobs` computes for `input` (the same gateway and workers).
async fn rest_output(app: &TestApp, key: &str, input: &Value, params: Value) -> Value {
    let body = json!({"kind": "forecast", "input": {"series": input}, "params": params, "max_fee": 100_000_000});
    let (status, job) = app.submit(key, &body).await;
    assert!(status.is_success(), "{status}: {job:?}");
    let job = app.wait_for(key, job.id).await;
    assert_eq!(job.status.as_str(), "succeeded", "{job:?}");
    job.output.clone().unwrap()
}

/// Every cell a number within 1e-6 (relative) of `expected`.
fn assert_cells_equal(cells: &[Vec<Value>], expected: &[Vec<f64>], what: &str) {
    assert_eq!(cells.len(), expected.len(), "{what}: rows");
    for (r, (row, want)) in cells.iter().zip(expected).enumerate() {
        assert_eq!(row.len(), want.len(), "{what}: row {r} width");
        for (c, (got, want)) in row.iter().zip(want).enumerate() {
            let got = got
                .as_f64()
                .unwrap_or_else(|| panic!("{what}: cell [{r}][{c}] is {got}, not a number"));
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1e-9),
                "{what}: cell [{r}][{c}] is {got}, the gateway computed {want}"
            );
        }
    }
}

/// Takes what `account` has available out of it (back to issuance, as a withdrawal would), so
/// that it cannot pay for a job.
async fn spend_everything(app: &TestApp, account: Uuid) {
    use xpand::ledger::{self, Posting, Purpose, Subject, TxKind, SYSTEM_ACCOUNT};
    let available = ledger::balances(&app.db, account).await.unwrap().available;
    let mut tx = app.db.begin().await.unwrap();
    ledger::post(
        &mut tx,
        TxKind::Deposit,
        Subject::None,
        "test: withdraw everything",
        &[
            Posting {
                owner: account,
                purpose: Purpose::Available,
                amount: -available,
            },
            Posting {
                owner: SYSTEM_ACCOUNT,
                purpose: Purpose::Issuance,
                amount: available,
            },
        ],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

/// Polls `GET /v1/jobs` until it lists `count` jobs; the newest.
async fn wait_for_jobs(app: &TestApp, key: &str, count: usize, calc: &mut Calc) -> Job {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let page: JobPage = app.get_as(key, "/v1/jobs").await;
        if page.jobs.len() >= count {
            assert_eq!(page.jobs.len(), count, "one formula, one job");
            return page.jobs.into_iter().next().unwrap();
        }
        if Instant::now() > deadline {
            let shown = calc.read("Data", "AX1:AX1").await;
            panic!(
                "the formula submitted no job: AX1 shows {shown:?}{}",
                calc.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn seconds(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "never".into(), |s| format!("{:.3} s", s))
}

/// `rows` rows of `columns` values with two decimals, as typed into a sheet.
fn typed_rows(rows: usize, columns: usize) -> Vec<Vec<f64>> {
    crate::common::sheet(rows, columns)
        .into_iter()
        .map(|row| {
            row.into_iter()
                .map(|v| (v * 100.0).round() / 100.0)
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calc_forecast_streams_into_cells_names_bad_cells_and_cancels() {
    // A small grain, so the 40-row range makes 10 shards and streams in 10 slices; a body limit
    // that takes the 5,000-row range (about 1 MB of JSON).
    let mut app = TestApp::spawn_with(|c| {
        c.forecast_rows_per_shard = 4;
        c.max_body_bytes = 4 * 1024 * 1024;
    })
    .await;
    let credit = 1_000_000_000;
    let (account, key) = app.customer(credit).await;
    // soffice reaches the gateway through a proxy the test can cut; the test's own REST calls
    // go direct.
    let gateway: &'static str = Box::leak(app.base.trim_start_matches("http://").into());
    let proxy = CuttableProxy::start(gateway).await;
    let mut calc = Calc::start(&format!("http://127.0.0.1:{}", proxy.port), &key).await;
    let formula = format!("=XPAND.FORECAST({INPUT};{HORIZON})");

    // 1. No worker yet: the job can only wait. Deleting the formula cancels it, refunded.
    calc.call(json!({"cmd": "set", "formula": formula, "target": OUTPUT}))
        .await;
    let job = wait_for_jobs(&app, &key, 1, &mut calc).await;
    let waiting = calc.read("Data", "AX1:AX1").await;
    assert_eq!(
        waiting[0][0], PLACEHOLDER,
        "a waiting row shows the placeholder"
    );
    calc.call(json!({"cmd": "clear", "range": OUTPUT})).await;
    let canceled = app.wait_for(&key, job.id).await;
    assert_eq!(canceled.status.as_str(), "canceled", "{canceled:?}");
    assert_eq!(
        app.balances(&key).await,
        (credit, 0),
        "the canceled job is refunded"
    );
    let page: JobPage = app.get_as(&key, "/v1/jobs").await;
    assert_eq!(page.jobs.len(), 1, "one formula, one job");

    // 2. A lost connection. A formula's job waits (still no worker); every connection through
    //    the proxy is cut and new ones refused: the first cell says so, and Calc still answers.
    //    Let through again, the extension reconnects and re-subscribes and the cell shows the
    //    placeholder alone. Cut a second time, the worker starts and the job ends while the
    //    socket is down: once reconnected the extension shows the job's final output. One job,
    //    charged once.
    let lost = Instant::now();
    calc.call(json!({"cmd": "set", "formula": format!("=XPAND.FORECAST({LOST_INPUT};{HORIZON})"), "target": LOST_OUTPUT}))
        .await;
    let job = wait_for_jobs(&app, &key, 2, &mut calc).await;
    let within = Duration::from_secs(10);
    let retrying = |t: &str| t.contains("retrying");
    proxy.set_cut(true);
    let trouble = calc.wait_for_text("Data", "AX1", within, retrying).await;
    assert!(
        trouble.starts_with(&format!("{PLACEHOLDER} cannot reach http://127.0.0.1:")),
        "{trouble}"
    );
    proxy.set_cut(false);
    calc.wait_for_text("Data", "AX1", within, |t| t == PLACEHOLDER)
        .await;
    proxy.set_cut(true);
    calc.wait_for_text("Data", "AX1", within, retrying).await;
    app.start_worker().await;
    let done = app.wait_for(&key, job.id).await;
    assert_eq!(done.status.as_str(), "succeeded", "{done:?}");
    proxy.set_cut(false);
    let cells = calc
        .wait_filled("Data", LOST_OUTPUT, Duration::from_secs(20))
        .await;
    println!(
        "calc: a lost connection, the job ended meanwhile: cells filled {:.2} s after entering the formula",
        lost.elapsed().as_secs_f64()
    );
    let page: JobPage = app.get_as(&key, "/v1/jobs").await;
    assert_eq!(
        page.jobs.len(),
        2,
        "one job for the range, not submitted again"
    );
    assert_eq!(done.cost, Some(done.quote), "{done:?}");
    assert_eq!(
        app.balances(&key).await,
        (credit - done.quote, 0),
        "the job is charged once"
    );
    let input = calc.read("Data", LOST_INPUT).await;
    let output = rest_output(&app, &key, &series(&input), json!({"horizon": HORIZON})).await;
    let expected: Vec<Vec<f64>> = parse_value(&output["forecasts"]);
    assert_cells_equal(&cells, &expected, "after a lost connection");
    calc.call(json!({"cmd": "clear", "range": LOST_OUTPUT}))
        .await;

    // 3. A blank cell in the range; the cells equal what REST computes for the same rows, and
    //    they fill progressively (the first rows shown while the last still wait).
    calc.call(json!({"cmd": "put", "cell": "C5", "value": null}))
        .await;
    let run = calc
        .call(json!({"cmd": "run", "formula": formula, "target": OUTPUT, "timeout": 60}))
        .await;
    assert_eq!(run["timed_out"], false, "{run}{}", calc.log());
    let input = calc.read("Data", INPUT).await;
    assert_eq!(input[4][2], "", "C5 is blank");
    let output = rest_output(&app, &key, &series(&input), json!({"horizon": HORIZON})).await;
    let cells: Vec<Vec<Value>> = parse_value(&run["cells"]);
    let expected: Vec<Vec<f64>> = parse_value(&output["forecasts"]);
    assert_cells_equal(&cells, &expected, "40 x 48, horizon 12");
    println!(
        "calc: 40 rows x 48 values, horizon 12: first cell {}, last cell {} after entering the formula ({} reads)",
        seconds(&run["first_s"]),
        seconds(&run["last_s"]),
        run["polls"]
    );
    assert_eq!(run["progressive"], true, "rows filled all at once: {run}");

    // 4. Text in a cell of the range: the formula recalculates and names the cell.
    calc.call(json!({"cmd": "put", "cell": "D7", "value": "n/a"}))
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let shown = loop {
        let top = calc.read("Data", "AX1:AX1").await;
        if let Some(text) = top[0][0].as_str().filter(|t| t.starts_with("#XPAND!")) {
            break text.to_string();
        }
        assert!(Instant::now() < deadline, "no error shown: {top:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(shown.contains("D7 must be a number"), "{shown}");

    // 5. 5,000 rows (64 shards), timed.
    let big = typed_rows(5_000, 24);
    calc.call(json!({"cmd": "sheet", "name": "Big"})).await;
    calc.call(json!({"cmd": "fill", "sheet": "Big", "origin": "A1", "rows": big}))
        .await;
    let run = calc
        .call(json!({"cmd": "run", "sheet": "Big", "formula": format!("=XPAND.FORECAST(A1:X5000;{HORIZON})"),
                     "target": "Z1:AK5000", "timeout": 90}))
        .await;
    assert_eq!(run["timed_out"], false, "{}{}", run["cells"][0], calc.log());
    println!(
        "calc: 5,000 rows x 24 values, horizon 12: first cell {}, last cell {} after entering the formula ({} reads)",
        seconds(&run["first_s"]),
        seconds(&run["last_s"]),
        run["polls"]
    );
    let output = rest_output(&app, &key, &json!(big), json!({"horizon": HORIZON})).await;
    let cells: Vec<Vec<Value>> = parse_value(&run["cells"]);
    let expected: Vec<Vec<f64>> = parse_value(&output["forecasts"]);
    assert_cells_equal(&cells, &expected, "5,000 rows");

    // 6. With a level: forecasts, then lower bounds, then upper bounds, horizon columns each.
    let run = calc
        .call(json!({"cmd": "run", "sheet": "Big", "formula": format!("=XPAND.FORECAST(A1:X40;{HORIZON};80)"),
                     "target": "AM1:BV40", "timeout": 60}))
        .await;
    assert_eq!(run["timed_out"], false, "{}", run["cells"][0]);
    let output = rest_output(
        &app,
        &key,
        &json!(big[..40]),
        json!({"horizon": HORIZON, "level": 80}),
    )
    .await;
    let forecasts: Vec<Vec<f64>> = parse_value(&output["forecasts"]);
    let band = &output["intervals"][0];
    assert_eq!(band["level"].as_f64(), Some(80.0), "{}", band["level"]);
    let lower: Vec<Vec<f64>> = parse_value(&band["lower"]);
    let upper: Vec<Vec<f64>> = parse_value(&band["upper"]);
    let expected: Vec<Vec<f64>> = (0..40)
        .map(|r| [&forecasts[r][..], &lower[r][..], &upper[r][..]].concat())
        .collect();
    assert_cells_equal(
        &parse_value::<Vec<Vec<Value>>>(&run["cells"]),
        &expected,
        "level 80",
    );

    // 7. An exhausted balance: the gateway's 402 shows in the cell, nothing is charged.
    let jobs = app.get_as::<JobPage>(&key, "/v1/jobs").await.jobs.len();
    spend_everything(&app, account).await;
    let run = calc
        .call(json!({"cmd": "run", "sheet": "Big", "formula": format!("=XPAND.FORECAST(A1:X10;{HORIZON})"),
                     "target": "BX1:CI10", "timeout": 20}))
        .await;
    let cells: Vec<Vec<Value>> = parse_value(&run["cells"]);
    // The same job over REST, as the formula sends it (its default max_fee).
    let refused = app
        .post_json(
            &key,
            "/v1/jobs",
            &json!({"kind": "forecast", "input": {"series": &big[..10]},
                    "params": {"horizon": HORIZON}, "max_fee": 10_000_000}),
        )
        .await;
    assert_eq!(refused.status(), 402);
    let refused = problem(refused).await;
    assert_eq!(
        cells[0][0],
        format!("#XPAND! {} (402)", refused.detail),
        "{run}"
    );
    assert!(
        refused.detail.starts_with("the job costs "),
        "{}",
        refused.detail
    );
    assert!(cells.iter().flatten().skip(1).all(|v| v == ""), "{run}");
    assert_eq!(app.balances(&key).await, (0, 0), "nothing is charged");
    let page: JobPage = app.get_as(&key, "/v1/jobs").await;
    assert_eq!(page.jobs.len(), jobs, "no job");
    println!(
        "calc: an exhausted balance: the 402 shown {} after entering the formula",
        seconds(&run["last_s"])
    );
    //    Topped up, the same formula entered again (a second later) runs.
    let mut tx = app.db.begin().await.unwrap();
    xpand::ledger::deposit(&mut tx, account, credit, "test: top up")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let run = calc
        .call(json!({"cmd": "run", "sheet": "Big", "formula": format!("=XPAND.FORECAST(A1:X10;{HORIZON})"),
                     "target": "BX1:CI10", "timeout": 20}))
        .await;
    assert_eq!(run["timed_out"], false, "{}", run["cells"][0]);
    let cells: Vec<Vec<Value>> = parse_value(&run["cells"]);
    assert!(cells.iter().flatten().all(Value::is_number), "{run}");
    let page: JobPage = app.get_as(&key, "/v1/jobs").await;
    assert_eq!(page.jobs.len(), jobs + 1, "one job once paid for");

    calc.quit().await;
    app.assert_ledger_invariants().await;
    app.teardown().await;
}
