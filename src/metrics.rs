//! Prometheus metrics, registered once per application (tests run many apps in one process,
//! so nothing here is global).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    /// Jobs by status, refreshed from Postgres at each scrape (so every replica reports the truth).
    pub jobs: IntGaugeVec,
    pub job_transitions: IntCounterVec,
    pub shard_latency: HistogramVec,
    pub worker_messages: IntCounterVec,
    pub rejected_messages: IntCounterVec,
    pub dispatched_shards: IntCounterVec,
    /// Held results accepted without a second run (no node could check them in time).
    pub unverified_shards: IntCounterVec,
    /// Results settled per transaction: how much settling in batches saves.
    pub result_batch_size: Histogram,
    /// Batches that failed as a whole and were settled one result at a time.
    pub result_batches_split: IntCounter,
    /// Ledger entry ids past the last sealed block (entries not sealed yet, and ids a rolled-back
    /// posting skipped), refreshed from Postgres at each scrape.
    pub ledger_unsealed_entries: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("xpand".into()), None).expect("valid prefix");
        let http_requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests by route and status"),
            &["method", "route", "status"],
        )
        .expect("valid metric");
        let http_duration = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP request latency"),
            &["method", "route"],
        )
        .expect("valid metric");
        let jobs = IntGaugeVec::new(Opts::new("jobs", "Jobs by status"), &["status"])
            .expect("valid metric");
        let job_transitions = IntCounterVec::new(
            Opts::new(
                "job_transitions_total",
                "Jobs that reached a status on this replica",
            ),
            &["kind", "status"],
        )
        .expect("valid metric");
        let shard_latency = HistogramVec::new(
            HistogramOpts::new(
                "shard_latency_seconds",
                "From assignment to accepted result",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
            &["kind"],
        )
        .expect("valid metric");
        let worker_messages = IntCounterVec::new(
            Opts::new("worker_messages_total", "Accepted worker messages by kind"),
            &["kind"],
        )
        .expect("valid metric");
        let rejected_messages = IntCounterVec::new(
            Opts::new(
                "rejected_messages_total",
                "Worker messages dropped, by reason (unsigned, bad_signature, stale, replayed, unknown_node, ...)",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let dispatched_shards = IntCounterVec::new(
            Opts::new("dispatched_shards_total", "Shard assignments sent"),
            &["kind"],
        )
        .expect("valid metric");
        let unverified_shards = IntCounterVec::new(
            Opts::new(
                "unverified_shards_total",
                "Held results accepted unchecked: no eligible node ran their replica in time",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let result_batch_size = Histogram::with_opts(
            HistogramOpts::new(
                "result_batch_size",
                "Shard results settled together in one transaction",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
        )
        .expect("valid metric");
        let result_batches_split = IntCounter::new(
            "result_batches_split_total",
            "Batches of results that failed together and were settled one by one",
        )
        .expect("valid metric");
        let ledger_unsealed_entries = IntGauge::new(
            "ledger_unsealed_entries",
            "Ledger entry ids past the last sealed block: entries not sealed yet",
        )
        .expect("valid metric");
        for c in [
            Box::new(http_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(http_duration.clone()),
            Box::new(jobs.clone()),
            Box::new(job_transitions.clone()),
            Box::new(shard_latency.clone()),
            Box::new(worker_messages.clone()),
            Box::new(rejected_messages.clone()),
            Box::new(dispatched_shards.clone()),
            Box::new(unverified_shards.clone()),
            Box::new(result_batch_size.clone()),
            Box::new(result_batches_split.clone()),
            Box::new(ledger_unsealed_entries.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        Self {
            registry,
            http_requests,
            http_duration,
            jobs,
            job_transitions,
            shard_latency,
            worker_messages,
            rejected_messages,
            dispatched_shards,
            unverified_shards,
            result_batch_size,
            result_batches_split,
            ledger_unsealed_entries,
        }
    }

    pub fn reject(&self, reason: &str) {
        self.rejected_messages.with_label_values(&[reason]).inc();
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is utf-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
