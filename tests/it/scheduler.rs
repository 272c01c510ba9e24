//! The job state machine against Postgres alone: leases, silent nodes, stragglers, votes and
//! settlement, driven through the domain's own functions. The interfaces the domain defines
//! (presence, the node link, the event feed) get in-memory stand-ins here; no Redis, MQTT or
//! worker runs, so each case states exactly which node is up and what it answers.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;
use xpand::config::Scheduling;
use xpand::jobs::dispatch::{self, Dispatched};
use xpand::jobs::ports::{NodeLink, SealedMessage};
use xpand::jobs::results::{self, Refused};
use xpand::jobs::sweep::{self, Lost};
use xpand::jobs::{
    settlement, EventSink, JobEvent, JobStatus, Scheduler, SchedulerParts, SubmitJob, Submitted,
};
use xpand::nodes::Presence;
use xpand_protocol::{
    Accelerator, Announce, Assignment, ModelInfo, NodeKey, ShardOutput, ShardTask, Stop, Topics,
    UpKind,
};

use crate::common::{
    assert_ledger_invariants, create_database, drop_database, result_for, sheet, test_config,
    Leftovers,
};

/// Nodes are up exactly when the test says so.
#[derive(Default)]
struct Up(Mutex<HashSet<String>>);

impl Presence for Up {
    fn alive<'a>(&'a self, nodes: &'a [String]) -> BoxFuture<'a, anyhow::Result<Vec<bool>>> {
        let up = self.0.lock().unwrap();
        let alive = nodes.iter().map(|n| up.contains(n)).collect();
        Box::pin(async move { Ok(alive) })
    }

    fn uptime_slots<'a>(
        &'a self,
        _epoch: i64,
        nodes: &'a [String],
    ) -> BoxFuture<'a, anyhow::Result<Vec<i64>>> {
        Box::pin(async move { Ok(vec![0; nodes.len()]) })
    }
}

/// Seals like the gateway, delivers nowhere, remembers what it was given.
struct Outbox {
    key: NodeKey,
    topics: Topics,
    sent: Mutex<Vec<SealedMessage>>,
    stops: Mutex<Vec<Stop>>,
}

impl NodeLink for Outbox {
    fn seal_assignment(&self, assignment: &Assignment) -> SealedMessage {
        let topic = self.topics.assign(&assignment.node);
        let payload = self.key.seal(&topic, assignment);
        SealedMessage { topic, payload }
    }

    fn send(&self, message: SealedMessage) -> BoxFuture<'_, anyhow::Result<()>> {
        self.sent.lock().unwrap().push(message);
        Box::pin(async { Ok(()) })
    }

    fn send_stop<'a>(&'a self, stop: &'a Stop) -> BoxFuture<'a, ()> {
        self.stops.lock().unwrap().push(stop.clone());
        Box::pin(async {})
    }
}

#[derive(Default)]
struct Feed(Mutex<Vec<JobEvent>>);

impl EventSink for Feed {
    fn publish(&self, _account: Uuid, event: JobEvent) -> BoxFuture<'_, ()> {
        self.0.lock().unwrap().push(event);
        Box::pin(async {})
    }
}

/// A scheduler on a fresh database, with one funded customer.
struct Domain {
    scheduler: Scheduler,
    db: PgPool,
    up: Arc<Up>,
    outbox: Arc<Outbox>,
    feed: Arc<Feed>,
    account: Uuid,
    topics: Topics,
    leftovers: Leftovers,
}

const CREDIT: i64 = 10_000_000;

