//! Dispatch: pending shards matched to live nodes with room, fairly across accounts, each
//! assignment signed once, recorded, sealed and sent.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use sqlx::PgConnection;
use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;
use xpand_protocol::{Accelerator, Assignment, ShardTask};

use super::ports::SealedMessage;
use super::store::{self, WebhookEvent};
use super::{JobEvent, JobStatus, Scheduler};
use crate::ledger;
use crate::nodes;
use crate::shutdown::Shutdown;

/// Assigns pending shards whenever woken (new jobs, freed capacity) or every tick.
pub async fn run_dispatcher(scheduler: Scheduler, shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = scheduler.woken() => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = shutdown.wait() => return,
        }
        loop {
            match dispatch_once(&scheduler).await {
                Ok(Drained::Yes) => break,
                Ok(Drained::No) => continue,
                Err(e) => {
                    tracing::warn!(error = ?e, "dispatch round failed");
                    break;
                }
            }
        }
    }
}

/// A shard waiting for a node, with what placement must know of it.
pub(super) struct PendingShard {
    id: Uuid,
    job_id: Uuid,
    kind: String,
    model: String,
    task: sqlx::types::Json<ShardTask>,
    excluded_nodes: Vec<String>,
    rejected_by: Vec<String>,
    ran_on: Vec<String>,
}

impl PendingShard {
    /// A shard just planned, which no node has run, rejected or lost.
    pub(super) fn new(id: Uuid, job_id: Uuid, kind: &str, model: &str, task: ShardTask) -> Self {
        Self {
            id,
            job_id,
            kind: kind.to_string(),
            model: model.to_string(),
            task: sqlx::types::Json(task),
            excluded_nodes: Vec::new(),
            rejected_by: Vec::new(),
            ran_on: Vec::new(),
        }
    }
}

/// One round: [`assign`], then send what it signed.
async fn dispatch_once(scheduler: &Scheduler) -> anyhow::Result<Drained> {
    let Round {
        dispatched,
        drained,
    } = assign(scheduler).await?;
    send(scheduler, dispatched).await;
    Ok(drained)
}

/// Sends assignments recorded and committed (by a round, or by a submit that placed its job).
pub(super) async fn send(scheduler: &Scheduler, dispatched: Vec<Dispatched>) {
    for Dispatched {
        assignment,
        kind,
        message,
    } in dispatched
    {
        if let Err(e) = scheduler.link.send(message).await {
            // The lease will lapse and the shard will be offered again.
            tracing::warn!(error = %e, shard = %assignment.shard_id, "sending an assignment failed");
        }
        scheduler
            .metrics
            .dispatched_shards
            .with_label_values(&[kind])
            .inc();
    }
}

/// Whether a round left nothing it could place: every placeable pending shard was assigned,
/// or no slot is free. The dispatcher then waits to be woken rather than asking again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    Yes,
    No,
}

/// What one [`assign`] round did.
pub struct Round {
    pub dispatched: Vec<Dispatched>,
    pub drained: Drained,
}

impl Round {
    fn drained() -> Self {
        Round {
            dispatched: Vec::new(),
            drained: Drained::Yes,
        }
    }
}

/// An assignment recorded in Postgres, with its job's kind and the message that carries it.
pub struct Dispatched {
    pub assignment: Assignment,
    pub kind: &'static str,
    pub message: SealedMessage,
}

