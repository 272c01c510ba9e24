//! Command-line flags, and the checks that keep the load on this machine.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use reqwest::Url;

/// Drives `forecast` jobs against a local xpand gateway and reports throughput and latency.
///
/// Start a local network first (`xpand up`, which also writes the dev API key to
/// `.xpand/dev-api-key`), then run this from the repository root. The run stops after `--jobs`
/// submits or `--duration` seconds, whichever comes first, then waits for the jobs still in
/// flight (each at most `--job-timeout` seconds).
#[derive(Debug, Parser)]
#[command(name = "xpand-loadtest", version)]
pub struct Args {
    /// How jobs are submitted and followed: `rest` (POST, then SSE or polling) or `ws`
    /// (one WebSocket carrying many jobs).
    #[arg(long, value_enum, default_value_t = Mode::Rest)]
    pub mode: Mode,

    /// Gateway base URL. Loopback only: the host must be 127.0.0.1, localhost or [::1].
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: Url,

    /// API key [default: the contents of --api-key-file].
    #[arg(long, env = "XPAND_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// File holding the API key, as written by `xpand up`.
    #[arg(long, default_value = ".xpand/dev-api-key")]
    pub api_key_file: PathBuf,

    /// Concurrent clients (rest) or WebSocket connections (ws).
    #[arg(long, short = 'c', default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub concurrency: u32,

    /// Open loop (rest mode): start jobs at this constant rate, per second, whatever the
    /// gateway answers, and time each from its scheduled start, so a stall shows in the
    /// latencies instead of slowing the arrivals (no coordinated omission). `--concurrency`
    /// is then unused.
    #[arg(long, value_parser = positive_rate)]
    pub rate: Option<f64>,

    /// Open loop: the most jobs outstanding at once; an arrival beyond it is counted as an
    /// error (`overloaded`) rather than delayed.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_outstanding: u64,

    /// ws: jobs outstanding per socket.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub in_flight: u32,

    /// rest: follow each job by Server-Sent Events, by polling `GET /v1/jobs/{id}`, or not at
    /// all: `wait` submits with `Prefer: wait`, so the answer to the POST is the finished job
    /// (a job still running when the wait runs out is then followed by SSE).
    #[arg(long, value_enum, default_value_t = Follow::Sse)]
    pub follow: Follow,

    /// rest with `--follow poll`: milliseconds between polls of one job.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub poll_interval_ms: u64,

    /// Stop submitting after this many jobs.
    #[arg(long, short = 'n', default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    pub jobs: u64,

    /// Stop submitting after this many seconds.
    #[arg(long, short = 'd', default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub duration: u64,

    /// Count a job as an error when it has not ended this many seconds after its submit.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub job_timeout: u64,

    /// Rows per job (one series per spreadsheet row).
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..))]
    pub rows: u32,

    /// Observations per row.
    #[arg(long, default_value_t = 48, value_parser = clap::value_parser!(u32).range(1..))]
    pub history: u32,

    /// Values to forecast per row.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(1..))]
    pub horizon: u32,

    /// `max_fee` of each job, in micro-credits. Only the quote is escrowed, so a generous cap
    /// costs nothing.
    #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(i64).range(1..))]
    pub max_fee: i64,

    /// Print the summary as JSON on stdout (the table then goes to stderr).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Rest,
    Ws,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Follow {
    Sse,
    Poll,
    Wait,
}

impl Args {
    /// The API key from `--api-key` / `XPAND_API_KEY`, else from `--api-key-file`.
    pub fn resolve_api_key(&self) -> anyhow::Result<String> {
        let key = match &self.api_key {
            Some(key) => key.trim().to_owned(),
            None => std::fs::read_to_string(&self.api_key_file)
                .with_context(|| {
                    format!(
                        "no --api-key given and {} is unreadable (run `xpand up` first, and \
                         run this from the repository root)",
                        self.api_key_file.display()
                    )
                })?
                .trim()
                .to_owned(),
        };
        if key.is_empty() {
            bail!("the API key is empty");
        }
        Ok(key)
    }
}

fn positive_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 && rate <= 1_000_000.0 => Ok(rate),
        _ => Err("a rate is a number of jobs per second, above 0".into()),
    }
}

/// Refuses any target but a plain-HTTP gateway on this machine: a load generator pointed at
/// someone else's server is an attack.
pub fn ensure_loopback(url: &Url) -> anyhow::Result<()> {
    if url.scheme() != "http" {
        bail!("--url must be a plain http:// URL, got {url}");
    }
    // `Url` normalises hosts (lower-case names, canonical IPv4, compressed IPv6), so spelling
    // tricks like `127.1` or `LOCALHOST` compare as what they mean.
    match url.host_str() {
        Some("127.0.0.1" | "localhost" | "[::1]") => Ok(()),
        _ => bail!("--url must point at this machine (127.0.0.1, localhost or [::1]), got {url}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(url: &str) -> anyhow::Result<()> {
        ensure_loopback(&Url::parse(url).unwrap())
    }

    #[test]
    fn accepts_loopback_hosts() {
        for url in [
            "http://127.0.0.1:8080",
            "http://localhost:8080/",
            "http://LocalHost",
            "http://[::1]:8080",
            "http://[0:0:0:0:0:0:0:1]:8080",
            "http://127.1:8080",
        ] {
            assert!(check(url).is_ok(), "{url}");
        }
    }

    #[test]
    fn refuses_remote_hosts_and_tls() {
        for url in [
            "http://10.0.0.5:8080",
            "http://127.0.0.2:8080",
            "http://example.com",
            "http://localhost.example.com",
            "http://127.0.0.1.nip.io",
            "https://127.0.0.1:8080",
            "ws://127.0.0.1:8080",
        ] {
            assert!(check(url).is_err(), "{url}");
        }
    }

    #[test]
    fn flags_parse() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