impl Domain {
    async fn new(adjust: impl FnOnce(&mut Scheduling)) -> Self {
        let db_name = create_database().await;
        let config = test_config(&db_name);
        let leftovers = Leftovers::new(
            &db_name,
            &config.redis_prefix,
            vec![config.files_dir.clone(), config.scratch_dir.clone()],
        );
        let db = xpand::startup::connect_db(&config).await.unwrap();
        xpand::startup::migrate(&db).await.unwrap();
        let mut rules = config.scheduling;
        // The cases place shards by hand ([`Domain::assign`]), unless one says otherwise.
        rules.place_at_submit = false;
        adjust(&mut rules);
        let topics = Topics::new(&config.topic_prefix);
        let up = Arc::new(Up::default());
        let outbox = Arc::new(Outbox {
            key: config.gateway_key.clone(),
            topics: topics.clone(),
            sent: Mutex::default(),
            stops: Mutex::default(),
        });
        let feed = Arc::new(Feed::default());
        let transfers = xpand::transfers::TransferUrls::new(&config.gateway_key, "http://0.0.0.0");
        let scheduler = Scheduler::new(SchedulerParts {
            db: db.clone(),
            rules,
            kinds: xpand::kinds::registry(&config, transfers),
            presence: up.clone(),
            link: outbox.clone(),
            events: feed.clone(),
            metrics: xpand::metrics::Metrics::new(),
            files: xpand::files::local_store(&config.files_dir).unwrap(),
            egress: config.egress.clone(),
            max_unfinished_jobs: 100,
            gateway_key: config.gateway_key.clone(),
            challenge_topic: format!("{}/v1/challenges", config.topic_prefix),
        });
        let (account, _) = xpand::accounts::create_customer(&db, "domain", CREDIT)
            .await
            .unwrap();
        Self {
            scheduler,
            db,
            up,
            outbox,
            feed,
            account,
            topics,
            leftovers,
        }
    }

    /// A registered forecast node that announced 4 slots and is up.
    async fn node(&self, name: &str) -> String {
        self.node_with_slots(name, 4).await
    }

    /// A registered forecast node that announced `slots` slots and is up.
    async fn node_with_slots(&self, name: &str, slots: u32) -> String {
        let key = NodeKey::generate();
        let id = key.id().to_string();
        xpand::nodes::register(&self.db, &id, name).await.unwrap();
        let announce = Announce {
            name: name.into(),
            models: vec![ModelInfo {
                name: xpand::kinds::forecast::MODEL.into(),
                version: "1.0.0".into(),
                kind: "forecast".into(),
                sha256: "0".repeat(64),
            }],
            accelerator: Accelerator::Cpu,
            memory_mb: 1024,
            cpu_cores: 1,
            max_concurrent_shards: slots,
            worker_version: "test".into(),
            started_at_ms: 0,
            held_models: Vec::new(),
        };
        let envelope = key.seal(&self.topics.up(&id, UpKind::Announce), &announce);
        let now = xpand_protocol::now_ms();
        xpand::nodes::record_announce(&self.db, &id, now, &announce, &envelope)
            .await
            .unwrap();
        self.set_up(&id, true);
        id
    }

    fn set_up(&self, node: &str, up: bool) {
        let mut nodes = self.up.0.lock().unwrap();
        if up {
            nodes.insert(node.into());
        } else {
            nodes.remove(node);
        }
    }

    /// A forecast job of `rows` rows (8 rows a shard), submitted as an HTTP handler would.
    async fn submit(&self, rows: usize) -> Uuid {
        let req = SubmitJob {
            kind: "forecast".into(),
            input: json!({ "series": sheet(rows, 36) }),
            params: json!({ "horizon": 3 }),
            max_fee: CREDIT,
            webhook: None,
            deadline: None,
        };
        match xpand::jobs::submit(&self.scheduler, self.account, &req, None)
            .await
            .unwrap()
        {
            Submitted::Created(job) => job.id,
            Submitted::Existing(_) => unreachable!("no idempotency key was sent"),
        }
    }

    async fn assign(&self) -> Vec<Assignment> {
        dispatch::assign(&self.scheduler)
            .await
            .unwrap()
            .dispatched
            .into_iter()
            .map(|Dispatched { assignment, .. }| assignment)
            .collect()
    }

    /// Answers `a` as its node would, each value `bias` off the right answer (1.0 everywhere).
    async fn answer(&self, a: &Assignment, bias: f64) -> anyhow::Result<()> {
        let result = forecast_result(a, bias, 0);
        results::on_result(&self.scheduler, &a.node, result).await
    }

