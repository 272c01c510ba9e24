//! The user commands of the `xpand` binary (`xpand jobs …`, `xpand files …`, `xpand models …`,
//! `xpand account`), shaped after GitHub's `gh`: a compact summary or table for people by
//! default, `--json` for scripts (the API's JSON and nothing else on stdout; progress and notes
//! on stderr), and exit codes a script can branch on ([`exit`]).
//!
//! They are a client of a running gateway's public HTTP API and nothing more: they name nothing
//! of the rest of this crate (no domain type, no database), so they can do nothing a `curl`
//! could not, and `tests/it/architecture.rs` holds them to that. This file holds what every
//! command shares: the options, the credentials, the HTTP client, how a refusal is reported and
//! which exit code it gives, tables and progress.

/// `println!` for the commands' output: a reader that stops early (`xpand jobs list | head -1`)
/// ends the command quietly, where `println!` would panic on the broken pipe.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::write_line(format_args!($($arg)*))
    };
}

pub mod account;
pub mod files;
pub mod jobs;
pub mod models;

use std::io::IsTerminal;
use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;

/// The exit codes of the user commands (clap's usage errors exit 2 as well).
pub mod exit {
    /// Done.
    pub const OK: i32 = 0;
    /// Anything else: the gateway unreachable, a 404 or 409, a server error.
    pub const ERROR: i32 = 1;
    /// Usage: a bad flag or argument (clap), or `--params`/`--input` that is not JSON.
    pub const USAGE: i32 = 2;
    /// The job ended `failed` or `canceled` (`jobs submit --wait`, `jobs watch`).
    pub const JOB_NOT_SUCCEEDED: i32 = 3;
    /// No credentials, or the gateway refused them: 401, or 403 for a missing scope.
    pub const AUTH: i32 = 4;
    /// The request was invalid: 422 (each field named on stderr), 400, 413.
    pub const INVALID: i32 = 5;
    /// Money or quota: 402 (insufficient funds, `--max-fee` below the quote), or the 403 of a
    /// storage quota.
    pub const PAYMENT: i32 = 6;
}

/// The exit codes as `--help` shows them (and docs/cli.md explains).
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  done
  1  error (gateway unreachable, not found, conflict, server error)
  2  usage (bad flag or argument; --params or --input not JSON)
  3  the job ended failed or canceled (jobs submit --wait, jobs watch)
  4  authentication: no API key, or the gateway refused it (401, 403)
  5  invalid request (422: each field is named on stderr; 400, 413)
  6  payment or quota (402: insufficient funds, --max-fee below the quote; storage quota)

Credentials: XPAND_API_KEY, else the file .xpand/dev-api-key (written by `xpand up`).
Gateway: --url or XPAND_URL (default http://127.0.0.1:8080).";

/// The options every user command takes.
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// The gateway's base URL.
    #[arg(
        long,
        env = "XPAND_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// Print the API's JSON on stdout, and nothing else (notes and progress go to stderr).
    #[arg(long, global = true)]
    pub json: bool,
}

/// Why a command stopped: what to tell the user, and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// A problem document (RFC 9457) the gateway answered with `status`: its title, detail and
    /// each field error, one a line, with the exit code its status maps to.
    pub fn problem(status: StatusCode, body: &str) -> Self {
        let problem: Option<Value> = serde_json::from_str(body).ok();
        let Some(problem) = problem.filter(|p| p.get("title").is_some()) else {
            let text = body.trim();
            let text = if text.is_empty() {
                status.canonical_reason().unwrap_or("no detail").to_string()
            } else {
                text.chars().take(500).collect()
            };
            return Self::new(
                code_for(status, ""),
                format!("HTTP {}: {text}", status.as_u16()),
            );
        };
        let s = |k: &str| problem.get(k).and_then(Value::as_str).unwrap_or_default();
        let mut message = format!("{} ({}): {}", s("title"), status.as_u16(), s("detail"));
        // A validation problem's detail repeats its fields: say them once, one a line.
        if let Some(errors) = problem.get("errors").and_then(Value::as_array) {
            if !errors.is_empty() {
                message = format!("{} ({})", s("title"), status.as_u16());
                for e in errors {
                    let f = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or_default();
                    message.push_str(&format!("\n  {}: {}", f("field"), f("detail")));
                }
            }
        }
        Self::new(code_for(status, s("type")), message)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The exit code of a refusal with `status` and problem `type`.
fn code_for(status: StatusCode, problem_type: &str) -> i32 {
    match status.as_u16() {
        402 => exit::PAYMENT,
        403 if problem_type.ends_with("/quota-exceeded") => exit::PAYMENT,
        401 | 403 => exit::AUTH,
        400 | 413 | 422 => exit::INVALID,
        _ => exit::ERROR,
    }
}

pub type CliResult<T> = Result<T, Failure>;

/// Runs one command to its end and gives the process's exit code; what failed is on stderr.
pub async fn run(command: impl std::future::Future<Output = CliResult<()>>) -> i32 {
    match command.await {
        Ok(()) => exit::OK,
        Err(failure) => {
            if !failure.message.is_empty() {
                eprintln!("xpand: {}", failure.message);
            }
            failure.code
        }
    }
}

/// The API key: `XPAND_API_KEY`, else `.xpand/dev-api-key` (what `xpand up` writes).
fn api_key() -> CliResult<String> {
    if let Ok(key) = std::env::var("XPAND_API_KEY") {
        if !key.trim().is_empty() {
            return Ok(key.trim().to_string());
        }
    }
    match std::fs::read_to_string(".xpand/dev-api-key") {
        Ok(key) if !key.trim().is_empty() => Ok(key.trim().to_string()),
        _ => Err(Failure::new(
            exit::AUTH,
            "no API key: set XPAND_API_KEY, or run `xpand up` in this directory \
             (it writes .xpand/dev-api-key)",
        )),
    }
}

/// A gateway and the API key to call it with.
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
    /// Print `--json` output instead of the human one.
    pub json: bool,
}

