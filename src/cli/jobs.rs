//! `xpand jobs submit|get|watch|cancel|list`: jobs from a terminal or a script, as `gh run`
//! handles workflow runs. A command of its own because following a job is most of the work:
//! `submit` sends an `Idempotency-Key` (fresh per invocation, so a retried request never makes a
//! second job) and `Prefer: wait`; `watch` (and `submit --wait` for a job that outlasts that
//! wait) follows the job's Server-Sent Events, drawing a progress bar on a terminal and plain
//! lines otherwise, and falls back to polling when the stream cannot be held.

use std::time::Duration;

use reqwest::header::{HeaderValue, ACCEPT};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

use super::{cell, exit, print_table, short_time, CliResult, Client, Common, Failure};

#[derive(clap::Args, Debug)]
#[command(after_help = super::EXIT_CODES_HELP)]
pub struct JobsArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: JobsCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum JobsCommand {
    /// Submit a job; with --wait, print it finished.
    #[command(after_help = super::EXIT_CODES_HELP)]
    Submit(SubmitArgs),
    /// Show one job.
    Get { id: Uuid },
    /// Follow a job live until it ends, then print it (exit 3 if it failed or was canceled).
    #[command(after_help = super::EXIT_CODES_HELP)]
    Watch { id: Uuid },
    /// Cancel a job: nodes are paid for the shards already done, the rest is refunded.
    Cancel { id: Uuid },
    /// List your jobs, newest first.
    List(ListArgs),
}

#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    /// The job kind: `forecast`, `anonymize` or `predict`.
    #[arg(long)]
    pub kind: String,
    /// A JSON file holding the job's input (`-`: standard input). forecast:
    /// `{"series": [[112, 118, ...], ...]}`, one array per spreadsheet row; anonymize:
    /// `{"file": "<id from xpand files upload>"}`; predict: `{"model": "<name>", "inputs":
    /// [{"name", "datatype", "shape", "data"}]}` (the Open Inference Protocol's request).
    #[arg(long, value_name = "FILE")]
    pub input: String,
    /// The job's parameters as JSON, e.g. `{"horizon": 6}` (forecast) or `{"style": "blur"}`.
    #[arg(long, value_name = "JSON")]
    pub params: Option<String>,
    /// The most you agree to pay, in micro-credits; a job quoted higher is refused (exit 6).
    #[arg(long, default_value_t = 1_000_000)]
    pub max_fee: i64,
    /// Wait for the job to end, following its progress, and print it finished (exit 3 if it
    /// failed or was canceled).
    #[arg(long)]
    pub wait: bool,
    /// Send this Idempotency-Key (default: a fresh one per invocation): a submission repeated
    /// with the same key returns the first one's job and charges nothing more.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// Cancel the job if it is still unfinished at this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub deadline: Option<String>,
    /// A URL told of the job when it ends (Standard Webhooks, signed; see docs/api.md).
    #[arg(long, value_name = "URL")]
    pub webhook: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Only jobs in this status.
    #[arg(long, value_parser = ["queued", "running", "succeeded", "failed", "canceled"])]
    pub status: Option<String>,
    /// Only jobs of this kind.
    #[arg(long)]
    pub kind: Option<String>,
    /// The most jobs to list (pages are fetched as needed).
    #[arg(long, short = 'L', default_value_t = 30)]
    pub limit: usize,
}

pub async fn run(args: JobsArgs) -> CliResult<()> {
    let client = Client::new(&args.common)?;
    match args.command {
        JobsCommand::Submit(submit) => self::submit(&client, submit).await,
        JobsCommand::Get { id } => {
            let job = client.get(&format!("/v1/jobs/{id}")).await?;
            print_job(&client, &job);
            Ok(())
        }
        JobsCommand::Watch { id } => {
            let job = follow(&client, id).await?;
            finished(&client, &job)
        }
        JobsCommand::Cancel { id } => {
            let job = client
                .json(client.request(Method::POST, &format!("/v1/jobs/{id}/cancel")))
                .await?;
            print_job(&client, &job);
            Ok(())
        }
        JobsCommand::List(list) => self::list(&client, list).await,
    }
}