    async fn status(&self, job: Uuid) -> JobStatus {
        sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1")
            .bind(job)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    async fn failures(&self, node: &str, reason: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM node_failures WHERE node_id = $1 AND reason = $2")
            .bind(node)
            .bind(reason)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    /// What a shard pays the node that completes it.
    async fn fee(&self, shard: Uuid) -> i64 {
        sqlx::query_scalar("SELECT fee FROM shards WHERE id = $1")
            .bind(shard)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    async fn earnings(&self, node: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT COALESCE(l.balance, 0) FROM nodes n
             LEFT JOIN ledger_accounts l ON l.owner = n.account_id AND l.purpose = 'earnings'
             WHERE n.id = $1",
        )
        .bind(node)
        .fetch_one(&self.db)
        .await
        .unwrap()
    }

    /// Checks the ledger and removes the database.
    async fn finish(mut self) {
        assert_ledger_invariants(&self.db).await;
        self.db.close().await;
        drop_database(&self.leftovers.db_name).await;
        let _ = std::fs::remove_dir_all(&self.leftovers.dirs[0]);
        self.leftovers.disarm();
    }
}

/// The result a node sends for forecast assignment `a`: each value `bias` off the right answer
/// (1.0 everywhere), with `extra_rows` rows more than it was given (a malformed answer).
fn forecast_result(a: &Assignment, bias: f64, extra_rows: usize) -> xpand_protocol::ShardResult {
    let ShardTask::Forecast {
        series, horizon, ..
    } = &a.task
    else {
        panic!("forecast jobs have forecast shards");
    };
    let output = ShardOutput::Forecast {
        forecasts: vec![vec![1.0 + bias; *horizon as usize]; series.len() + extra_rows],
        intervals: Vec::new(),
    };
    result_for(a, output)
}

fn refused(result: anyhow::Result<()>) -> Option<Refused> {
    result.err()?.downcast_ref::<Refused>().copied()
}

#[tokio::test]
async fn a_small_job_is_placed_in_its_submit_unless_shards_wait_before_it() {
    let domain = Domain::new(|r| r.place_at_submit = true).await;
    let node = domain.node("a").await;
    let small = domain.submit(8).await;
    assert_eq!(
        domain.status(small).await,
        JobStatus::Running,
        "placed and started by its submit, with no dispatch round"
    );
    let sent = std::mem::take(&mut *domain.outbox.sent.lock().unwrap());
    assert_eq!(sent.len(), 1, "its assignment went out after the commit");
    assert_eq!(sent[0].topic, domain.topics.assign(&node));
    let opened = xpand_protocol::Envelope::open(
        &sent[0].payload,
        &sent[0].topic,
        xpand_protocol::now_ms(),
        30_000,
    )
    .unwrap();
    let assignment: Assignment = opened.parse().unwrap();
    assert_eq!(
        (assignment.job_id, assignment.node.as_str()),
        (small, node.as_str())
    );
    domain.answer(&assignment, 0.0).await.unwrap();
    assert_eq!(domain.status(small).await, JobStatus::Succeeded);

    // A job of several shards is left to the dispatcher; a small one submitted while its shards
    // wait does not pass them.
    let large = domain.submit(40).await;
    let behind = domain.submit(8).await;
    assert_eq!(domain.status(large).await, JobStatus::Queued);
    assert_eq!(domain.status(behind).await, JobStatus::Queued);
    assert!(domain.outbox.sent.lock().unwrap().is_empty());
    let round = domain.assign().await;
    assert_eq!(round.len(), 4, "the node's four slots");
    assert!(round.iter().all(|a| a.job_id == large), "oldest job first");
    domain.finish().await;
}

#[tokio::test]
async fn a_lapsed_lease_sends_the_shard_to_another_node_and_charges_the_first() {
    let domain = Domain::new(|r| r.lease = Duration::ZERO).await;
    let slow = domain.node("slow").await;
    let job = domain.submit(8).await;
    let first = domain.assign().await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].node, slow);
    tokio::time::sleep(Duration::from_millis(5)).await;

    let lost = sweep::requeue_lost(&domain.scheduler, Lost::LeaseLapsed)
        .await
        .unwrap();
    assert_eq!(lost, 1);
    assert_eq!(domain.failures(&slow, "lease_lapsed").await, 1);
    let fresh = domain.node("fresh").await;
    let second = domain.assign().await;
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].node, fresh, "the node that lost it is tried last");

    // The first node's late answer is for an assignment that is no longer current.
    assert_eq!(
        refused(domain.answer(&first[0], 0.0).await),
        Some(Refused::StaleAssignment)
    );
    domain.answer(&second[0], 0.0).await.unwrap();
    assert_eq!(domain.status(job).await, JobStatus::Succeeded);
    assert!(domain.earnings(&fresh).await > 0);
    assert_eq!(domain.earnings(&slow).await, 0);
    domain.finish().await;
}

