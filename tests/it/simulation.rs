//! A deterministic simulation of the scheduler, as FoundationDB and TigerBeetle test theirs.
//!
//! Each seed drives the gateway's real placement and state machine against a real Postgres
//! (its own database) and Redis (its own prefix), with no MQTT and no wall clock:
//! - worker messages are sealed by simulated nodes and handed to `broker::Inbound`'s
//!   `handle_message`, what the MQTT loop calls for each publish; assignments come straight from
//!   `jobs::dispatch::assign`, or for a job placed at submit from its shard's row; the sweep is
//!   `jobs::sweep::sweep`. The simulation uses the same
//!   handles startup wires (`startup::Connected`), with no hook of its own;
//! - time is virtual: each step moves every stored timestamp back onto a grid of whole steps
//!   (ten virtual seconds), one step older, so leases, waits and timeouts pass in steps, not
//!   seconds, and come out the same on every run;
//! - a seeded RNG chooses everything: nodes joining, dying, restarting, lying, straggling and
//!   rejecting; nodes that refuse every shard; jobs of every size from three accounts, a few
//!   with a poisoned cell that every node refuses as unusable input; cancels; redundancy off,
//!   sampled at 100%, or only for new nodes;
//! - the results nodes send in a step reach the gateway as one batch, settled together; a batch
//!   sometimes carries a stale member (an old result sent again), or races a cancel of one of
//!   its jobs or a lease of one of its shards lapsing into the sweep;
//! - a third of the jobs are `predict` jobs over three published registry models. Each node
//!   keeps two of them (least recently used evicted), runs the others cold, and announces what
//!   it holds before its result, as the worker does, so placement's warm preference is driven.
//!
//! After every step: no starvation (if a live node with a free slot may run some pending shard,
//! the dispatch round assigns one), no shard is sent more than `XPAND_MAX_SHARD_ATTEMPTS`
//! times, no job outlives its timeout, the ledger balances. At the end: every job ended, a
//! poisoned job never succeeded, nothing was paid twice, escrow is empty.
//!
//! `XPAND_SIM_SEEDS` seeds run (default 100; `make soak` runs more), from `XPAND_SIM_FIRST_SEED`;
//! `XPAND_SIM_SEED=n` reruns one. A failure names its seed. Video jobs are not simulated: their
//! shards take the same path, plus an upload check and a deferred join that need real files.

use std::collections::HashMap;
use std::time::Instant;