/// Matches pending shards to live nodes with room and records the assignments (each signed
/// once: the same bytes are sealed into the ledger and returned for sending). Jobs that got
/// their first shard turn `running`.
///
/// Invariant: while a live node with a free slot may run some pending shard, the round
/// assigns at least one ([`placeable_pending`]).
pub async fn assign(scheduler: &Scheduler) -> anyhow::Result<Round> {
    // Most wakes (a result freed a slot) find nothing waiting: one cheap look says so.
    if !any_pending(&scheduler.db).await? {
        return Ok(Round::drained());
    }
    // One placement at a time on this replica, so two never count the same free slot.
    let _placing = scheduler.placing.lock().await;
    let mut slots = free_slots(scheduler).await?;
    let capacity: i64 = slots.iter().map(|s| s.free).sum();
    if capacity == 0 {
        return Ok(Round::drained());
    }
    let mut tx = scheduler.db.begin().await?;
    let (pending, placeable) = placeable_pending(
        &mut tx,
        &slots,
        capacity,
        scheduler.rules.max_shard_attempts,
    )
    .await?;
    // Fewer placeable shards than free slots: this round takes all there are.
    let drained = if (placeable as i64) < capacity {
        Drained::Yes
    } else {
        Drained::No
    };
    let recorded = place(scheduler, &mut tx, &mut slots, pending).await?;
    if recorded.dispatched.is_empty() {
        return Ok(Round::drained());
    }
    tx.commit().await?;
    Ok(Round {
        dispatched: recorded.announce(scheduler).await,
        drained,
    })
}

/// The free slots of live nodes whose last epoch scored at least the floor (a node below it,
/// for failures or disputes, gets no work).
async fn free_slots(scheduler: &Scheduler) -> anyhow::Result<Vec<nodes::NodeSlot>> {
    let mut slots = nodes::available(&scheduler.db, scheduler.presence.as_ref()).await?;
    let floor = scheduler.rules.min_power_score;
    slots.retain(|s| s.score.is_none_or(|score| score >= floor));
    Ok(slots)
}

/// A placement at submit, granted: this replica's placement turn, held until the submit
/// commits, and the free slots it may use.
pub(super) struct SubmitPlacement {
    _turn: OwnedMutexGuard<()>,
    slots: Vec<nodes::NodeSlot>,
}

/// Whether a submit may place its one-shard jobs itself ([`place`] in its transaction): when
/// the rules allow it, no dispatch round runs on this replica (a submit never waits for one;
/// the round will place the job instead), no shard waits for a node (it would be passed by),
/// and some node has a free slot.
pub(super) async fn placement_at_submit(
    scheduler: &Scheduler,
) -> anyhow::Result<Option<SubmitPlacement>> {
    if !scheduler.rules.place_at_submit {
        return Ok(None);
    }
    let Ok(turn) = scheduler.placing.clone().try_lock_owned() else {
        return Ok(None);
    };
    if any_pending(&scheduler.db).await? {
        return Ok(None);
    }
    let slots = free_slots(scheduler).await?;
    if slots.iter().all(|s| s.free == 0) {
        return Ok(None);
    }
    Ok(Some(SubmitPlacement { _turn: turn, slots }))
}

impl SubmitPlacement {
    /// Places `shards` (new, of jobs in the caller's transaction) where [`choose_slot`] says.
    pub(super) async fn place(
        &mut self,
        scheduler: &Scheduler,
        tx: &mut PgConnection,
        shards: Vec<PendingShard>,
    ) -> anyhow::Result<Recorded> {
        place(scheduler, tx, &mut self.slots, shards).await
    }
}

/// Assignments recorded in a transaction, to announce once it commits.
#[derive(Default)]
pub(super) struct Recorded {
    dispatched: Vec<Dispatched>,
    started: Vec<(Uuid, JobEvent)>,
}

impl Recorded {
    /// Tells the owners of jobs that started that they run; returns the assignments to send.
    /// Told before the assignments go out, so no result can overtake its job's `running`.
    pub(super) async fn announce(self, scheduler: &Scheduler) -> Vec<Dispatched> {
        scheduler.events.publish_all(self.started).await;
        self.dispatched
    }
}