#[tokio::test]
async fn a_silent_node_loses_its_shards_at_the_next_sweep() {
    let domain = Domain::new(|r| r.lease = Duration::from_secs(3600)).await;
    let node = domain.node("quiet").await;
    let job = domain.submit(16).await;
    assert_eq!(domain.assign().await.len(), 2);
    domain.set_up(&node, false);

    sweep::sweep(&domain.scheduler).await.unwrap();
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM shards WHERE job_id = $1 AND status = 'pending'")
            .bind(job)
            .fetch_one(&domain.db)
            .await
            .unwrap();
    assert_eq!(
        pending, 2,
        "both shards are back in the queue, long before the lease"
    );
    assert_eq!(domain.failures(&node, "node_lost").await, 2);
    assert!(
        domain.assign().await.is_empty(),
        "no node is up to take them"
    );
    domain.finish().await;
}

#[tokio::test]
async fn a_straggler_gets_one_copy_and_the_first_answer_wins() {
    let domain = Domain::new(|r| {
        r.straggler_min_secs = 0.0;
        r.straggler_factor = 3.0;
    })
    .await;
    domain.node("a").await;
    domain.node("b").await;
    let job = domain.submit(16).await;
    let round = domain.assign().await;
    assert_eq!(round.len(), 2);
    let (fast, slow) = (&round[0], &round[1]);
    assert_ne!(fast.node, slow.node, "a job's shards spread over the nodes");
    domain.answer(fast, 0.0).await.unwrap();
    // Nothing straggles yet: the slow shard has not run 3× the finished one's time.
    sqlx::query("UPDATE shards SET completed_at = assigned_at + interval '1 second' WHERE id = $1")
        .bind(fast.shard_id)
        .execute(&domain.db)
        .await
        .unwrap();
    let rules = domain.scheduler.rules;
    assert!(sweep::speculate(&domain.db, &rules)
        .await
        .unwrap()
        .is_empty());

    sqlx::query("UPDATE shards SET assigned_at = now() - interval '1 minute' WHERE id = $1")
        .bind(slow.shard_id)
        .execute(&domain.db)
        .await
        .unwrap();
    let copied = sweep::speculate(&domain.db, &rules).await.unwrap();
    assert_eq!(copied, vec![slow.shard_id]);
    assert!(
        sweep::speculate(&domain.db, &rules)
            .await
            .unwrap()
            .is_empty(),
        "one copy per straggler"
    );
    let copies = domain.assign().await;
    assert_eq!(copies.len(), 1);
    let copy = &copies[0];
    assert_eq!(copy.node, fast.node, "never the node already running it");

    domain.answer(copy, 0.0).await.unwrap();
    assert_eq!(domain.status(job).await, JobStatus::Succeeded);
    let stops = domain.outbox.stops.lock().unwrap().clone();
    assert_eq!(stops.len(), 1);
    assert_eq!(
        (stops[0].node.as_str(), stops[0].assignment_id),
        (slow.node.as_str(), slow.assignment_id)
    );
    assert_eq!(
        refused(domain.answer(slow, 0.0).await),
        Some(Refused::StaleAssignment)
    );
    assert_eq!(
        domain.earnings(&slow.node).await,
        0,
        "the copy's node is paid"
    );
    domain.finish().await;
}

#[tokio::test]
async fn two_agreeing_runs_outvote_a_third_which_is_charged_and_challenged() {
    let domain = Domain::new(|r| {
        r.redundancy_bps = 10_000;
        r.verify_new_node_shards = 0;
    })
    .await;
    for name in ["a", "b", "c"] {
        domain.node(name).await;
    }
    let job = domain.submit(8).await;
    let primary = domain.assign().await.remove(0);
    domain.answer(&primary, 0.0).await.unwrap();
    assert_eq!(
        domain.status(job).await,
        JobStatus::Running,
        "held for a check"
    );

    let replica = domain.assign().await.remove(0);
    assert_ne!(replica.node, primary.node);
    domain.answer(&replica, 50.0).await.unwrap();
    assert_eq!(
        domain.status(job).await,
        JobStatus::Running,
        "a tie-break runs"
    );

    let third = domain.assign().await.remove(0);
    assert!(![&primary.node, &replica.node].contains(&&third.node));
    domain.answer(&third, 0.0).await.unwrap();
    assert_eq!(domain.status(job).await, JobStatus::Succeeded);

    let output: serde_json::Value = sqlx::query_scalar("SELECT output FROM jobs WHERE id = $1")
        .bind(job)
        .fetch_one(&domain.db)
        .await
        .unwrap();
    assert_eq!(output["forecasts"][0], json!([1.0, 1.0, 1.0]));
    assert_eq!(domain.failures(&replica.node, "disputed").await, 1);
    let loser: String = sqlx::query_scalar("SELECT loser FROM challenges WHERE job_id = $1")
        .bind(job)
        .fetch_one(&domain.db)
        .await
        .unwrap();
    assert_eq!(loser, replica.node);
    assert!(domain.earnings(&primary.node).await > 0);
    domain.finish().await;
}