use futures::{FutureExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;
use xpand::broker::Inbound;
use xpand::jobs::dispatch::Dispatched;
use xpand::jobs::Scheduler;
use xpand::jobs::{JobStatus, SubmitJob, Submitted};
use xpand::presence::RedisPresence;
use xpand::startup::Connected;
use xpand_protocol::{
    Accelerator, Announce, Assignment, Heartbeat, ModelInfo, NodeKey, Progress, ProgressChain,
    Reject, ShardOutput, ShardResult, ShardTask, Topics, UpKind,
};

use crate::common::{
    assert_every_job_settled, assert_ledger_invariants, delete_redis_prefix, pg_server, result_for,
    test_config,
};

/// Steps with arrivals and failures; then the network calms down and every job must end.
const ACTIVE_STEPS: u32 = 40;
/// Steps after the active phase within which every job must have ended (its timeout and then
/// some).
const DRAIN_STEPS: u32 = 100;
/// Virtual seconds per step, the grid's unit. A step must take less real time than this (it
/// takes tens of milliseconds, a second or two on a loaded machine); durations below are in
/// steps.
const STEP_SECS: f64 = 10.0;
const JOB_TIMEOUT_SECS: f64 = 80.5 * STEP_SECS;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Behaviour {
    Honest,
    /// Answers with wrong numbers: caught when another node checks it.
    Liar,
    /// Takes 6–12 steps, reporting progress to keep its lease.
    Straggler,
    /// Gives back half of what it is sent.
    Rejecter,
    /// Gives back everything it is sent (a node that cannot run the model after all).
    Refuser,
}

/// A cell value that no node can process: a shard holding it is refused by every node as
/// unusable input, as a video that does not decode is.
const POISON: f64 = -7.25;
/// The attempt cap (`XPAND_MAX_SHARD_ATTEMPTS`) every seed runs with.
const MAX_ATTEMPTS: u32 = 5;

/// Work a node holds: answered at step `due`.
struct Held {
    assignment: Assignment,
    due: u32,
}

struct SimNode {
    key: NodeKey,
    slots: u32,
    behaviour: Behaviour,
    alive: bool,
    held: Vec<Held>,
    /// The registry models it keeps (sha256s), most recently used first; kept across restarts,
    /// as files on disk are.
    cache: Vec<String>,
    /// When its current process started (what its statements say).
    started_at_ms: i64,
}

/// A shard's row as a node's assignment: assignment, shard, node, model, lease, task.
type PlacedShard = (
    Uuid,
    Uuid,
    String,
    String,
    chrono::DateTime<chrono::Utc>,
    sqlx::types::Json<ShardTask>,
);

/// Registry models a simulated node keeps at once.
const CACHE: usize = 2;

struct Sim {
    rng: StdRng,
    scheduler: Scheduler,
    inbound: Inbound,
    presence: RedisPresence,
    topics: Topics,
    nodes: Vec<SimNode>,
    accounts: Vec<Uuid>,
    /// The published registry models predict jobs run: (name, sha256).
    models: Vec<(String, String)>,
    jobs: Vec<(Uuid, Uuid)>,
    /// Jobs submitted with a poisoned cell.
    poisoned: Vec<Uuid>,
    /// How often each shard was dispatched.
    dispatches: HashMap<Uuid, u32>,
    /// Results the nodes sent this step, `(node, result)`: they reach the gateway together.
    outbox: Vec<(usize, ShardResult)>,
    /// Results sent in recent steps, which a node may send again.
    sent: Vec<(usize, ShardResult)>,
    step: u32,
    last_advance: Instant,
    /// What the run did, for the summary line.
    counts: HashMap<&'static str, u64>,
}

impl Sim {
    fn count(&mut self, what: &'static str) {
        *self.counts.entry(what).or_default() += 1;
    }

    /// Sends `body` as node `i` would: sealed with its key on its topic, admitted by the
    /// gateway's own checks.
    async fn send<T: serde::Serialize>(&self, i: usize, kind: UpKind, body: &T) {
        let key = &self.nodes[i].key;
        let topic = self.topics.up(key.id(), kind);
        let payload = key.seal(&topic, body);
        self.inbound.handle_message(&topic, &payload).await;
    }

    /// A node process starting: it announces (with its start time) and beats.
    async fn start_process(&mut self, i: usize) {
        self.nodes[i].alive = true;
        self.nodes[i].held.clear();
        self.nodes[i].started_at_ms = xpand_protocol::now_ms();
        self.announce(i).await;
    }

    /// Node `i`'s capability statement: the forecast model, the runner of registry models, and
    /// the registry models it holds.
    async fn announce(&mut self, i: usize) {
        let node = &self.nodes[i];
        let mut held = node.cache.clone();
        held.sort();
        let announce = Announce {
            name: format!("sim-{i}"),
            models: vec![
                ModelInfo {
                    name: xpand::kinds::forecast::MODEL.into(),
                    version: "1.0.0".into(),
                    kind: "forecast".into(),
                    sha256: "0".repeat(64),
                },
                ModelInfo {
                    name: xpand::kinds::predict::RUNNER.into(),
                    version: "sim".into(),
                    kind: "predict".into(),
                    sha256: String::new(),
                },
            ],
            accelerator: Accelerator::Cpu,
            memory_mb: 1024,
            cpu_cores: 1,
            max_concurrent_shards: node.slots,
            worker_version: "sim".into(),
            started_at_ms: node.started_at_ms,
            held_models: held,
        };
        self.send(i, UpKind::Announce, &announce).await;
    }

    async fn add_node(&mut self) {
        let behaviour = match self.rng.gen_range(0..10) {
            0 => Behaviour::Liar,
            1 => Behaviour::Straggler,
            2 => Behaviour::Rejecter,
            3 if self.rng.gen_bool(0.5) => Behaviour::Refuser,
            _ => Behaviour::Honest,
        };
        let key = NodeKey::generate();
        let i = self.nodes.len();
        xpand::nodes::register(&self.scheduler.db, key.id(), &format!("sim-{i}"))
            .await
            .unwrap();
        self.nodes.push(SimNode {
            key,
            slots: self.rng.gen_range(1..=3),
            behaviour,
            alive: false,
            held: Vec::new(),
            cache: Vec::new(),
            started_at_ms: 0,
        });
        self.start_process(i).await;
        self.count("nodes");
    }

    async fn submit(&mut self) {
        let account = self.accounts[self.rng.gen_range(0..self.accounts.len())];
        if self.rng.gen_bool(0.3) {
            return self.submit_predict(account).await;
        }
        let rows = if self.rng.gen_bool(0.2) {
            self.rng.gen_range(60..=160)
        } else {
            self.rng.gen_range(1..=24)
        };
        let len = self.rng.gen_range(3..=20);
        let mut series: Vec<Vec<f64>> = (0..rows)
            .map(|r| (0..len).map(|c| (r * 7 + c) as f64).collect())
            .collect();
        let poisoned = self.rng.gen_bool(0.05);
        if poisoned {
            let row = self.rng.gen_range(0..series.len());
            series[row][0] = POISON;
        }
        let horizon = self.rng.gen_range(1..=6);
        let (input, params) = (json!({ "series": series }), json!({ "horizon": horizon }));
        self.submit_job(account, "forecast", input, params, poisoned)
            .await;
        self.count("jobs");
    }

    /// Submits a job the gateway must accept, and remembers it (and whether it is poisoned).
    async fn submit_job(
        &mut self,
        account: Uuid,
        kind: &str,
        input: serde_json::Value,
        params: serde_json::Value,
        poisoned: bool,
    ) {
        let req = SubmitJob {
            kind: kind.into(),
            input,
            params,
            max_fee: 100_000_000,
            webhook: None,
            deadline: None,
        };
        match xpand::jobs::submit(&self.scheduler, account, &req, None).await {
            Ok(Submitted::Created(job)) => {
                self.jobs.push((account, job.id));
                self.deliver_placed_at_submit(job.id).await;
                if poisoned {
                    self.poisoned.push(job.id);
                    self.count("poisoned jobs");
                }
            }
            Ok(Submitted::Existing(_)) => unreachable!("no idempotency key was sent"),
            Err(e) => panic!("a valid {kind} job was refused: {e}"),
        }
    }

    /// A predict job on one of the registry models: a few rows, or enough for several shards.
    async fn submit_predict(&mut self, account: Uuid) {
        let (model, _) = self.models[self.rng.gen_range(0..self.models.len())].clone();
        let rows: usize = if self.rng.gen_bool(0.2) {
            self.rng.gen_range(1_200..=2_500)
        } else {
            self.rng.gen_range(1..=40)
        };
        let mut data: Vec<f64> = (0..rows * 8).map(|k| ((k % 17) as f64) - 8.0).collect();
        let poisoned = self.rng.gen_bool(0.05);
        if poisoned {
            let at = self.rng.gen_range(0..data.len());
            data[at] = POISON;
        }
        let input = json!({ "model": model, "inputs": [
            { "name": "x", "datatype": "FP32", "shape": [rows, 8], "data": data }] });
        self.submit_job(account, "predict", input, json!({}), poisoned)
            .await;
        self.count("predict jobs");
    }

    async fn cancel_one(&mut self) {
        let Some(&(account, job)) = self.jobs.get(self.rng.gen_range(0..self.jobs.len().max(1)))
        else {
            return;
        };
        if xpand::jobs::settlement::cancel(&self.scheduler, account, job)
            .await
            .is_ok()
        {
            self.count("cancels");
        }
    }

    /// What happens to the network this step.
    async fn events(&mut self) {
        if self.rng.gen_bool(0.5) {
            self.submit().await;
        }
        if !self.jobs.is_empty() && self.rng.gen_bool(0.03) {
            self.cancel_one().await;
        }
        if self.nodes.len() < 6 && self.rng.gen_bool(0.04) {
            self.add_node().await;
        }
        let i = self.rng.gen_range(0..self.nodes.len());
        if self.nodes[i].alive && self.rng.gen_bool(0.05) {
            // Dies (kill -9): it stops beating and its work is lost with it.
            self.nodes[i].alive = false;
            self.nodes[i].held.clear();
            let id = self.nodes[i].key.id().to_string();
            self.presence.forget(&id).await.unwrap();
            self.count("deaths");
        } else if !self.nodes[i].alive && self.rng.gen_bool(0.3) {
            self.start_process(i).await;
            self.count("restarts");
        }
    }

    /// Every live node beats and answers what is due.
    async fn node_actions(&mut self) {
        for i in 0..self.nodes.len() {
            if !self.nodes[i].alive {
                continue;
            }
            let active = self.nodes[i].held.len() as u32;
            self.send(
                i,
                UpKind::Heartbeat,
                &Heartbeat {
                    active_shards: active,
                },
            )
            .await;
            let (due, waiting): (Vec<Held>, Vec<Held>) = std::mem::take(&mut self.nodes[i].held)
                .into_iter()
                .partition(|h| h.due <= self.step);
            self.nodes[i].held = waiting;
            for held in &self.nodes[i].held {
                let a = &held.assignment;
                let progress = Progress {
                    assignment_id: a.assignment_id,
                    shard_id: a.shard_id,
                    done: 0,
                    total: 1,
                    chain: ProgressChain::new(a.assignment_id).hex(),
                };
                self.send(i, UpKind::Progress, &progress).await;
            }
            for held in due {
                self.answer(i, &held.assignment).await;
            }
        }
        self.deliver_results().await;
    }

    /// The step's results reach the gateway as one batch, as results that arrive together are
    /// settled. Sometimes a batch carries a stale member (a node sending an old result again,
    /// as after a lost acknowledgement), and sometimes it races the owner canceling one of its
    /// jobs or the sweep taking back one of its shards whose lease just lapsed. Who wins a race
    /// is Postgres's to decide, the one thing a seed does not fix; either way the invariants
    /// must hold.
    async fn deliver_results(&mut self) {
        let mut batch = std::mem::take(&mut self.outbox);
        if !self.sent.is_empty() && self.rng.gen_bool(0.2) {
            let (i, old) = self.sent[self.rng.gen_range(0..self.sent.len())].clone();
            if self.nodes[i].alive {
                batch.insert(self.rng.gen_range(0..=batch.len()), (i, old));
                self.count("stale batch members");
            }
        }
        if batch.is_empty() {
            return;
        }
        self.count("result batches");
        let sealed: Vec<(String, Vec<u8>)> = batch
            .iter()
            .map(|(i, r)| {
                let key = &self.nodes[*i].key;
                let topic = self.topics.up(key.id(), UpKind::Result);
                let payload = key.seal(&topic, r);
                (topic, payload)
            })
            .collect();
        let messages: Vec<(&str, &[u8])> = sealed
            .iter()
            .map(|(topic, payload)| (topic.as_str(), payload.as_slice()))
            .collect();
        let (_, member) = &batch[self.rng.gen_range(0..batch.len())];
        let member_job: Option<(Uuid, Uuid)> = sqlx::query_as(
            "SELECT j.account_id, j.id FROM shards s JOIN jobs j ON j.id = s.job_id
             WHERE s.id = $1",
        )
        .bind(member.shard_id)
        .fetch_optional(&self.scheduler.db)
        .await
        .unwrap();
        let scheduler = &self.scheduler;
        match (self.rng.gen_range(0..10), member_job) {
            (0, Some((account, job))) => {
                let (_, ()) = tokio::join!(
                    xpand::jobs::settlement::cancel(scheduler, account, job),
                    self.inbound.handle_messages(&messages)
                );
                self.count("batches racing a cancel");
            }
            (1, Some(_)) => {
                sqlx::query(
                    "UPDATE shards SET lease_expires_at = now() - interval '1 second'
                     WHERE assignment_id = $1 AND status = 'assigned'",
                )
                .bind(member.assignment_id)
                .execute(&scheduler.db)
                .await
                .unwrap();
                let (swept, ()) = tokio::join!(
                    xpand::jobs::sweep::sweep(scheduler),
                    self.inbound.handle_messages(&messages)
                );
                swept.unwrap();
                self.count("batches racing a lease expiry");
            }
            _ => self.inbound.handle_messages(&messages).await,
        }
        self.sent.extend(batch);
        let keep = self.sent.len().saturating_sub(20);
        self.sent.drain(..keep);
    }

    async fn answer(&mut self, i: usize, a: &Assignment) {
        let behaviour = self.nodes[i].behaviour;
        let input_unusable = match &a.task {
            ShardTask::Forecast { series, .. } => series.iter().flatten().any(|&v| v == POISON),
            ShardTask::Predict(task) => task.inputs.iter().any(|t| t.data.contains(&POISON)),
            ShardTask::Anonymize(_) => panic!("video is not simulated"),
        };
        let refuses = match behaviour {
            Behaviour::Rejecter => self.rng.gen_bool(0.5),
            Behaviour::Refuser => true,
            _ => false,
        };
        if refuses || input_unusable {
            let reject = Reject {
                assignment_id: a.assignment_id,
                shard_id: a.shard_id,
                reason: "sim: cannot run it".into(),
                input_unusable,
            };
            self.send(i, UpKind::Reject, &reject).await;
            self.count("rejects");
            return;
        }
        // The "model": a forecast repeats each row's last value; a predict model scores a row
        // by its sum. A liar answers something else.
        let lie = if behaviour == Behaviour::Liar {
            1e6
        } else {
            0.0
        };
        let output = match &a.task {
            ShardTask::Forecast {
                series, horizon, ..
            } => ShardOutput::Forecast {
                forecasts: series
                    .iter()
                    .map(|row| vec![row.last().copied().unwrap_or(0.0) + lie; *horizon as usize])
                    .collect(),
                intervals: Vec::new(),
            },
            ShardTask::Predict(task) => {
                self.use_model(i, &task.sha256).await;
                let x = &task.inputs[0];
                let scores = x
                    .data
                    .chunks(x.row_len())
                    .map(|row| row.iter().sum::<f64>() * 0.001 + lie);
                ShardOutput::Predict {
                    outputs: vec![xpand_protocol::Tensor {
                        name: "p".into(),
                        datatype: "FP32".into(),
                        shape: vec![x.shape[0], 1],
                        data: scores.collect(),
                    }],
                }
            }
            ShardTask::Anonymize(_) => unreachable!("refused above"),
        };
        self.outbox.push((i, result_for(a, output)));
        self.count("results");
    }

    /// Node `i` runs registry model `sha`: warm if it holds it, else it fetches it (evicting
    /// the least recently used beyond [`CACHE`]) and announces what it now holds before its
    /// result, as the worker does.
    async fn use_model(&mut self, i: usize, sha: &str) {
        let cache = &mut self.nodes[i].cache;
        if let Some(at) = cache.iter().position(|held| held == sha) {
            let held = cache.remove(at);
            cache.insert(0, held);
            self.count("warm runs");
            return;
        }
        cache.insert(0, sha.to_string());
        let evicted = cache.len() > CACHE;
        cache.truncate(CACHE);
        self.count("cold runs");
        if evicted {
            self.count("evictions");
        }
        self.announce(i).await;
    }

    /// Whether some pending shard may run on some live node with a free slot, decided here
    /// from the rows, independently of the dispatch query: not a shard out of attempts or
    /// whose input two nodes refused; never on a node with a run of its shard; and on a node
    /// that rejected it only when every live node did.
    async fn placeable_exists(&self) -> bool {
        let db = &self.scheduler.db;
        let busy: HashMap<String, i64> = sqlx::query_as(
            "SELECT node_id, count(*) FROM shards WHERE status = 'assigned' GROUP BY node_id",
        )
        .fetch_all(db)
        .await
        .unwrap()
        .into_iter()
        .collect();
        let live: Vec<&str> = self
            .nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| n.key.id())
            .collect();
        let free: Vec<&str> = self
            .nodes
            .iter()
            .filter(|n| n.alive && busy.get(n.key.id()).copied().unwrap_or(0) < i64::from(n.slots))
            .map(|n| n.key.id())
            .collect();
        if free.is_empty() {
            return false;
        }
        let pending: Vec<(Option<Uuid>, Vec<String>)> = sqlx::query_as(
            "SELECT replica_of, rejected_by FROM shards
             WHERE status = 'pending' AND attempts < $1 AND cardinality(input_refused_by) < 2",
        )
        .bind(MAX_ATTEMPTS as i32)
        .fetch_all(db)
        .await
        .unwrap();
        for (replica_of, rejected) in pending {
            let ran = self.ran_on(replica_of).await;
            let had = |n: &&str, list: &[String]| list.iter().any(|r| r == n);
            let unrejected_lives = live.iter().any(|n| !had(n, &ran) && !had(n, &rejected));
            // Free, no run of the shard, and did not reject it unless every live node did.
            let may_take = |n: &&str| !had(n, &ran) && (!unrejected_lives || !had(n, &rejected));
            if free.iter().any(may_take) {
                return true;
            }
        }
        false
    }

    /// The nodes a replica or speculative copy of `replica_of` may never go to: those with a
    /// run of its shard (a primary has none).
    async fn ran_on(&self, replica_of: Option<Uuid>) -> Vec<String> {
        let Some(primary) = replica_of else {
            return Vec::new();
        };
        sqlx::query_scalar(
            "SELECT node_id FROM shards WHERE node_id IS NOT NULL
               AND (id = $1 OR (replica_of = $1 AND status IN ('assigned', 'done')))",
        )
        .bind(primary)
        .fetch_all(&self.scheduler.db)
        .await
        .unwrap()
    }

    /// A node that rejected a shard (or answered it wrongly) gets it again only when every
    /// live node did.
    async fn check_placement(&self, a: &Assignment) {
        let (replica_of, rejected): (Option<Uuid>, Vec<String>) =
            sqlx::query_as("SELECT replica_of, rejected_by FROM shards WHERE id = $1")
                .bind(a.shard_id)
                .fetch_one(&self.scheduler.db)
                .await
                .unwrap();
        if !rejected.contains(&a.node) {
            return;
        }
        let ran = self.ran_on(replica_of).await;
        let fresh: Vec<&str> = self
            .nodes
            .iter()
            .map(|n| n.key.id())
            .filter(|id| !rejected.iter().chain(&ran).any(|e| e == id))
            .filter(|id| self.nodes.iter().any(|n| n.alive && n.key.id() == *id))
            .collect();
        assert!(
            fresh.is_empty(),
            "step {}: shard {} went back to {}, which rejected it, while {fresh:?} lived",
            self.step,
            a.shard_id,
            a.node
        );
    }

    /// One dispatch pass as the dispatcher runs it (rounds until one is drained),
    /// checking that a placeable shard is never left waiting.
    async fn dispatch(&mut self) {
        let must_assign = self.placeable_exists().await;
        let mut first = true;
        loop {
            let xpand::jobs::dispatch::Round {
                dispatched: round,
                drained,
            } = xpand::jobs::dispatch::assign(&self.scheduler)
                .await
                .unwrap();
            assert!(
                !(first && must_assign && round.is_empty()),
                "starvation at step {}: a live node with a free slot may run a pending shard, \
                 yet the round assigned nothing",
                self.step
            );
            first = false;
            if round.is_empty() {
                return;
            }
            for Dispatched { assignment, .. } in round {
                self.deliver(assignment).await;
            }
            if drained == xpand::jobs::dispatch::Drained::Yes {
                return;
            }
        }
    }

    /// An assignment reaches its node (unless the node is dead), which answers it some steps
    /// later; never more often per shard than the attempt cap allows.
    async fn deliver(&mut self, assignment: Assignment) {
        self.count("assignments");
        let sent = self.dispatches.entry(assignment.shard_id).or_default();
        *sent += 1;
        assert!(
            *sent <= MAX_ATTEMPTS,
            "step {}: shard {} was dispatched {} times, past the attempt cap",
            self.step,
            assignment.shard_id,
            *sent
        );
        self.check_placement(&assignment).await;
        let Some(node) = self
            .nodes
            .iter_mut()
            .find(|n| n.key.id() == assignment.node)
        else {
            panic!("assigned to a node the simulation does not know");
        };
        if !node.alive {
            return; // Lost on the wire: the node is dead and does not know it.
        }
        let delay = match node.behaviour {
            Behaviour::Straggler => self.rng.gen_range(6..=12),
            _ => self.rng.gen_range(0..=2),
        };
        node.held.push(Held {
            assignment,
            due: self.step + delay,
        });
    }

    /// A job placed in its submit transaction had its assignment sent then, over the link the
    /// simulation does not listen to: its node receives it as the shard row records it.
    async fn deliver_placed_at_submit(&mut self, job: Uuid) {
        let placed: Vec<PlacedShard> = sqlx::query_as(
            "SELECT assignment_id, id, node_id, model, lease_expires_at, task FROM shards
                 WHERE job_id = $1 AND status = 'assigned'",
        )
        .bind(job)
        .fetch_all(&self.scheduler.db)
        .await
        .unwrap();
        for (assignment_id, shard_id, node, model, lease, task) in placed {
            self.count("placed at submit");
            let assignment = Assignment {
                assignment_id,
                job_id: job,
                shard_id,
                node,
                model,
                lease_expires_at_ms: lease.timestamp_millis(),
                task: task.0,
            };
            self.deliver(assignment).await;
        }
    }

    /// Moves virtual time on by one step. Every timestamp the scheduler compares with `now()`
    /// is moved back so that its age becomes whole steps plus one: what was written during the
    /// step (real age under a step) is one step old, what was n steps old is n + 1. All ages sit
    /// on the grid, and `now()` at a decision is the grid plus the real time the step has run,
    /// so every comparison comes out the same on every run of a seed.
    async fn advance(&mut self) {
        assert!(
            self.last_advance.elapsed().as_secs_f64() < STEP_SECS,
            "a step took longer in real time than a virtual step: the grid would slip"
        );
        let on_grid = |column: &str| {
            format!(
                "{column} = now() - make_interval(secs => {STEP_SECS} * \
                 (floor(extract(epoch FROM now() - {column}) / {STEP_SECS}) + 1))"
            )
        };
        let db = &self.scheduler.db;
        // Ended jobs' rows take part in no decision.
        sqlx::query(&format!(
            "UPDATE shards SET {}, {}, {}
             WHERE job_id IN (SELECT id FROM jobs WHERE status IN ('queued', 'running'))",
            on_grid("lease_expires_at"),
            on_grid("assigned_at"),
            on_grid("completed_at")
        ))
        .execute(db)
        .await
        .unwrap();
        sqlx::query(&format!(
            "UPDATE jobs SET {}, {}, {} WHERE status IN ('queued', 'running')",
            on_grid("created_at"),
            on_grid("updated_at"),
            on_grid("started_at")
        ))
        .execute(db)
        .await
        .unwrap();
        self.last_advance = Instant::now();
        self.step += 1;
    }

    async fn open_jobs(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")
            .fetch_one(&self.scheduler.db)
            .await
            .unwrap()
    }

    /// Invariants after every step.
    async fn check_step(&self) {
        let overdue: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')
               AND created_at < now() - make_interval(secs => $1)",
        )
        .bind(JOB_TIMEOUT_SECS + 2.0 * STEP_SECS)
        .fetch_one(&self.scheduler.db)
        .await
        .unwrap();
        assert_eq!(
            overdue, 0,
            "a job outlived its timeout at step {}",
            self.step
        );
        let unbalanced: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT tx_id FROM ledger_entries
                                   GROUP BY tx_id HAVING sum(amount) <> 0) t",
        )
        .fetch_one(&self.scheduler.db)
        .await
        .unwrap();
        assert_eq!(
            unbalanced, 0,
            "an unbalanced ledger transaction at step {}",
            self.step
        );
    }

    async fn run(&mut self) {
        for _ in 0..self.rng.gen_range(2..=4) {
            self.add_node().await;
        }
        loop {
            if self.step < ACTIVE_STEPS {
                self.events().await;
            }
            self.node_actions().await;
            self.dispatch().await;
            xpand::jobs::sweep::sweep(&self.scheduler).await.unwrap();
            self.check_step().await;
            if self.step >= ACTIVE_STEPS && self.open_jobs().await == 0 {
                break;
            }
            assert!(
                self.step < ACTIVE_STEPS + DRAIN_STEPS,
                "{} jobs never ended",
                self.open_jobs().await
            );
            self.advance().await;
        }
        // A job that succeeded has an answer for every row it was given (its shards' rows: the
        // job keeps no copy of them).
        let done: Vec<(String, serde_json::Value, i64)> = sqlx::query_as(
            "SELECT j.kind, j.output,
                    (SELECT sum(row_count) FROM shards s
                     WHERE s.job_id = j.id AND s.replica_of IS NULL)::bigint
             FROM jobs j WHERE j.status = $1",
        )
        .bind(JobStatus::Succeeded.as_str())
        .fetch_all(&self.scheduler.db)
        .await
        .unwrap();
        for (kind, output, rows) in &done {
            let rows = *rows as usize;
            if kind == "forecast" {
                let forecasts = output["forecasts"].as_array().map(Vec::len);
                assert_eq!(forecasts, Some(rows), "a succeeded job lost rows");
            } else {
                assert_eq!(output["outputs"][0]["shape"][0], json!(rows), "{output}");
                let scores = output["outputs"][0]["data"].as_array().map(Vec::len);
                assert_eq!(scores, Some(rows), "a succeeded predict job lost rows");
            }
        }
        // A poisoned job never succeeds: it fails once two nodes refused its input (or its
        // shard ran out of nodes to try), unless it was canceled first.
        for job in &self.poisoned {
            let (status, code): (String, Option<String>) =
                sqlx::query_as("SELECT status, error->>'code' FROM jobs WHERE id = $1")
                    .bind(job)
                    .fetch_one(&self.scheduler.db)
                    .await
                    .unwrap();
            assert!(
                status == "canceled"
                    || (status == "failed"
                        && matches!(
                            code.as_deref(),
                            Some("input_unusable" | "shard_attempts_exhausted" | "timed_out")
                        )),
                "poisoned job {job} ended {status} ({code:?})"
            );
        }
        assert_every_job_settled(&self.scheduler.db).await;
        assert_ledger_invariants(&self.scheduler.db).await;
        // A stale member is refused alone; a race is lost or won by lock order. Neither may
        // fail a batch's transaction as a whole.
        assert_eq!(
            self.scheduler.metrics.result_batches_split.get(),
            0,
            "a batch of results failed as a whole and was settled one by one"
        );
    }
}

