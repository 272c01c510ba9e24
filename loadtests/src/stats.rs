//! Outcomes and latencies, gathered from all clients, and the final summary.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// How one submitted job ended, from the client's point of view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    /// The job ended `failed` (with the gateway's error code) or `canceled`.
    Failed(String),
    /// The submit was refused with a non-2xx status (or a WebSocket `error`).
    Rejected {
        status: u16,
        kind: String,
        detail: String,
    },
    /// Transport trouble, a broken stream, or no end within `--job-timeout`: the label says
    /// which, the detail says what.
    Error {
        label: String,
        detail: String,
    },
}

impl Outcome {
    pub fn error(label: &str, detail: impl Into<String>) -> Self {
        Outcome::Error {
            label: label.to_owned(),
            detail: detail.into(),
        }
    }

    pub fn timed_out(limit: Duration) -> Self {
        Self::error(
            "timed out",
            format!("no end within {} s (--job-timeout)", limit.as_secs()),
        )
    }
}

/// Thread-safe tally; the lock is held for a few counter updates, never across an await.
pub struct Recorder {
    tally: Mutex<Tally>,
}

struct Tally {
    latency_us: Histogram<u64>,
    submit_us: Histogram<u64>,
    ok: u64,
    failed: u64,
    rejected: u64,
    errored: u64,
    partials: u64,
    problems: BTreeMap<String, ProblemCount>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProblemCount {
    pub count: u64,
    /// The first detail seen, as an example.
    pub example: String,
}

impl Recorder {
    pub fn new() -> Self {
        // Microseconds, up to an hour, 3 significant digits.
        let histogram = || Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
        Self {
            tally: Mutex::new(Tally {
                latency_us: histogram(),
                submit_us: histogram(),
                ok: 0,
                failed: 0,
                rejected: 0,
                errored: 0,
                partials: 0,
                problems: BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally
            .lock()
            .expect("no panics while holding the tally")
    }

    /// The gateway accepted a job `took` after the submit began.
    pub fn accepted(&self, took: Duration) {
        self.lock().submit_us.saturating_record(micros(took));
    }

    pub fn partial(&self) {
        self.lock().partials += 1;
    }

    /// Something went wrong outside any one job (e.g. a socket that never connected).
    pub fn problem(&self, label: &str, detail: &str) {
        self.lock().note(label.to_owned(), detail);
    }

    /// A job is over; `took` runs from its submit. Only jobs that reached a terminal state
    /// count towards the latency percentiles.
    pub fn finished(&self, outcome: Outcome, took: Duration) {
        let mut t = self.lock();
        match outcome {
            Outcome::Succeeded => {
                t.ok += 1;
                t.latency_us.saturating_record(micros(took));
            }
            Outcome::Failed(code) => {
                t.failed += 1;
                t.latency_us.saturating_record(micros(took));
                t.note(format!("failed {code}"), "");
            }
            Outcome::Rejected {
                status,
                kind,
                detail,
            } => {
                t.rejected += 1;
                t.note(format!("rejected {status} {kind}"), &detail);
            }
            Outcome::Error { label, detail } => {
                t.errored += 1;
                t.note(format!("error {label}"), &detail);
            }
        }
    }

    /// Jobs over so far: (succeeded, all however they ended).
    pub fn progress(&self) -> (u64, u64) {
        let t = self.lock();
        (t.ok, t.ok + t.failed + t.rejected + t.errored)
    }

    pub fn summary(&self, setup: Setup, wall: Duration, interrupted: bool) -> Summary {
        let t = self.lock();
        let secs = wall.as_secs_f64().max(1e-9);
        let jobs_per_second = t.ok as f64 / secs;
        Summary {
            rows_per_second: jobs_per_second * f64::from(setup.rows),
            setup,
            jobs_ok: t.ok,
            jobs_failed: t.failed,
            jobs_rejected: t.rejected,
            jobs_errored: t.errored,
            partial_events: t.partials,
            wall_seconds: wall.as_secs_f64(),
            jobs_per_second,
            latency_ms: Percentiles::of(&t.latency_us),
            submit_ms: Percentiles::of(&t.submit_us),
            problems: t.problems.clone(),
            interrupted,
        }
    }
}

impl Tally {
    fn note(&mut self, label: String, detail: &str) {
        self.problems
            .entry(label)
            .or_insert_with(|| ProblemCount {
                count: 0,
                example: detail.to_owned(),
            })
            .count += 1;
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// What was run, echoed in the summary so results can be compared.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    pub mode: &'static str,
    /// `sse` or `poll` for rest; absent for ws.
    pub follow: Option<&'static str>,
    pub concurrency: u32,
    /// Open loop: the arrival rate, jobs per second (latencies count from scheduled starts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Jobs outstanding per socket (ws only).
    pub in_flight: Option<u32>,
    pub rows: u32,
    pub history: u32,
    pub horizon: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    #[serde(rename = "p99_9")]
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Option<Self> {
        let ms = |us: u64| us as f64 / 1000.0;
        (!h.is_empty()).then(|| Percentiles {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        })
    }
}

/// The machine-readable result (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    #[serde(flatten)]
    pub setup: Setup,
    pub jobs_ok: u64,
    /// Jobs that ended `failed` or `canceled`.
    pub jobs_failed: u64,
    /// Submits the gateway refused (non-2xx, or a WebSocket `error`).
    pub jobs_rejected: u64,
    /// Transport errors, broken streams, and jobs past `--job-timeout`.
    pub jobs_errored: u64,
    pub partial_events: u64,
    pub wall_seconds: f64,
    /// Succeeded jobs per second of wall time.
    pub jobs_per_second: f64,
    /// Rows forecast (succeeded jobs × rows) per second.
    pub rows_per_second: f64,
    /// Submit to terminal event (succeeded, failed or canceled).
    pub latency_ms: Option<Percentiles>,
    /// Submit to the gateway's acceptance (201, or the WebSocket `accepted`).
    pub submit_ms: Option<Percentiles>,
    /// What went wrong, by label, e.g. `rejected 402 insufficient-funds`.
    pub problems: BTreeMap<String, ProblemCount>,
    /// Stopped early by Ctrl-C; the jobs then in flight were canceled and are not counted.
    pub interrupted: bool,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.setup;
        let how = match (s.in_flight, s.follow, s.rate) {
            (_, follow, Some(rate)) => format!(
                "open loop at {rate} jobs/s, timed from scheduled starts, follow by {}",
                follow.unwrap_or("-")
            ),
            (Some(n), _, None) => format!("{} sockets x {n} in flight", s.concurrency),
            (None, follow, None) => format!(
                "{} clients, follow by {}",
                s.concurrency,
                follow.unwrap_or("-")
            ),
        };
        writeln!(f, "mode         {} ({how})", s.mode)?;
        writeln!(
            f,
            "job          forecast, {} rows x {} values, horizon {}",
            s.rows, s.history, s.horizon
        )?;
        writeln!(
            f,
            "jobs         {} ok, {} failed, {} rejected, {} errors{}",
            self.jobs_ok,
            self.jobs_failed,
            self.jobs_rejected,
            self.jobs_errored,
            if self.interrupted {
                " (interrupted)"
            } else {
                ""
            }
        )?;
        writeln!(f, "partials     {}", self.partial_events)?;
        writeln!(f, "wall         {:.2} s", self.wall_seconds)?;
        writeln!(
            f,
            "throughput   {:.1} jobs/s, {:.0} rows/s",
            self.jobs_per_second, self.rows_per_second
        )?;
        writeln!(
            f,
            "{:<12} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "", "p50", "p90", "p99", "p99.9", "max"
        )?;
        for (name, p) in [
            ("latency ms", &self.latency_ms),
            ("submit ms", &self.submit_ms),
        ] {
            match p {
                Some(p) => writeln!(
                    f,
                    "{name:<12} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                    p.p50, p.p90, p.p99, p.p999, p.max
                )?,
                None => writeln!(f, "{name:<12} {:>9}", "-")?,
            }
        }
        if !self.problems.is_empty() {
            writeln!(f, "problems")?;
            for (label, p) in &self.problems {
                write!(f, "  {:>6}  {label}", p.count)?;
                if !p.example.is_empty() {
                    write!(f, "  (e.g. {})", p.example)?;
                }
                writeln!(f)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> Setup {
        Setup {
            mode: "ws",
            follow: None,
            concurrency: 2,
            rate: None,
            in_flight: Some(4),
            rows: 40,
            history: 48,
            horizon: 12,
        }
    }

    #[test]
    fn tallies_outcomes_and_rates() {
        let r = Recorder::new();
        r.accepted(Duration::from_millis(2));
        r.finished(Outcome::Succeeded, Duration::from_millis(100));
        r.finished(Outcome::Succeeded, Duration::from_millis(300));
        r.finished(
            Outcome::Failed("timed_out".into()),
            Duration::from_millis(200),
        );
        for _ in 0..2 {
            r.finished(
                Outcome::Rejected {
                    status: 402,
                    kind: "insufficient-funds".into(),
                    detail: "broke".into(),
                },
                Duration::from_millis(1),
            );
        }
        r.finished(Outcome::error("timed out", "60 s"), Duration::ZERO);
        r.partial();
        assert_eq!(r.progress(), (2, 6));

        let s = r.summary(setup(), Duration::from_secs(2), false);
        assert_eq!(
            (s.jobs_ok, s.jobs_failed, s.jobs_rejected, s.jobs_errored),
            (2, 1, 2, 1)
        );
        assert_eq!(s.partial_events, 1);
        assert_eq!(s.jobs_per_second, 1.0);
        assert_eq!(s.rows_per_second, 40.0);
        let latency = s.latency_ms.as_ref().unwrap();
        assert!((latency.max - 300.0).abs() < 1.0, "{latency:?}");
        assert!((latency.p50 - 200.0).abs() < 1.0, "{latency:?}");
        let rejected = &s.problems["rejected 402 insufficient-funds"];
        assert_eq!((rejected.count, rejected.example.as_str()), (2, "broke"));
        assert_eq!(s.problems["failed timed_out"].count, 1);
        assert_eq!(s.problems["error timed out"].count, 1);

        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["mode"], "ws");
        assert_eq!(json["jobs_ok"], 2);
        assert!(json["latency_ms"]["p99"].is_number());
        assert!(s
            .to_string()
            .contains("2 ok, 1 failed, 2 rejected, 1 errors"));
    }

    #[test]
    fn empty_run_has_no_percentiles() {
        let s = Recorder::new().summary(setup(), Duration::from_secs(1), true);
        assert!(s.latency_ms.is_none());
        assert!(s.to_string().contains("(interrupted)"));
    }
}