/// Matches `pending` to `slots` ([`choose_slot`]) and records the assignments in `tx` (each
/// signed once: the same bytes are sealed into the ledger and returned for sending). Jobs that
/// got their first shard turn `running`.
async fn place(
    scheduler: &Scheduler,
    tx: &mut PgConnection,
    slots: &mut [nodes::NodeSlot],
    pending: Vec<PendingShard>,
) -> anyhow::Result<Recorded> {
    let lease_expires_at = Utc::now() + scheduler.rules.lease;
    let mut assignments = Vec::with_capacity(pending.len());
    let mut kinds = Vec::with_capacity(pending.len());
    for shard in pending {
        let warm = match &shard.task.0 {
            ShardTask::Predict(task) => Some(task.sha256.as_str()),
            _ => None,
        };
        let Some(slot) = choose_slot(
            slots,
            &shard.model,
            warm,
            &shard.excluded_nodes,
            &shard.rejected_by,
            &shard.ran_on,
        ) else {
            continue;
        };
        slot.free -= 1;
        let kind = scheduler.kinds.of(&shard.kind)?;
        let assignment_id = Uuid::new_v4();
        let mut task = shard.task.0;
        kind.prepare(&mut task, assignment_id);
        kinds.push(kind.name());
        assignments.push(Assignment {
            assignment_id,
            job_id: shard.job_id,
            shard_id: shard.id,
            node: slot.id.clone(),
            model: shard.model,
            lease_expires_at_ms: lease_expires_at.timestamp_millis(),
            task,
        });
    }
    if assignments.is_empty() {
        return Ok(Recorded::default());
    }
    let shard_ids: Vec<Uuid> = assignments.iter().map(|a| a.shard_id).collect();
    let node_ids: Vec<&str> = assignments.iter().map(|a| a.node.as_str()).collect();
    let assignment_ids: Vec<Uuid> = assignments.iter().map(|a| a.assignment_id).collect();
    sqlx::query(
        "UPDATE shards s SET status = 'assigned', node_id = u.node, assignment_id = u.assignment,
                attempts = s.attempts + 1, lease_expires_at = $4, assigned_at = now(),
                progress_done = 0, progress_chain = NULL
         FROM UNNEST($1::uuid[], $2::text[], $3::uuid[]) AS u(shard, node, assignment)
         WHERE s.id = u.shard",
    )
    .bind(&shard_ids)
    .bind(&node_ids)
    .bind(&assignment_ids)
    .bind(lease_expires_at)
    .execute(&mut *tx)
    .await?;
    // Each assignment is signed once: the same bytes are sealed into the ledger and sent.
    let mut messages = Vec::with_capacity(assignments.len());
    for a in &assignments {
        let message = scheduler.link.seal_assignment(a);
        ledger::blocks::record(&mut *tx, "assignment", &a.node, &message.payload).await?;
        messages.push(message);
    }
    // Jobs that got their first shard turn `running` in this transaction. Their rows are
    // taken only if free (`SKIP LOCKED`; a submit's own rows are its own): waiting for a job
    // lock while holding shard locks would invert the job → shard lock order. A job skipped
    // here (being canceled, say) turns `running` with its first result instead.
    let mut job_ids: Vec<Uuid> = assignments.iter().map(|a| a.job_id).collect();
    job_ids.sort();
    job_ids.dedup();
    let started = sqlx::query!(
        r#"UPDATE jobs SET status = 'running', started_at = now(), updated_at = now()
         WHERE id IN (SELECT id FROM jobs WHERE id = ANY($1) AND status = 'queued'
                      FOR UPDATE SKIP LOCKED)
         RETURNING id, account_id, shards_done, shards_total,
                   webhook IS NOT NULL AS "has_webhook!""#,
        &job_ids
    )
    .fetch_all(&mut *tx)
    .await?;
    for job in started.iter().filter(|job| job.has_webhook) {
        let data = serde_json::json!({ "job_id": job.id, "status": JobStatus::Running });
        store::enqueue_webhook(&mut *tx, job.id, WebhookEvent::Start, Some(data)).await?;
    }
    let started = started
        .into_iter()
        .map(|job| {
            let progress = JobEvent::Progress {
                job_id: job.id,
                status: JobStatus::Running,
                shards_done: job.shards_done,
                shards_total: job.shards_total,
            };
            (job.account_id, progress)
        })
        .collect();
    let dispatched = assignments
        .into_iter()
        .zip(kinds)
        .zip(messages)
        .map(|((assignment, kind), message)| Dispatched {
            assignment,
            kind,
            message,
        })
        .collect();
    Ok(Recorded {
        dispatched,
        started,
    })
}

