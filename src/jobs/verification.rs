//! Verification by redundancy: some results are not believed until another node agrees.
//!
//! A primary shard's result is held (`verifying`) when sampling picks it (`XPAND_REDUNDANCY_BPS`)
//! or its node is new (fewer than `XPAND_VERIFY_NEW_NODE_SHARDS` shards done). A replica — the
//! same task, no fee — then runs on a node that has not run the shard. Agreement (per kind:
//! numbers within a tolerance, detections by box overlap) accepts the primary. Disagreement adds
//! a third run on a third node; the pair that agrees wins, the outvoted node is charged a
//! `disputed` failure (its power score drops) and a challenge is recorded, signed by the gateway
//! and sealed into the ledger's records. Replicas earn no fee, so the caller pays once; the work
//! counts in the nodes' power scores.
//!
//! This is verification by replication and signed commitments, not a proof of computation: two
//! colluding nodes that agree on a wrong answer pass.

use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;
use xpand_protocol::{ShardOutput, ShardTask};

use super::kind::JobKind;
use super::Scheduler;
use crate::ledger;
use crate::nodes::{self, Failure};

/// Whether a primary result of `model` from `node` (which had done `done_before` shards) should
/// wait for a replica: sampled, or the node is new — and another live node holds the model (a
/// lone node cannot be checked; its results are taken as they are).
pub async fn wanted(
    scheduler: &Scheduler,
    node: &str,
    done_before: i64,
    model: &str,
) -> anyhow::Result<bool> {
    let rules = &scheduler.rules;
    let sampled = rand::random::<u32>() % 10_000 < rules.redundancy_bps;
    if !sampled && done_before >= rules.verify_new_node_shards {
        return Ok(false);
    }
    nodes::another_serves(&scheduler.db, scheduler.presence.as_ref(), model, node).await
}

/// Queues one more run of `primary` (same task, no fee) for a node not in `ran_on`.
pub async fn add_replica(
    conn: &mut PgConnection,
    primary: Uuid,
    ran_on: &[String],
) -> sqlx::Result<()> {
    sqlx::query!(
        "INSERT INTO shards (id, job_id, idx, row_offset, row_count, model, task, fee, status,
                             excluded_nodes, replica_of)
         SELECT $1, job_id, idx, row_offset, row_count, model, task, 0, 'pending', $3, id
         FROM shards WHERE id = $2",
        Uuid::now_v7(),
        primary,
        ran_on
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// What the runs of a primary shard decide.
pub enum Verdict {
    /// Not decided yet (a tie-breaking run was queued), or the primary is no longer waiting.
    Open,
    /// This output, by this node, is the shard's result.
    Accept {
        node: String,
        output: ShardOutput,
        output_sha256: String,
    },
    /// Three runs and no two agree: the shard runs again from scratch elsewhere.
    Rerun,
}

struct Run {
    node_id: String,
    output: sqlx::types::Json<ShardOutput>,
    output_sha256: String,
}

#[derive(Serialize)]
struct Challenge<'a> {
    challenge_id: Uuid,
    job_id: Uuid,
    shard_id: Uuid,
    loser: &'a str,
    loser_output_sha256: &'a str,
    winners: [&'a str; 2],
    winning_output_sha256: &'a str,
    detail: &'a str,
}

/// Decides a `verifying` primary from its finished runs, by `kind`'s rule for the same answer,
/// in the caller's transaction (which holds the job row lock). Records the challenge and
/// charges the loser when a third run settled a disagreement.
pub async fn resolve(
    conn: &mut PgConnection,
    scheduler: &Scheduler,
    kind: &dyn JobKind,
    job_id: Uuid,
    primary: Uuid,
) -> anyhow::Result<Verdict> {
    let task = sqlx::query_scalar!(
        r#"SELECT task AS "task: sqlx::types::Json<ShardTask>" FROM shards
           WHERE id = $1 AND status = 'verifying' FOR UPDATE"#,
        primary
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some(task) = task else {
        return Ok(Verdict::Open);
    };
    // Every run here has answered: its node, output and digest are set.
    let runs = sqlx::query_as!(
        Run,
        r#"SELECT node_id AS "node_id!", output AS "output!: sqlx::types::Json<ShardOutput>",
                  output_sha256 AS "output_sha256!"
           FROM shards
           WHERE (id = $1 OR (replica_of = $1 AND status = 'done' AND NOT speculative))
           ORDER BY replica_of NULLS FIRST, completed_at"#,
        primary
    )
    .fetch_all(&mut *conn)
    .await?;
    let agree = |a: &Run, b: &Run| kind.outputs_agree(&task.0, &a.output.0, &b.output.0);
    match runs.as_slice() {
        [first, second] if agree(first, second) => Ok(accept(first)),
        [first, second] => {
            add_replica(
                conn,
                primary,
                &[first.node_id.clone(), second.node_id.clone()],
            )
            .await?;
            Ok(Verdict::Open)
        }
        [first, second, third] => {
            let (loser, winner, other) = if agree(first, third) {
                (second, first, third)
            } else if agree(second, third) {
                (first, second, third)
            } else {
                return Ok(Verdict::Rerun);
            };
            record_challenge(conn, scheduler, job_id, primary, loser, [winner, other]).await?;
            Ok(accept(winner))
        }
        _ => Ok(Verdict::Open),
    }
}

fn accept(run: &Run) -> Verdict {
    Verdict::Accept {
        node: run.node_id.clone(),
        output: run.output.0.clone(),
        output_sha256: run.output_sha256.clone(),
    }
}

async fn record_challenge(
    conn: &mut PgConnection,
    scheduler: &Scheduler,
    job_id: Uuid,
    shard_id: Uuid,
    loser: &Run,
    winners: [&Run; 2],
) -> anyhow::Result<()> {
    let challenge_id = Uuid::now_v7();
    let detail = "outvoted: two other nodes agreed on a different output";
    let challenge = Challenge {
        challenge_id,
        job_id,
        shard_id,
        loser: &loser.node_id,
        loser_output_sha256: &loser.output_sha256,
        winners: [&winners[0].node_id, &winners[1].node_id],
        winning_output_sha256: &winners[0].output_sha256,
        detail,
    };
    // Signed like an assignment, so the sealed record says who judged. The ledger keeps only
    // its digest; the envelope stays here, to be shown to whoever disputes the verdict.
    let envelope = scheduler
        .gateway_key
        .seal(&scheduler.challenge_topic, &challenge);
    sqlx::query(
        "INSERT INTO challenges (id, job_id, shard_id, loser, winners, detail, envelope)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(challenge_id)
    .bind(job_id)
    .bind(shard_id)
    .bind(&loser.node_id)
    .bind([winners[0].node_id.clone(), winners[1].node_id.clone()])
    .bind(detail)
    .bind(String::from_utf8_lossy(&envelope))
    .execute(&mut *conn)
    .await?;
    ledger::blocks::record(conn, "challenge", &loser.node_id, &envelope).await?;
    nodes::charge_failures(
        conn,
        &[(loser.node_id.clone(), shard_id)],
        Failure::Disputed,
    )
    .await?;
    tracing::warn!(node = %loser.node_id, shard = %shard_id, "a node was outvoted");
    Ok(())
}