#[tokio::test]
async fn cancel_pays_done_shards_refunds_the_rest_and_drops_late_answers() {
    let domain = Domain::new(|_| {}).await;
    let node = domain.node("a").await;
    let job = domain.submit(16).await;
    let round = domain.assign().await;
    domain.answer(&round[0], 0.0).await.unwrap();
    let fee = domain.fee(round[0].shard_id).await;

    let canceled = settlement::cancel(&domain.scheduler, domain.account, job)
        .await
        .unwrap();
    assert_eq!(canceled.status, JobStatus::Canceled);
    assert_eq!(canceled.cost, Some(fee));
    let balances = xpand::ledger::balances(&domain.db, domain.account)
        .await
        .unwrap();
    assert_eq!((balances.available, balances.held), (CREDIT - fee, 0));
    assert_eq!(domain.earnings(&node).await, fee);
    assert_eq!(
        refused(domain.answer(&round[1], 0.0).await),
        Some(Refused::StaleAssignment)
    );
    let events = domain.feed.0.lock().unwrap().clone();
    assert!(
        matches!(events.last(), Some(JobEvent::Canceled { .. })),
        "{events:?}"
    );
    // What was paid for is in the output, in place; the rest is marked missing. The paid
    // shard's partial went out before the `canceled` event.
    let streamed: Vec<(i32, serde_json::Value)> = events
        .iter()
        .filter_map(|e| match e {
            JobEvent::Partial { offset, rows, .. } => Some((*offset, rows.clone())),
            _ => None,
        })
        .collect();
    let [(offset, rows)] = streamed.as_slice() else {
        panic!("one shard was done: {events:?}");
    };
    let output = canceled.output.expect("a canceled job keeps its paid rows");
    let forecasts = output["forecasts"].as_array().unwrap();
    assert_eq!(forecasts.len(), 16);
    let paid = rows.as_array().unwrap();
    let at = *offset as usize;
    assert_eq!(&forecasts[at..at + paid.len()], paid.as_slice());
    let nulls = forecasts.iter().filter(|r| r.is_null()).count();
    assert_eq!(nulls, 16 - paid.len());
    let missing: i64 = output["missing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["rows"].as_i64().unwrap())
        .sum();
    assert_eq!(missing as usize, nulls);
    domain.finish().await;
}

#[tokio::test]
async fn a_job_past_its_deadline_is_canceled_paying_the_work_done_and_saying_why() {
    let domain = Domain::new(|_| {}).await;
    let node = domain.node("a").await;
    let job = domain.submit(16).await;
    let round = domain.assign().await;
    domain.answer(&round[0], 0.0).await.unwrap();
    let fee = domain.fee(round[0].shard_id).await;
    sweep::sweep(&domain.scheduler).await.unwrap();
    assert_eq!(
        domain.status(job).await,
        JobStatus::Running,
        "no deadline yet"
    );
    sqlx::query("UPDATE jobs SET deadline = now() - interval '1 second' WHERE id = $1")
        .bind(job)
        .execute(&domain.db)
        .await
        .unwrap();
    sweep::sweep(&domain.scheduler).await.unwrap();
    assert_eq!(domain.status(job).await, JobStatus::Canceled);
    assert_eq!(
        error_code(&domain, job).await.as_deref(),
        Some("deadline_exceeded")
    );
    let balances = xpand::ledger::balances(&domain.db, domain.account)
        .await
        .unwrap();
    assert_eq!((balances.available, balances.held), (CREDIT - fee, 0));
    assert_eq!(domain.earnings(&node).await, fee);
    let output: serde_json::Value = sqlx::query_scalar("SELECT output FROM jobs WHERE id = $1")
        .bind(job)
        .fetch_one(&domain.db)
        .await
        .unwrap();
    let paid = output["forecasts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| !r.is_null())
        .count();
    assert_eq!(paid, round[0].task.chunks() as usize);
    let events = domain.feed.0.lock().unwrap().clone();
    assert!(matches!(events.last(), Some(JobEvent::Canceled { .. })));
    domain.finish().await;
}

/// `a`'s node gives it back, saying whether the input itself is unusable.
async fn reject(domain: &Domain, a: &Assignment, input_unusable: bool) {
    let reject = xpand_protocol::Reject {
        assignment_id: a.assignment_id,
        shard_id: a.shard_id,
        reason: "test".into(),
        input_unusable,
    };
    results::on_reject(&domain.scheduler, &a.node, &reject)
        .await
        .unwrap();
}

async fn error_code(domain: &Domain, job: Uuid) -> Option<String> {
    sqlx::query_scalar("SELECT error->>'code' FROM jobs WHERE id = $1")
        .bind(job)
        .fetch_one(&domain.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_rejected_shard_goes_to_the_other_node_and_fails_its_job_at_the_cap_at_once() {
    let domain = Domain::new(|r| r.max_shard_attempts = 3).await;
    let (a, b) = (domain.node("a").await, domain.node("b").await);
    let job = domain.submit(8).await;
    let first = domain.assign().await;
    reject(&domain, &first[0], false).await;
    let second = domain.assign().await;
    assert_eq!(second.len(), 1);
    assert_ne!(
        second[0].node, first[0].node,
        "never back to its rejecter first"
    );
    reject(&domain, &second[0], false).await;
    // Both rejected it: either may have it again, until the cap.
    let third = domain.assign().await;
    assert!([&a, &b].contains(&&third[0].node));
    reject(&domain, &third[0], false).await;
    // The third reject spent the last attempt: the job ended there, with no sweep.
    assert_eq!(domain.status(job).await, JobStatus::Failed);
    assert_eq!(
        error_code(&domain, job).await.as_deref(),
        Some("shard_attempts_exhausted")
    );
    assert!(domain.assign().await.is_empty(), "nothing left to send");
    let balances = xpand::ledger::balances(&domain.db, domain.account)
        .await
        .unwrap();
    assert_eq!((balances.available, balances.held), (CREDIT, 0));
    let excluded: Vec<String> =
        sqlx::query_scalar("SELECT excluded_nodes FROM shards WHERE job_id = $1")
            .bind(job)
            .fetch_one(&domain.db)
            .await
            .unwrap();
    assert_eq!(excluded.len(), 2, "each rejecter once: {excluded:?}");
    domain.finish().await;
}

#[tokio::test]
async fn an_input_two_nodes_call_unusable_fails_its_job_and_pays_the_work_done() {
    let domain = Domain::new(|_| {}).await;
    let (a, b) = (domain.node("a").await, domain.node("b").await);
    let job = domain.submit(16).await;
    let round = domain.assign().await;
    assert_eq!(round.len(), 2);
    let (done, bad) = (&round[0], &round[1]);
    domain.answer(done, 0.0).await.unwrap();
    let fee = domain.fee(done.shard_id).await;
    // One node calling the input unusable is not enough: it might be the node.
    reject(&domain, bad, true).await;
    assert_eq!(domain.status(job).await, JobStatus::Running);
    let again = domain.assign().await;
    assert_eq!(again.len(), 1);
    assert_ne!(
        again[0].node, bad.node,
        "a second opinion comes from another node"
    );
    reject(&domain, &again[0], true).await;

    assert_eq!(domain.status(job).await, JobStatus::Failed);
    assert_eq!(
        error_code(&domain, job).await.as_deref(),
        Some("input_unusable")
    );
    assert!(domain.assign().await.is_empty(), "nothing left to send");
    let balances = xpand::ledger::balances(&domain.db, domain.account)
        .await
        .unwrap();
    assert_eq!(
        (balances.available, balances.held),
        (CREDIT - fee, 0),
        "the caller pays for the shard done, nothing else"
    );
    let paid = |node: &String| if *node == done.node { fee } else { 0 };
    assert_eq!(domain.earnings(&a).await, paid(&a));
    assert_eq!(domain.earnings(&b).await, paid(&b));
    domain.finish().await;
}

/// Job and shard rows read by sequential scans so far, counted once every other connection to
/// the database is gone: a backend reports its counts as it exits, and those still open are
/// ended (their counts then come in too).
async fn rows_scanned(url: &str) -> (i64, i64) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let others =
        "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()";
    sqlx::query(&format!("SELECT pg_terminate_backend(pid) {others}"))
        .execute(&mut conn)
        .await
        .unwrap();
    for _ in 0..100 {
        let left: i64 = sqlx::query_scalar(&format!("SELECT count(*) {others}"))
            .fetch_one(&mut conn)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sqlx::query_as(
        "SELECT COALESCE(sum(seq_tup_read) FILTER (WHERE relname = 'jobs'), 0)::bigint,
                COALESCE(sum(seq_tup_read) FILTER (WHERE relname = 'shards'), 0)::bigint
         FROM pg_stat_user_tables",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap()
}

/// Every job read the whole `shards` table once (finish had no index by job, nor the verify
/// sweep one by status), so throughput fell as history grew. With the load test's own history
/// seeder, a job's whole life and a sweep must read no table from end to end.
#[tokio::test]
async fn a_long_history_makes_no_job_scan_a_whole_table() {
    const HISTORY: usize = 20_000;
    let domain = Domain::new(|r| {
        r.redundancy_bps = 10_000;
        r.verify_new_node_shards = 0;
    })
    .await;
    for name in ["a", "b"] {
        domain.node(name).await;
    }
    let url = format!(
        "{}/{}",
        crate::common::pg_server(),
        domain.leftovers.db_name
    );
    let seeded = std::process::Command::new("loadtests/history/seed.sh")
        .args([&url, &HISTORY.to_string()])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(seeded.success());
    let before = rows_scanned(&url).await;

    // A job of two shards, each held for a check and confirmed by a replica, then a sweep.
    let job = domain.submit(16).await;
    while domain.status(job).await != JobStatus::Succeeded {
        let round = domain.assign().await;
        assert!(!round.is_empty(), "the job is stuck");
        for a in &round {
            domain.answer(a, 0.0).await.unwrap();
        }
    }
    sweep::sweep(&domain.scheduler).await.unwrap();
    assert_ledger_invariants(&domain.db).await;

    domain.db.close().await;
    let after = rows_scanned(&url).await;
    let (jobs, shards) = (after.0 - before.0, after.1 - before.1);
    assert!(
        jobs < HISTORY as i64 && shards < HISTORY as i64,
        "sequential scans read {jobs} job rows and {shards} shard rows of a {HISTORY}-job history"
    );
    // Still armed: dropping it removes the database and directories.
    drop(domain.leftovers);
}

/// What happens to one shard's answer in [`settling_as_a_batch_or_one_by_one_moves_the_same_money`].
#[derive(Debug, Clone, Copy)]
enum Fate {
    Right,
    /// Malformed: refused, its node charged, its shard back in the queue.
    Malformed,
    /// Sent twice: the copy is stale.
    Twice,
}

/// Everything settling decided, with the ids that differ between two databases replaced by
/// what they stand for (`customer`, `node`, `system`; a job by its submission order).
#[derive(Debug, PartialEq)]
struct Settled {
    refusals: Vec<Option<Refused>>,
    jobs: Vec<(String, Option<i64>)>,
    balances: Vec<(String, String, i64)>,
    entries: Vec<(String, Option<usize>, String, String, i64)>,
}

/// Submits `jobs` (their row counts) to one node, answers every shard by its fate (cycling
/// through `fates`), and settles the answers one by one or all together.
async fn settle_answers(jobs: &[usize], fates: &[Fate], together: bool) -> Settled {
    let domain = Domain::new(|r| {
        r.redundancy_bps = 0;
        r.verify_new_node_shards = 0;
    })
    .await;
    let node = domain.node_with_slots("solo", 64).await;
    let mut ids = Vec::new();
    for &rows in jobs {
        ids.push(domain.submit(rows).await);
    }
    let mut round = Vec::new();
    for a in domain.assign().await {
        let idx: i32 = sqlx::query_scalar("SELECT idx FROM shards WHERE id = $1")
            .bind(a.shard_id)
            .fetch_one(&domain.db)
            .await
            .unwrap();
        let job = ids.iter().position(|&id| id == a.job_id).unwrap();
        round.push(((job, idx), a));
    }
    round.sort_by_key(|(order, _)| *order);
    let mut answers = Vec::new();
    for (k, (_, a)) in round.iter().enumerate() {
        match fates[k % fates.len()] {
            Fate::Right => answers.push((node.clone(), forecast_result(a, 0.0, 0))),
            Fate::Malformed => answers.push((node.clone(), forecast_result(a, 0.0, 1))),
            Fate::Twice => {
                answers.push((node.clone(), forecast_result(a, 0.0, 0)));
                answers.push((node.clone(), forecast_result(a, 0.0, 0)));
            }
        }
    }
    let count = answers.len();
    let outcomes = if together {
        results::on_results(&domain.scheduler, answers).await
    } else {
        let mut outcomes = Vec::new();
        for (node, result) in answers {
            outcomes.push(results::on_result(&domain.scheduler, &node, result).await);
        }
        outcomes
    };
    let metrics = &domain.scheduler.metrics;
    if together && count > 1 {
        assert_eq!(
            (
                metrics.result_batch_size.get_sample_count(),
                metrics.result_batch_size.get_sample_sum()
            ),
            (1, count as f64),
            "the answers were settled as one batch"
        );
    }
    assert_eq!(
        metrics.result_batches_split.get(),
        0,
        "no batch had to be split"
    );

    let node_account: Uuid = sqlx::query_scalar("SELECT account_id FROM nodes WHERE id = $1")
        .bind(&node)
        .fetch_one(&domain.db)
        .await
        .unwrap();
    let role = |owner: Uuid| {
        if owner == domain.account {
            "customer"
        } else if owner == node_account {
            "node"
        } else if owner == Uuid::nil() {
            "system"
        } else {
            panic!("money moved for an unknown owner {owner}")
        }
        .to_string()
    };
    let mut job_states = Vec::new();
    for id in &ids {
        let state: (String, Option<i64>) =
            sqlx::query_as("SELECT status, cost FROM jobs WHERE id = $1")
                .bind(id)
                .fetch_one(&domain.db)
                .await
                .unwrap();
        job_states.push(state);
    }
    let balances: Vec<(Uuid, String, i64)> =
        sqlx::query_as("SELECT owner, purpose, balance FROM ledger_accounts")
            .fetch_all(&domain.db)
            .await
            .unwrap();
    let mut balances: Vec<_> = balances
        .into_iter()
        .map(|(owner, purpose, balance)| (role(owner), purpose, balance))
        .collect();
    balances.sort();
    let entries: Vec<(String, Option<Uuid>, Uuid, String, i64)> = sqlx::query_as(
        "SELECT t.kind, t.job_id, a.owner, a.purpose, e.amount FROM ledger_entries e
         JOIN ledger_transactions t ON t.id = e.tx_id
         JOIN ledger_accounts a ON a.id = e.ledger_account_id",
    )
    .fetch_all(&domain.db)
    .await
    .unwrap();
    let mut entries: Vec<_> = entries
        .into_iter()
        .map(|(kind, job, owner, purpose, amount)| {
            let job = job.map(|job| ids.iter().position(|&id| id == job).unwrap());
            (kind, job, role(owner), purpose, amount)
        })
        .collect();
    entries.sort();
    domain.finish().await;
    Settled {
        refusals: outcomes.into_iter().map(refused).collect(),
        jobs: job_states,
        balances,
        entries,
    }
}

/// A batch must be nothing but a faster way to settle: the same answers settled one by one and
/// as one batch, with malformed and stale members among them, refuse the same answers and
/// leave the same jobs, balances and ledger entries.
#[test]
fn settling_as_a_batch_or_one_by_one_moves_the_same_money() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 6,
        max_shrink_iters: 16,
        source_file: Some(file!()),
        ..Config::default()
    });
    let fate = prop_oneof![
        4 => Just(Fate::Right),
        1 => Just(Fate::Malformed),
        1 => Just(Fate::Twice),
    ];
    let plans = (
        prop::collection::vec(1usize..=24, 1..=5),
        prop::collection::vec(fate, 1..=8),
    );
    let result = runner.run(&plans, |(jobs, fates)| {
        rt.block_on(async {
            let one_by_one = settle_answers(&jobs, &fates, false).await;
            let together = settle_answers(&jobs, &fates, true).await;
            prop_assert_eq!(one_by_one, together);
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