/// Whether any shard waits for a node at all.
async fn any_pending(db: &sqlx::PgPool) -> sqlx::Result<bool> {
    sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM shards WHERE status = 'pending') AS "any!""#
    )
    .fetch_one(db)
    .await
}

/// Up to `limit` pending shards that some slot in `slots` may run, fairest first, locked for
/// this round; and how many were placeable (a shard another round holds is skipped, not
/// waited for).
///
/// Only placeable shards are taken: a shard no free node may run now (its model is on no live
/// node with room, or every such node already ran it, or only nodes that rejected it have room
/// while another live node that holds its model has not) is skipped, never returned
/// at the head of the round, so it cannot block the shards behind it. Whatever is returned
/// first can be placed ([`choose_slot`] applies the same rules), hence a round with a free slot
/// that may run some pending shard dispatches one. A shard out of attempts, or whose input two
/// nodes called unusable, is never sent again: its job is being failed.
///
/// Fairness: accounts take turns, least served first, where an account's service is the shards
/// of its unfinished jobs already started (running or done). An account with 40 shards of its
/// 10,000-row job started waits behind another account's first shard. Within an account, jobs
/// run oldest first (a job's replicas with it), so each job finishes as soon as it can.
async fn placeable_pending(
    conn: &mut PgConnection,
    slots: &[nodes::NodeSlot],
    limit: i64,
    max_attempts: u32,
) -> sqlx::Result<(Vec<PendingShard>, usize)> {
    let mut live_nodes = Vec::new();
    let mut live_models = Vec::new();
    let mut has_room = Vec::new();
    for slot in slots {
        for model in &slot.models {
            live_nodes.push(slot.id.as_str());
            live_models.push(model.as_str());
            has_room.push(slot.free > 0);
        }
    }
    let ranked: Vec<(Uuid, String, Vec<String>)> = sqlx::query_as(
        "WITH live AS (SELECT * FROM UNNEST($1::text[], $2::text[], $3::bool[])
                       AS f(node, model, has_room)),
         candidate AS (
             SELECT s.id, s.job_id, s.idx, s.model, s.replica_of, s.rejected_by,
                    j.account_id, j.created_at, j.kind,
                    -- For a replica or speculative copy: the nodes that already produced (or
                    -- are producing) a run of its primary. Nodes that merely lost it stay
                    -- eligible.
                    CASE WHEN s.replica_of IS NULL THEN '{}'::text[] ELSE ARRAY(
                        SELECT r.node_id FROM shards r
                        WHERE r.node_id IS NOT NULL
                          AND (r.id = s.replica_of
                               OR (r.replica_of = s.replica_of
                                   AND r.status IN ('assigned', 'done'))))
                    END AS ran_on
             FROM shards s JOIN jobs j ON j.id = s.job_id
             WHERE s.status = 'pending' AND s.model = ANY($2)
               AND s.attempts < $5 AND cardinality(s.input_refused_by) < 2),
         -- What each waiting account has started already: its unfinished jobs' shards that are
         -- no longer pending, counted per account on both sides (a join per job would compare
         -- every unfinished job with every waiting shard: a second a round at 1,000 of each).
         served AS (
             SELECT t.account_id, t.total - COALESCE(c.pending, 0) AS started
             FROM (SELECT j.account_id, sum(j.shards_total) AS total FROM jobs j
                   WHERE j.status IN ('queued', 'running')
                     AND j.account_id IN (SELECT account_id FROM candidate)
                   GROUP BY j.account_id) t
             LEFT JOIN (SELECT account_id, count(*) FILTER (WHERE replica_of IS NULL) AS pending
                        FROM candidate GROUP BY account_id) c ON c.account_id = t.account_id),
         ranked AS (
             SELECT c.*, s.started + row_number() OVER (
                        PARTITION BY c.account_id ORDER BY c.created_at, c.job_id, c.idx, c.id
                    ) AS account_turn
             FROM candidate c JOIN served s ON s.account_id = c.account_id
             WHERE EXISTS (
                 SELECT 1 FROM live f
                 WHERE f.has_room AND f.model = c.model AND f.node <> ALL(c.ran_on)
                   -- A node that rejected the shard takes it only when every live node that
                   -- holds the model, busy or not, rejected it too.
                   AND (f.node <> ALL(c.rejected_by)
                        OR NOT EXISTS (SELECT 1 FROM live g
                                       WHERE g.model = c.model AND g.node <> ALL(c.ran_on)
                                         AND g.node <> ALL(c.rejected_by)))))
         SELECT r.id, r.kind, r.ran_on FROM ranked r
         ORDER BY r.account_turn, r.created_at, r.job_id, r.idx, r.id
         LIMIT $4",
    )
    .bind(&live_nodes)
    .bind(&live_models)
    .bind(&has_room)
    .bind(limit)
    .bind(max_attempts as i32)
    .fetch_all(&mut *conn)
    .await?;
    // Locked by a statement of their own: joined back to `shards` in the ranking, the planner
    // misjudging a fresh table's row counts re-ran the whole ranking once per pending shard
    // (half a second a round at 1,000 waiting).
    let ids: Vec<Uuid> = ranked.iter().map(|(id, ..)| *id).collect();
    let mut locked: HashMap<Uuid, LockedPending> = sqlx::query_as(
        "SELECT id, job_id, model, task, excluded_nodes, rejected_by FROM shards
         WHERE id = ANY($1) AND status = 'pending'
         FOR UPDATE SKIP LOCKED",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|shard: LockedPending| (shard.id, shard))
    .collect();
    let placeable = ranked.len();
    let shards = ranked
        .into_iter()
        .filter_map(|(id, kind, ran_on)| {
            let shard = locked.remove(&id)?;
            Some(PendingShard {
                id,
                job_id: shard.job_id,
                kind,
                model: shard.model,
                task: shard.task,
                excluded_nodes: shard.excluded_nodes,
                rejected_by: shard.rejected_by,
                ran_on,
            })
        })
        .collect();
    Ok((shards, placeable))
}

