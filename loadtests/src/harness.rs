//! What every client shares, and the loop that runs the clients to the end.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::api::Gateway;
use crate::budget::Budget;
use crate::stats::{Recorder, Setup, Summary};
use crate::workload::Workload;

/// How often a progress line goes to stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

pub struct Harness {
    pub gateway: Gateway,
    pub workload: Workload,
    pub budget: Budget,
    pub stats: Recorder,
    pub job_timeout: Duration,
}

impl Harness {
    /// Runs `clients` copies of `client` until all return (the budget runs out, then their
    /// jobs in flight end or time out), and sums up. The first Ctrl-C stops the budget, so
    /// the clients cancel their jobs in flight and return; a second one quits at once.
    pub async fn run<F, Fut>(self: &Arc<Self>, setup: Setup, clients: u32, client: F) -> Summary
    where
        F: Fn(Arc<Self>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let started = Instant::now();
        let mut tasks = JoinSet::new();
        for _ in 0..clients {
            tasks.spawn(client(Arc::clone(self)));
        }
        let mut progress =
            tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
        // One pinned future, renewed after each use, so that no Ctrl-C slips between loops.
        let mut ctrl_c = Box::pin(tokio::signal::ctrl_c());
        let mut interrupted = false;
        loop {
            tokio::select! {
                joined = tasks.join_next() => match joined {
                    Some(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Some(_) => {}
                    None => break,
                },
                _ = progress.tick() => self.report_progress(started.elapsed()),
                _ = &mut ctrl_c => {
                    ctrl_c = Box::pin(tokio::signal::ctrl_c());
                    if interrupted {
                        tasks.abort_all();
                        break;
                    }
                    interrupted = true;
                    eprintln!("stopping: canceling the jobs in flight (Ctrl-C again to quit now)");
                    self.budget.stop();
                }
            }
        }
        self.stats.summary(setup, started.elapsed(), interrupted)
    }

    fn report_progress(&self, elapsed: Duration) {
        let (ok, done) = self.stats.progress();
        eprintln!(
            "{:>5.0} s  {ok} ok, {} not ok, {} in flight",
            elapsed.as_secs_f64(),
            done - ok,
            self.budget.issued().saturating_sub(done),
        );
    }
}
