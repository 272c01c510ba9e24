//! Work that arrives together is done together, as a database groups commits. Callers queue
//! items under a key (shard results: one key; submissions: one per account), and one task per
//! key takes whatever waits, up to a cap, and does it as one batch. An item alone is a batch of
//! one, so a quiet gateway pays only a hop to that task; a busy one pays one transaction, and
//! locks each hot row once, for many items.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::oneshot;

use super::Scheduler;

/// Does a batch: one outcome per item, in order.
pub(super) type Work<T, R> = fn(Scheduler, Vec<T>) -> BoxFuture<'static, Vec<R>>;

type Queue<T, R> = VecDeque<(T, oneshot::Sender<R>)>;

/// Items waiting per key. A key is in the map exactly while a task is doing its batches.
pub(super) struct Batcher<K, T, R> {
    waiting: Mutex<HashMap<K, Queue<T, R>>>,
    max_batch: usize,
    work: Work<T, R>,
}

impl<K, T, R> Batcher<K, T, R>
where
    K: Hash + Eq + Clone + Send + 'static,
    T: Send + 'static,
    R: Send + 'static,
{
    pub fn new(max_batch: usize, work: Work<T, R>) -> Self {
        Self {
            waiting: Mutex::default(),
            max_batch,
            work,
        }
    }

    /// Queues `items` under `key`, together, and starts the key's task unless it runs. The
    /// task is a task of its own, so a caller that stops waiting loses nothing it queued.
    /// Each receiver gets its item's outcome; it is dropped unanswered only if the work panics.
    pub fn enqueue(
        self: &Arc<Self>,
        scheduler: &Scheduler,
        key: K,
        items: Vec<T>,
    ) -> Vec<oneshot::Receiver<R>> {
        let mut waiting = self.waiting.lock().expect("the batcher is never poisoned");
        let running = waiting.contains_key(&key);
        let queue = waiting.entry(key.clone()).or_default();
        let receivers = items
            .into_iter()
            .map(|item| {
                let (reply, receiver) = oneshot::channel();
                queue.push_back((item, reply));
                receiver
            })
            .collect();
        if !running {
            tokio::spawn(self.clone().drain(scheduler.clone(), key));
        }
        receivers
    }

    /// Does `key`'s batches until nothing waits under it.
    async fn drain(self: Arc<Self>, scheduler: Scheduler, key: K) {
        loop {
            let batch: Vec<_> = {
                let mut waiting = self.waiting.lock().expect("the batcher is never poisoned");
                let queue = waiting
                    .get_mut(&key)
                    .expect("the key stays while its task runs");
                if queue.is_empty() {
                    waiting.remove(&key);
                    return;
                }
                let n = queue.len().min(self.max_batch);
                queue.drain(..n).collect()
            };
            let (items, replies): (Vec<T>, Vec<_>) = batch.into_iter().unzip();
            // A panic is a bug, but it must not leave the key without a task.
            match AssertUnwindSafe((self.work)(scheduler.clone(), items))
                .catch_unwind()
                .await
            {
                Ok(outcomes) => {
                    for (reply, outcome) in replies.into_iter().zip(outcomes) {
                        let _ = reply.send(outcome);
                    }
                }
                Err(_) => tracing::error!(items = replies.len(), "a batch panicked"),
            }
        }
    }
}