/// Runs one seed in its own database (a copy of `template`) and Redis prefix.
async fn run_seed(seed: u64, template: &str) -> HashMap<&'static str, u64> {
    let db_name = format!("{template}_s{seed}");
    create_from_template(&db_name, template).await;
    // The simulation checks decisions, not durability: no fsync per commit (milliseconds each
    // on this disk, most of a step's time otherwise).
    admin(&format!(
        "ALTER DATABASE {db_name} SET synchronous_commit = off"
    ))
    .await;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut config = test_config(&db_name);
    config.scheduling.lease = std::time::Duration::from_secs_f64(4.5 * STEP_SECS);
    config.scheduling.verify_wait = std::time::Duration::from_secs_f64(6.5 * STEP_SECS);
    config.scheduling.straggler_min_secs = 5.5 * STEP_SECS;
    config.scheduling.job_timeout = std::time::Duration::from_secs_f64(JOB_TIMEOUT_SECS);
    config.scheduling.max_shard_attempts = MAX_ATTEMPTS;
    // Liveness ends only when the simulation says a node died.
    config.node_ttl = std::time::Duration::from_secs(3600);
    (
        config.scheduling.redundancy_bps,
        config.scheduling.verify_new_node_shards,
    ) = match rng.gen_range(0..4) {
        0 => (0, 0),
        1 => (10_000, 0),
        2 => (0, 3),
        _ => (10_000, 3),
    };
    let redis_prefix = config.redis_prefix.clone();
    let (files, scratch) = (config.files_dir.clone(), config.scratch_dir.clone());
    let topics = Topics::new(&config.topic_prefix);
    let connected = Connected::connect(config, "http://127.0.0.1:9")
        .await
        .unwrap();
    // No MQTT: with its event loop gone, anything the gateway sends fails at once.
    drop(connected.eventloop);
    let db = connected.scheduler.db.clone();
    let mut accounts = Vec::new();
    for _ in 0..3 {
        let (id, _) = xpand::accounts::create_customer(&db, "sim", 10_000_000_000)
            .await
            .unwrap();
        accounts.push(id);
    }
    // Three published models of the first account, which every account's predict jobs run.
    let mut models = Vec::new();
    for (i, name) in ["sim-a", "sim-b", "sim-c"].into_iter().enumerate() {
        let bytes = crate::models::churn(|m| {
            m.graph.as_mut().unwrap().initializer[0].float_data[0] = i as f32
        });
        let manifest = serde_json::from_value(crate::models::manifest(name)).unwrap();
        let (version, _) = xpand::registry::register(
            &connected.scheduler.files,
            &db,
            accounts[0],
            manifest,
            bytes.into(),
            i64::MAX,
        )
        .await
        .unwrap();
        xpand::registry::publish(&db, accounts[0], name, true)
            .await
            .unwrap();
        models.push((version.name, version.sha256));
    }
    let mut sim = Sim {
        rng,
        scheduler: connected.scheduler,
        inbound: connected.inbound,
        presence: connected.presence,
        topics,
        nodes: Vec::new(),
        accounts,
        models,
        jobs: Vec::new(),
        poisoned: Vec::new(),
        dispatches: HashMap::new(),
        outbox: Vec::new(),
        sent: Vec::new(),
        step: 0,
        last_advance: Instant::now(),
        counts: HashMap::new(),
    };
    let outcome = std::panic::AssertUnwindSafe(sim.run()).catch_unwind().await;
    let counts = std::mem::take(&mut sim.counts);
    let steps = sim.step;
    drop(sim);
    db.close().await;
    drop(connected.state);
    delete_redis_prefix(&redis_prefix).await;
    let _ = std::fs::remove_dir_all(files);
    let _ = std::fs::remove_dir_all(scratch);
    admin(&format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)")).await;
    if let Err(panic) = outcome {
        let why = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!(
            "simulation seed {seed} failed after {steps} steps: {why}\n  reproduce: \
             XPAND_SIM_SEED={seed} cargo nextest run -E 'test(scheduler_simulation)'"
        );
    }
    let mut counts = counts;
    counts.insert("steps", u64::from(steps));
    counts
}

