//! `--mode rest`: each client submits a job with `POST /v1/jobs`, follows it to its end (SSE,
//! polling, or the submit's own answer with `Prefer: wait`), and repeats until the budget runs
//! out. With `--rate`, jobs start on a fixed schedule instead ([`open_loop`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::time::timeout_at;

use crate::api::{describe, ok_or_problem, Job, ServerEvent};
use crate::cli::Follow;
use crate::harness::Harness;
use crate::sse::SseDecoder;
use crate::stats::Outcome;

pub async fn client(h: Arc<Harness>, follow: Follow, poll_every: Duration) {
    while let Some(seq) = h.budget.take() {
        let started = Instant::now();
        if let Some(outcome) = run_job(&h, seq, started, follow, poll_every).await {
            h.stats.finished(outcome, started.elapsed());
        }
    }
}

/// Starts a job every `1 / rate` seconds until the budget runs out, each followed to its end
/// on its own task, and times each from when it was scheduled to start: if the gateway, or
/// this process, falls behind, the wait is in the latencies (no coordinated omission). An
/// arrival while `most` jobs are outstanding is counted as an `overloaded` error at once.
pub async fn open_loop(
    h: Arc<Harness>,
    rate: f64,
    most: u64,
    follow: Follow,
    poll_every: Duration,
) {
    let start = tokio::time::Instant::now();
    let mut jobs = tokio::task::JoinSet::new();
    let mut arrival = 0u64;
    while let Some(seq) = h.budget.take() {
        let due = start + Duration::from_secs_f64(arrival as f64 / rate);
        arrival += 1;
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = h.budget.stopped() => break,
        }
        while let Some(joined) = jobs.try_join_next() {
            if let Err(e) = joined {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
        if jobs.len() as u64 >= most {
            let detail = format!("{most} jobs outstanding: the gateway fell behind the rate");
            h.stats
                .finished(Outcome::error("overloaded", detail), Duration::ZERO);
            continue;
        }
        let (h, scheduled) = (Arc::clone(&h), due.into_std());
        jobs.spawn(async move {
            if let Some(outcome) = run_job(&h, seq, scheduled, follow, poll_every).await {
                h.stats.finished(outcome, scheduled.elapsed());
            }
        });
    }
    while let Some(joined) = jobs.join_next().await {
        if let Err(e) = joined {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
}

/// Submits job `seq` and follows it to its end, within `--job-timeout` of `started`; `None`
/// when the run was stopped meanwhile (the job is then canceled, and not counted).
async fn run_job(
    h: &Harness,
    seq: u64,
    started: Instant,
    follow: Follow,
    poll_every: Duration,
) -> Option<Outcome> {
    let deadline = (started + h.job_timeout).into();
    let job = match timeout_at(deadline, submit(h, seq, follow == Follow::Wait)).await {
        Ok(Ok(job)) => job,
        Ok(Err(outcome)) => return Some(outcome),
        Err(_) => return Some(Outcome::timed_out(h.job_timeout)),
    };
    h.stats.accepted(started.elapsed());
    if let Some(outcome) = job.outcome() {
        return Some(outcome);
    }
    let following = async {
        match follow {
            Follow::Sse | Follow::Wait => follow_events(h, &job.id).await,
            Follow::Poll => poll(h, &job.id, poll_every).await,
        }
    };
    tokio::select! {
        ended = timeout_at(deadline, following) => match ended {
            Ok(Ok(outcome) | Err(outcome)) => Some(outcome),
            Err(_) => {
                h.gateway.cancel(&job.id).await;
                Some(Outcome::timed_out(h.job_timeout))
            }
        },
        _ = h.budget.stopped() => {
            h.gateway.cancel(&job.id).await;
            None
        }
    }
}

// Below, both sides of a result are outcomes: `Err` for the ways a job can go wrong before
// it ends, so they short-circuit with `?`.

async fn submit(h: &Harness, seq: u64, wait: bool) -> Result<Job, Outcome> {
    let mut request = h.gateway.submit(h.workload.body(seq));
    if wait {
        request = request.header("prefer", "wait");
    }
    let resp = request.send().await.map_err(transport("submit"))?;
    ok_or_problem(resp)
        .await?
        .json()
        .await
        .map_err(transport("submit"))
}

/// Reads `GET /v1/jobs/{id}/events` until a terminal event, counting `partial`s on the way.
async fn follow_events(h: &Harness, id: &str) -> Result<Outcome, Outcome> {
    let resp = h
        .gateway
        .job_events(id)
        .send()
        .await
        .map_err(transport("events"))?;
    let resp = ok_or_problem(resp)
        .await
        .map_err(|p| Outcome::error("events", p.to_string()))?;
    let mut body = resp.bytes_stream();
    let mut sse = SseDecoder::default();
    while let Some(chunk) = body.next().await {
        for data in sse.push(&chunk.map_err(transport("events"))?) {
            let event: ServerEvent = serde_json::from_str(&data)
                .map_err(|e| Outcome::error("events", format!("undecodable event: {e}")))?;
            if let ServerEvent::Partial {} = event {
                h.stats.partial();
            } else if let Some((_, outcome)) = event.end() {
                return Ok(outcome);
            }
        }
    }
    Err(Outcome::error(
        "events",
        "the stream ended before the job did",
    ))
}

/// Polls `GET /v1/jobs/{id}` until the job has ended.
async fn poll(h: &Harness, id: &str, every: Duration) -> Result<Outcome, Outcome> {
    loop {
        tokio::time::sleep(every).await;
        let resp = h.gateway.job(id).send().await.map_err(transport("poll"))?;
        let job: Job = ok_or_problem(resp)
            .await
            .map_err(|p| Outcome::error("poll", p.to_string()))?
            .json()
            .await
            .map_err(transport("poll"))?;
        if let Some(outcome) = job.outcome() {
            return Ok(outcome);
        }
    }
}

fn transport(label: &'static str) -> impl Fn(reqwest::Error) -> Outcome {
    move |e| Outcome::error(label, describe(&e))
}
