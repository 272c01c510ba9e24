//! `--mode ws`: each socket keeps up to `--in-flight` jobs outstanding on one `/v1/ws`
//! connection, submitting another as each ends, until the budget runs out.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use reqwest::Url;
use tokio_tungstenite::tungstenite::Message;

use crate::api::{describe, ServerEvent};
use crate::harness::Harness;
use crate::stats::Outcome;

/// How often outstanding jobs are checked against `--job-timeout`.
const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// How long a finished socket waits for the gateway's side of the close handshake.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// The `ref` of our cancel frames, so that their answers are told apart from submits'.
const CANCEL_REF: &str = "cancel";

pub async fn socket(h: Arc<Harness>, url: Url, in_flight: usize) {
    let mut ws = match tokio_tungstenite::connect_async(url.as_str()).await {
        Ok((ws, _)) => ws,
        Err(e) => return h.stats.problem("error ws connect", &describe(&e)),
    };
    let mut jobs = Outstanding::default();
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    let mut submitting = true;
    let mut stopped = false;
    let mut to_cancel = Vec::new();
    loop {
        while submitting && jobs.len() < in_flight {
            let Some(seq) = h.budget.take() else {
                submitting = false;
                break;
            };
            let reference = seq.to_string();
            let frame = h.workload.submit_frame(seq, &reference);
            jobs.pending.insert(reference, Instant::now());
            if let Err(e) = ws.send(Message::text(frame)).await {
                return jobs.fail_all(&h, "ws send", &describe(&e));
            }
        }
        if stopped {
            // Jobs in flight when the run is stopped are canceled, and not counted.
            to_cancel.extend(jobs.running.drain().map(|(id, _)| id));
        }
        // Cancel what we gave up on, so it neither keeps its escrow nor queues ahead of the
        // next run's jobs; the answers are ignored.
        for id in to_cancel.drain(..) {
            let frame = serde_json::json!({"op": "cancel", "ref": CANCEL_REF, "job_id": id});
            if let Err(e) = ws.send(Message::text(frame.to_string())).await {
                return jobs.fail_all(&h, "ws send", &describe(&e));
            }
        }
        if !submitting && jobs.is_empty() {
            break;
        }
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => jobs.handle(&h, &text),
                Some(Ok(Message::Close(frame))) => {
                    let why = frame.map_or_else(String::new, |f| f.reason.to_string());
                    return jobs.fail_all(&h, "ws closed", &why);
                }
                None => return jobs.fail_all(&h, "ws closed", "the connection ended"),
                Some(Err(e)) => return jobs.fail_all(&h, "ws", &describe(&e)),
                // Pings are answered by tungstenite itself.
                Some(Ok(_)) => {}
            },
            _ = sweep.tick() => to_cancel.extend(jobs.expire(&h)),
            _ = h.budget.stopped(), if !stopped => stopped = true,
        }
    }
    // Close with the handshake, reading to the end: the gateway then handles every frame sent
    // before (our cancels included) rather than tripping over a dropped connection.
    let _ = ws.close(None).await;
    let drain = async { while let Some(Ok(_)) = ws.next().await {} };
    let _ = tokio::time::timeout(CLOSE_GRACE, drain).await;
}

/// One socket's jobs that have not ended yet, each with the instant its submit was sent.
#[derive(Default)]
struct Outstanding {
    /// Sent, awaiting `accepted` (or `error`), by client `ref`.
    pending: HashMap<String, Instant>,
    /// Accepted, awaiting a terminal event, by job id.
    running: HashMap<String, Instant>,
}

impl Outstanding {
    fn len(&self) -> usize {
        self.pending.len() + self.running.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn handle(&mut self, h: &Harness, frame: &str) {
        let event = match serde_json::from_str::<ServerEvent>(frame) {
            Ok(event) => event,
            Err(e) => {
                h.stats
                    .problem("error ws frame", &format!("undecodable: {e}"));
                return;
            }
        };
        match event {
            ServerEvent::Accepted {
                reference: Some(r),
                job,
            } => {
                if let Some(sent) = self.pending.remove(&r) {
                    h.stats.accepted(sent.elapsed());
                    self.running.insert(job.id, sent);
                }
            }
            ServerEvent::Error {
                reference: Some(r), ..
            } if r == CANCEL_REF => {}
            ServerEvent::Error { reference, problem } => {
                match reference.and_then(|r| self.pending.remove(&r)) {
                    Some(sent) => h.stats.finished(problem.into(), sent.elapsed()),
                    None => h.stats.problem("error ws", &problem.to_string()),
                }
            }
            ServerEvent::Partial {} => h.stats.partial(),
            event => {
                if let Some((id, outcome)) = event.end() {
                    if let Some(sent) = self.running.remove(id) {
                        h.stats.finished(outcome, sent.elapsed());
                    }
                }
            }
        }
    }

    /// Gives up on jobs older than `--job-timeout` (a late event for one is then ignored);
    /// returns the ids of those the gateway had accepted, to cancel.
    fn expire(&mut self, h: &Harness) -> Vec<String> {
        let timed_out = |sent: &Instant| {
            let late = sent.elapsed() >= h.job_timeout;
            if late {
                h.stats
                    .finished(Outcome::timed_out(h.job_timeout), sent.elapsed());
            }
            late
        };
        self.pending.retain(|_, sent| !timed_out(sent));
        let mut abandoned = Vec::new();
        self.running.retain(|id, sent| {
            let late = timed_out(sent);
            if late {
                abandoned.push(id.clone());
            }
            !late
        });
        abandoned
    }

    /// The socket is gone: every job on it is lost to this client.
    fn fail_all(self, h: &Harness, label: &str, detail: &str) {
        for (_, sent) in self.pending.into_iter().chain(self.running) {
            h.stats
                .finished(Outcome::error(label, detail), sent.elapsed());
        }
    }
}