/// Copies the template (which nobody may be connected to while it is copied).
async fn create_from_template(name: &str, template: &str) {
    let mut conn = PgConnection::connect(&format!("{}/postgres", pg_server()))
        .await
        .unwrap();
    for attempt in 0.. {
        // The migrator can leave an idle connection on the template behind its pool's close.
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
            .bind(template)
            .execute(&mut conn)
            .await
            .unwrap();
        let created = sqlx::query(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
            .execute(&mut conn)
            .await;
        match created {
            Ok(_) => return,
            Err(e) if attempt < 50 && e.to_string().contains("being accessed by other users") => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await
            }
            Err(e) => panic!("copying the template database: {e}"),
        }
    }
}

async fn admin(sql: &str) {
    let mut conn = PgConnection::connect(&format!("{}/postgres", pg_server()))
        .await
        .unwrap();
    sqlx::query(sql).execute(&mut conn).await.unwrap();
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_simulation_keeps_every_invariant() {
    let seeds: Vec<u64> = match env_u64("XPAND_SIM_SEED") {
        Some(seed) => vec![seed],
        None => {
            let first = env_u64("XPAND_SIM_FIRST_SEED").unwrap_or(1);
            (first..first + env_u64("XPAND_SIM_SEEDS").unwrap_or(100)).collect()
        }
    };
    // One migrated database, copied for each seed.
    let template = crate::common::create_database().await;
    let pool = PgPool::connect(&format!("{}/{template}", pg_server()))
        .await
        .unwrap();
    xpand::startup::migrate(&pool).await.unwrap();
    pool.close().await;

    let started = Instant::now();
    let totals = std::sync::Mutex::new(HashMap::<&'static str, u64>::new());
    let outcome = std::panic::AssertUnwindSafe(
        futures::stream::iter(seeds.iter().copied()).for_each_concurrent(4, |seed| {
            let (template, totals) = (&template, &totals);
            async move {
                let counts = run_seed(seed, template).await;
                let mut totals = totals.lock().unwrap();
                for (k, v) in counts {
                    *totals.entry(k).or_default() += v;
                }
            }
        }),
    )
    .catch_unwind()
    .await;
    admin(&format!("DROP DATABASE IF EXISTS {template} WITH (FORCE)")).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    let mut totals: Vec<_> = totals.into_inner().unwrap().into_iter().collect();
    totals.sort();
    eprintln!(
        "simulation: {} seeds in {:.1} s: {totals:?}",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
}