impl Client {
    pub fn new(common: &Common) -> CliResult<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("xpand-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Failure::new(exit::ERROR, format!("building the HTTP client: {e}")))?;
        Ok(Self {
            http,
            base: common.url.trim_end_matches('/').to_string(),
            key: api_key()?,
            json: common.json,
        })
    }

    /// A request to `path` (from `/v1/…`) carrying the API key.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key)
    }

    /// Sends `request`; a refusal becomes the [`Failure`] its problem document describes.
    pub async fn send(&self, request: RequestBuilder) -> CliResult<Response> {
        let response = request.send().await.map_err(|e| self.unreachable(e))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        Err(Failure::problem(status, &body))
    }

    /// Sends `request` and reads its JSON answer.
    pub async fn json(&self, request: RequestBuilder) -> CliResult<Value> {
        let response = self.send(request).await?;
        response
            .json()
            .await
            .map_err(|e| Failure::new(exit::ERROR, format!("reading the gateway's answer: {e}")))
    }

    pub async fn get(&self, path: &str) -> CliResult<Value> {
        self.json(self.request(Method::GET, path)).await
    }

    pub fn unreachable(&self, e: reqwest::Error) -> Failure {
        let e = error_chain(&e);
        Failure::new(
            exit::ERROR,
            format!(
                "cannot reach the gateway at {}: {e} (is it running? `xpand up` starts one; \
                 XPAND_URL or --url names another)",
                self.base
            ),
        )
    }

    /// Prints `value` as `--json` output: the API's JSON, pretty, on stdout.
    pub fn print_json(&self, value: &Value) {
        outln!(
            "{}",
            serde_json::to_string_pretty(value).expect("JSON values serialize")
        );
    }
}

#[doc(hidden)]
pub fn write_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        // Nobody reads any more: what was asked for has been given.
        std::process::exit(exit::OK);
    }
}

/// An error with its causes, `a: b: c`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

/// A JSON value's field as text for a table: strings bare, null as `-`.
pub fn cell(value: &Value, key: &str) -> String {
    match value.get(key) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// A timestamp shortened for a table: `2026-05-01 12:03:04` (UTC).
pub fn short_time(value: &Value, key: &str) -> String {
    let text = cell(value, key);
    match text.get(..19) {
        Some(head) if text.len() > 19 => head.replace('T', " "),
        _ => text,
    }
}

/// Prints rows as `gh` does: on a terminal aligned columns under a header; otherwise
/// tab-separated, with no header, for `cut` and `awk`.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    if !std::io::stdout().is_terminal() {
        for row in rows {
            outln!("{}", row.join("\t"));
        }
        return;
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  "));
            }
        }
        outln!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Whether to draw progress bars: only when stderr is a terminal.
pub fn progress_on_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// A byte-count progress bar on stderr for `len` bytes (a spinner when unknown), or none when
/// stderr is not a terminal.
pub fn byte_bar(len: Option<u64>, what: &str) -> Option<indicatif::ProgressBar> {
    if !progress_on_terminal() {
        return None;
    }
    let bar = match len {
        Some(len) => indicatif::ProgressBar::new(len).with_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        ),
        None => indicatif::ProgressBar::new_spinner().with_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} {bytes} {bytes_per_sec}")
                .expect("a valid template"),
        ),
    };
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar.set_message(what.to_string());
    Some(bar)
}