/// Reads `--input`: a file, or standard input for `-`.
fn read_input(path: &str) -> CliResult<Value> {
    let text = if path == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| Failure::new(exit::USAGE, format!("reading standard input: {e}")))?;
        text
    } else {
        std::fs::read_to_string(path)
            .map_err(|e| Failure::new(exit::USAGE, format!("reading --input {path}: {e}")))?
    };
    serde_json::from_str(&text).map_err(|e| {
        let what = if path == "-" { "standard input" } else { path };
        Failure::new(exit::USAGE, format!("--input {what} is not JSON: {e}"))
    })
}

async fn submit(client: &Client, args: SubmitArgs) -> CliResult<()> {
    let input = read_input(&args.input)?;
    let params: Value = match &args.params {
        None => json!({}),
        Some(text) => serde_json::from_str(text)
            .map_err(|e| Failure::new(exit::USAGE, format!("--params is not JSON: {e}")))?,
    };
    let mut body = json!({
        "kind": args.kind,
        "input": input,
        "params": params,
        "max_fee": args.max_fee,
    });
    if let Some(deadline) = &args.deadline {
        body["deadline"] = json!(deadline);
    }
    if let Some(webhook) = &args.webhook {
        body["webhook"] = json!(webhook);
    }
    let key = args
        .idempotency_key
        .clone()
        .unwrap_or_else(|| format!("xpand-cli-{}", Uuid::new_v4()));
    let key = HeaderValue::from_str(&key).map_err(|_| {
        Failure::new(
            exit::USAGE,
            "--idempotency-key must be visible ASCII characters",
        )
    })?;
    // On a terminal a job that takes a while is followed with a progress bar; a script may
    // as well have the gateway hold the answer for the full minute.
    let wait = if super::progress_on_terminal() { 2 } else { 60 };
    // The same key on every try: a request that reached the gateway before the connection
    // broke answers with its job the second time instead of making another.
    let mut tries = 0;
    let job = loop {
        tries += 1;
        let mut request = client
            .request(Method::POST, "/v1/jobs")
            .header("Idempotency-Key", key.clone())
            .json(&body);
        if args.wait {
            request = request.header("Prefer", format!("wait={wait}"));
        }
        match request.send().await {
            Err(e) if tries < 3 && (e.is_connect() || e.is_timeout() || e.is_request()) => {}
            Err(e) => return Err(client.unreachable(e)),
            Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE && tries < 3 => {}
            Ok(r) if r.status().is_success() => {
                break r.json::<Value>().await.map_err(|e| {
                    Failure::new(exit::ERROR, format!("reading the submitted job: {e}"))
                })?;
            }
            Ok(r) => {
                let status = r.status();
                return Err(Failure::problem(
                    status,
                    &r.text().await.unwrap_or_default(),
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(500 * tries)).await;
    };
    if !args.wait {
        print_job(client, &job);
        if !client.json {
            eprintln!("follow it with: xpand jobs watch {}", cell(&job, "id"));
        }
        return Ok(());
    }
    let job = if is_terminal(&job) {
        job
    } else {
        let id = job_id(&job)?;
        follow(client, id).await?
    };
    finished(client, &job)
}

/// Prints a job that has ended; one that did not succeed is exit code 3.
fn finished(client: &Client, job: &Value) -> CliResult<()> {
    print_job(client, job);
    match cell(job, "status").as_str() {
        "succeeded" => Ok(()),
        status => {
            let why = match job.get("error") {
                Some(e) if !e.is_null() => format!(": {}: {}", cell(e, "code"), cell(e, "message")),
                _ => String::new(),
            };
            Err(Failure::new(
                exit::JOB_NOT_SUCCEEDED,
                format!("job {} {status}{why}", cell(job, "id")),
            ))
        }
    }
}

fn job_id(job: &Value) -> CliResult<Uuid> {
    cell(job, "id").parse().map_err(|_| {
        Failure::new(
            exit::ERROR,
            format!("the gateway sent a job without an id: {job}"),
        )
    })
}

fn is_terminal(job: &Value) -> bool {
    matches!(
        cell(job, "status").as_str(),
        "succeeded" | "failed" | "canceled"
    )
}

/// Follows job `id` until it ends and returns it as it ended: its event stream, reconnected
/// when it drops; polling when no stream can be held (the account's streams all open).
async fn follow(client: &Client, id: Uuid) -> CliResult<Value> {
    let mut progress = Progress::new(id);
    let mut drops = 0;
    let job = loop {
        let request = client
            .request(Method::GET, &format!("/v1/jobs/{id}/events"))
            .header(ACCEPT, "text/event-stream");
        match request.send().await {
            Ok(r) if r.status() == StatusCode::TOO_MANY_REQUESTS => {
                break poll(client, id, &mut progress).await?;
            }
            Ok(r) if !r.status().is_success() => {
                let status = r.status();
                progress.clear();
                return Err(Failure::problem(
                    status,
                    &r.text().await.unwrap_or_default(),
                ));
            }
            Ok(r) => match read_events(r, &mut progress).await {
                Ok(Some(job)) => break job,
                // The stream ended before the job did (a gateway replica stopping): reconnect;
                // the first event of a new stream is the job's state then.
                Ok(None) => {}
                Err(failure) => {
                    progress.clear();
                    return Err(failure);
                }
            },
            Err(e) if drops >= 3 => {
                progress.clear();
                return Err(client.unreachable(e));
            }
            Err(_) => {}
        }
        drops += 1;
        if drops > 3 {
            break poll(client, id, &mut progress).await?;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    progress.done(&job);
    Ok(job)
}

/// Reads one event stream: the ended job, or `None` if the stream ended first.
async fn read_events(
    mut response: reqwest::Response,
    progress: &mut Progress,
) -> CliResult<Option<Value>> {
    let mut buffer: Vec<u8> = Vec::new();
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) | Err(_) => return Ok(None),
        };
        buffer.extend_from_slice(&chunk);
        while let Some(end) = find_blank_line(&buffer) {
            let block: Vec<u8> = buffer.drain(..end.0 + end.1).collect();
            let block = String::from_utf8_lossy(&block[..end.0]).into_owned();
            let (event, data) = parse_event(&block);
            let Some(event) = event else { continue };
            let data: Value = match serde_json::from_str(&data) {
                Ok(data) => data,
                Err(_) => continue,
            };
            match event.as_str() {
                "progress" => progress.update(
                    &cell(&data, "status"),
                    data["shards_done"].as_u64().unwrap_or(0),
                    data["shards_total"].as_u64().unwrap_or(0),
                ),
                "succeeded" | "failed" | "canceled" => return Ok(Some(data["job"].clone())),
                // The stream's credential ended (key revoked): the problem says which.
                "error" => {
                    let status = data["status"]
                        .as_u64()
                        .and_then(|s| StatusCode::from_u16(s as u16).ok())
                        .unwrap_or(StatusCode::UNAUTHORIZED);
                    return Err(Failure::problem(status, &data.to_string()));
                }
                _ => {}
            }
        }
    }
}

/// Where the first event of `buffer` ends: its length and the blank line's.
fn find_blank_line(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = buffer
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|at| (at, 2));
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| (at, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// An SSE block's `event` name and its `data` lines joined (comments and ids ignored).
fn parse_event(block: &str) -> (Option<String>, String) {
    let mut event = None;
    let mut data: Vec<&str> = Vec::new();
    for line in block.lines() {
        let line = line.trim_end_matches('\r');
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event = Some(value.to_string()),
            "data" => data.push(value),
            _ => {}
        }
    }
    (event, data.join("\n"))
}

/// Follows job `id` by reading it every half second until it ends.
async fn poll(client: &Client, id: Uuid, progress: &mut Progress) -> CliResult<Value> {
    let mut failures = 0;
    loop {
        match client.get(&format!("/v1/jobs/{id}")).await {
            Ok(job) => {
                failures = 0;
                if is_terminal(&job) {
                    return Ok(job);
                }
                progress.update(
                    &cell(&job, "status"),
                    job["progress"]["shards_done"].as_u64().unwrap_or(0),
                    job["progress"]["shards_total"].as_u64().unwrap_or(0),
                );
            }
            // The gateway unreachable for a moment (restarting): keep trying for a while.
            Err(f) if f.code == exit::ERROR && failures < 20 => failures += 1,
            Err(f) => {
                progress.clear();
                return Err(f);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A job's progress on stderr: a bar on a terminal, a line per change otherwise.
struct Progress {
    id: Uuid,
    bar: Option<indicatif::ProgressBar>,
    last: Option<(String, u64, u64)>,
}

impl Progress {
    fn new(id: Uuid) -> Self {
        let bar = super::progress_on_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0).with_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} job {prefix} {msg:9} [{bar:30}] {pos}/{len} shards {elapsed}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_prefix(id.to_string()[..8].to_string());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Self {
            id,
            bar,
            last: None,
        }
    }

    fn update(&mut self, status: &str, done: u64, total: u64) {
        let now = (status.to_string(), done, total);
        if self.last.as_ref() == Some(&now) {
            return;
        }
        match &self.bar {
            Some(bar) => {
                bar.set_length(total);
                bar.set_position(done);
                bar.set_message(status.to_string());
            }
            None => eprintln!("job {}: {status}, {done}/{total} shards", self.id),
        }
        self.last = Some(now);
    }

    fn done(&mut self, job: &Value) {
        let progress = &job["progress"];
        self.update(
            &cell(job, "status"),
            progress["shards_done"].as_u64().unwrap_or(0),
            progress["shards_total"].as_u64().unwrap_or(0),
        );
        if let Some(bar) = self.bar.take() {
            bar.finish();
            // The finished bar stays; what follows starts below it.
            eprintln!();
        }
    }

    fn clear(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

async fn list(client: &Client, args: ListArgs) -> CliResult<()> {
    let mut jobs: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    while jobs.len() < args.limit {
        let mut query: Vec<(&str, String)> =
            vec![("limit", (args.limit - jobs.len()).min(100).to_string())];
        if let Some(status) = &args.status {
            query.push(("status", status.clone()));
        }
        if let Some(kind) = &args.kind {
            query.push(("kind", kind.clone()));
        }
        if let Some(cursor) = &cursor {
            query.push(("cursor", cursor.clone()));
        }
        let page = client
            .json(client.request(Method::GET, "/v1/jobs").query(&query))
            .await?;
        jobs.extend(page["jobs"].as_array().cloned().unwrap_or_default());
        cursor = page["next_cursor"].as_str().map(str::to_owned);
        if cursor.is_none() {
            break;
        }
    }
    jobs.truncate(args.limit);
    if client.json {
        client.print_json(&json!({ "jobs": jobs, "next_cursor": cursor }));
        return Ok(());
    }
    if jobs.is_empty() {
        eprintln!("no jobs found");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|job| {
            vec![
                cell(job, "id"),
                cell(job, "status"),
                cell(job, "kind"),
                format!(
                    "{}/{}",
                    cell(&job["progress"], "shards_done"),
                    cell(&job["progress"], "shards_total")
                ),
                cell(job, "cost"),
                short_time(job, "created_at"),
            ]
        })
        .collect();
    print_table(
        &["ID", "STATUS", "KIND", "SHARDS", "COST", "CREATED"],
        &rows,
    );
    if cursor.is_some() {
        eprintln!("more jobs: raise --limit to see them");
    }
    Ok(())
}

/// Prints a job: its JSON with `--json`, else a summary and its output.
pub fn print_job(client: &Client, job: &Value) {
    if client.json {
        client.print_json(job);
        return;
    }
    let progress = &job["progress"];
    let mut lines = vec![
        ("job", cell(job, "id")),
        ("kind", cell(job, "kind")),
        ("status", cell(job, "status")),
        (
            "progress",
            format!(
                "{}/{} shards",
                cell(progress, "shards_done"),
                cell(progress, "shards_total")
            ),
        ),
        ("quote", format!("{} micro-credits", cell(job, "quote"))),
    ];
    if !job["cost"].is_null() {
        lines.push(("cost", format!("{} micro-credits", cell(job, "cost"))));
    }
    lines.push(("created", short_time(job, "created_at")));
    if !job["finished_at"].is_null() {
        lines.push(("finished", short_time(job, "finished_at")));
    }
    if let Some(error) = job.get("error").filter(|e| !e.is_null()) {
        lines.push((
            "error",
            format!("{}: {}", cell(error, "code"), cell(error, "message")),
        ));
    }
    for (name, value) in lines {
        outln!("{name:<9}{value}");
    }
    if let Some(output) = job.get("output").filter(|o| !o.is_null()) {
        print_output(output);
    }
}

/// A job's output: forecast rows one a line, other outputs field by field.
fn print_output(output: &Value) {
    if let Some(rows) = output["forecasts"].as_array() {
        outln!("forecasts (one line per input row; --json for every digit):");
        print_rows(rows);
        for interval in output["intervals"].as_array().into_iter().flatten() {
            let level = cell(interval, "level");
            for side in ["lower", "upper"] {
                outln!("{side} bound, {level} %:");
                print_rows(interval[side].as_array().map_or(&[][..], Vec::as_slice));
            }
        }
        return;
    }
    outln!("output:");
    if let Some(fields) = output.as_object() {
        for (name, value) in fields {
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            outln!("  {name:<17}{text}");
        }
        if let Some(file) = output["file"].as_str() {
            outln!("download it with: xpand files download {file}");
        }
    } else {
        outln!("  {output}");
    }
}

fn print_rows(rows: &[Value]) {
    for row in rows {
        let cells: Vec<String> = match row.as_array() {
            Some(cells) => cells
                .iter()
                .map(|c| match c {
                    Value::Null => "-".into(),
                    Value::Number(n) => n.as_f64().map_or_else(|| n.to_string(), short_number),
                    other => other.to_string(),
                })
                .collect(),
            // A canceled job's row that no shard paid for.
            None => vec!["-".into()],
        };
        outln!("  {}", cells.join(" "));
    }
}

/// A number to six significant digits, without trailing zeros: `137.995` for
/// 137.99484252929688 (`--json` has every digit).
fn short_number(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return x.to_string();
    }
    let decimals = (5 - x.abs().log10().floor() as i32).clamp(0, 12) as usize;
    let text = format!("{x:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn numbers_are_shortened_to_six_digits() {
        assert_eq!(super::short_number(137.99484252929688), "137.995");
        assert_eq!(super::short_number(138.0), "138");
        assert_eq!(super::short_number(-0.00123456789), "-0.00123457");
        assert_eq!(super::short_number(1234567.8), "1234568");
        assert_eq!(super::short_number(0.0), "0");
    }

    use super::*;

    #[test]
    fn events_are_split_and_parsed() {
        let buffer = b"event: progress\ndata: {\"a\":1}\n\n: keep-alive\n\nevent: x";
        let (len, blank) = find_blank_line(buffer).unwrap();
        let block = std::str::from_utf8(&buffer[..len]).unwrap();
        assert_eq!(
            parse_event(block),
            (Some("progress".into()), "{\"a\":1}".into())
        );
        let rest = &buffer[len + blank..];
        let (len, _) = find_blank_line(rest).unwrap();
        assert_eq!(
            parse_event(std::str::from_utf8(&rest[..len]).unwrap()),
            (None, String::new())
        );
        assert!(find_blank_line(b"event: x\r\ndata: 1\r\n\r\n").is_some());
    }
}
