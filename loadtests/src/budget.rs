//! How many jobs may still be submitted: the run ends at `--jobs` or `--duration`, whichever
//! comes first, or early when stopped (Ctrl-C).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

pub struct Budget {
    issued: AtomicU64,
    max_jobs: u64,
    deadline: Instant,
    stop: watch::Sender<bool>,
}

impl Budget {
    pub fn new(max_jobs: u64, duration: Duration) -> Self {
        Self {
            issued: AtomicU64::new(0),
            max_jobs,
            deadline: Instant::now() + duration,
            stop: watch::Sender::new(false),
        }
    }

    /// The next job's sequence number, or `None` once the jobs or the time are used up, or
    /// the run was stopped (and from then on).
    pub fn take(&self) -> Option<u64> {
        if *self.stop.borrow() || Instant::now() >= self.deadline {
            return None;
        }
        let seq = self.issued.fetch_add(1, Ordering::Relaxed);
        (seq < self.max_jobs).then_some(seq)
    }

    /// Jobs handed out so far.
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed).min(self.max_jobs)
    }

    /// Ends the run early: nothing more is handed out, and jobs in flight are to be canceled.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Resolves once [`Budget::stop`] has been called.
    pub async fn stopped(&self) {
        let mut stop = self.stop.subscribe();
        // The sender lives as long as `self`, so this only returns once stopped.
        let _ = stop.wait_for(|stopped| *stopped).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_at_the_job_count() {
        let budget = Budget::new(3, Duration::from_secs(60));
        let taken: Vec<_> = std::iter::from_fn(|| budget.take()).collect();
        assert_eq!(taken, vec![0, 1, 2]);
        assert_eq!(budget.take(), None);
        assert_eq!(budget.issued(), 3);
    }

    #[test]
    fn stops_at_the_deadline() {
        let budget = Budget::new(100, Duration::ZERO);
        assert_eq!(budget.take(), None);
        assert_eq!(budget.issued(), 0);
    }

    #[tokio::test]
    async fn stops_when_told() {
        let budget = Budget::new(100, Duration::from_secs(60));
        assert_eq!(budget.take(), Some(0));
        budget.stop();
        budget.stopped().await;
        assert_eq!(budget.take(), None);
    }
}