/// A ranked shard's row, locked for the round.
#[derive(sqlx::FromRow)]
struct LockedPending {
    id: Uuid,
    job_id: Uuid,
    model: String,
    task: sqlx::types::Json<ShardTask>,
    excluded_nodes: Vec<String>,
    rejected_by: Vec<String>,
}

/// Where a shard of `model` goes: a node with a free slot, never one in `ran_on` (for a
/// replica or speculative copy, the nodes with a run of the same shard: it would vote twice or
/// race itself), and never one in `rejected_by` (it rejected the shard or returned a result
/// that failed its checks) while some live node that holds the model, busy or not, did not;
/// preferring nodes not in `excluded` (they also lost it: lapsed lease, silence, restart), then
/// nodes that hold the registry model `warm` names (they run it without fetching it; a cold
/// node still takes the shard when no warm one has room), then GPUs, then the least loaded
/// (which spreads a job's shards), then the best power score.
fn choose_slot<'a>(
    slots: &'a mut [nodes::NodeSlot],
    model: &str,
    warm: Option<&str>,
    excluded: &[String],
    rejected_by: &[String],
    ran_on: &[String],
) -> Option<&'a mut nodes::NodeSlot> {
    let may_run =
        |s: &nodes::NodeSlot| s.models.iter().any(|m| m == model) && !ran_on.contains(&s.id);
    let unrejected_lives = slots
        .iter()
        .any(|s| may_run(s) && !rejected_by.contains(&s.id));
    slots
        .iter_mut()
        .filter(|s| s.free > 0 && may_run(s))
        .filter(|s| !(unrejected_lives && rejected_by.contains(&s.id)))
        .min_by_key(|s| {
            (
                excluded.contains(&s.id),
                warm.is_some_and(|sha| !s.held.iter().any(|h| h == sha)),
                s.accelerator != Accelerator::Cuda,
                -s.free,
                -s.score.unwrap_or(0),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(id: &str, free: i64, accelerator: Accelerator, score: Option<i64>) -> nodes::NodeSlot {
        nodes::NodeSlot {
            id: id.into(),
            models: vec!["m".into()],
            free,
            accelerator,
            score,
            held: Vec::new(),
        }
    }

    fn owned(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    fn chosen(slots: &mut [nodes::NodeSlot], excluded: &[&str], ran_on: &[&str]) -> Option<String> {
        choose_slot(slots, "m", None, &owned(excluded), &[], &owned(ran_on)).map(|s| s.id.clone())
    }

    fn chosen_after_rejects(slots: &mut [nodes::NodeSlot], rejected_by: &[&str]) -> Option<String> {
        let rejected_by = owned(rejected_by);
        choose_slot(slots, "m", None, &rejected_by, &rejected_by, &[]).map(|s| s.id.clone())
    }

    #[test]
    fn placement_skips_rejecters_then_prefers_fresh_nodes_gpus_room_and_score() {
        use Accelerator::{Cpu, Cuda};
        let mut slots = [
            slot("cpu-roomy", 4, Cpu, Some(900)),
            slot("gpu-busy", 1, Cuda, None),
            slot("cpu-best", 4, Cpu, Some(5_000)),
        ];
        assert_eq!(chosen(&mut slots, &[], &[]).as_deref(), Some("gpu-busy"));
        assert_eq!(
            chosen(&mut slots, &["gpu-busy"], &[]).as_deref(),
            Some("cpu-best")
        );
        slots[2].free = 2;
        assert_eq!(
            chosen(&mut slots, &["gpu-busy"], &[]).as_deref(),
            Some("cpu-roomy")
        );
        // Everyone failed it before: it still goes somewhere. Nodes that ran it never get a
        // replica, but a node that only lost it does.
        let all = ["gpu-busy", "cpu-roomy", "cpu-best"];
        assert!(chosen(&mut slots, &all, &[]).is_some());
        assert_eq!(chosen(&mut slots, &all, &all), None);
        assert_eq!(
            chosen(&mut slots, &all, &["gpu-busy", "cpu-best"]).as_deref(),
            Some("cpu-roomy")
        );
        for s in &mut slots {
            s.free = 0;
        }
        assert_eq!(chosen(&mut slots, &[], &[]), None);
        // A node that rejected the shard never gets it again while a node that did not lives,
        // even a busy one: the shard waits for it. A node that only lost it may take it back.
        let mut waiting = [slot("rejected", 4, Cpu, None), slot("other", 0, Cpu, None)];
        assert_eq!(chosen_after_rejects(&mut waiting, &["rejected"]), None);
        assert_eq!(
            chosen(&mut waiting, &["rejected"], &[]).as_deref(),
            Some("rejected")
        );
        assert_eq!(
            chosen_after_rejects(&mut waiting, &["rejected", "other"]).as_deref(),
            Some("rejected")
        );
        waiting[1].free = 1;
        assert_eq!(
            chosen_after_rejects(&mut waiting, &["rejected"]).as_deref(),
            Some("other")
        );
        let mut other_model = [slot("x", 4, Cpu, None)];
        other_model[0].models = vec!["other".into()];
        assert_eq!(chosen(&mut other_model, &[], &[]), None);
    }

    #[test]
    fn a_node_that_holds_the_model_goes_first_and_a_cold_one_when_it_is_full() {
        use Accelerator::{Cpu, Cuda};
        let mut slots = [
            slot("cold-gpu", 4, Cuda, Some(5_000)),
            slot("warm", 1, Cpu, None),
        ];
        slots[1].held = vec!["abc".into()];
        let warm = |slots: &mut [nodes::NodeSlot]| {
            choose_slot(slots, "m", Some("abc"), &[], &[], &[]).map(|s| s.id.clone())
        };
        assert_eq!(warm(&mut slots).as_deref(), Some("warm"));
        slots[1].free = 0;
        assert_eq!(warm(&mut slots).as_deref(), Some("cold-gpu"));
        // Without a registry model, nothing changes.
        slots[1].free = 1;
        assert_eq!(chosen(&mut slots, &[], &[]).as_deref(), Some("cold-gpu"));
    }
}
