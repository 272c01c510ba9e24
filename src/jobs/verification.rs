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
use xpand_protocol::{Detection, ShardOutput, ShardTask};

use crate::config::Config;
use crate::ledger;
use crate::nodes::{self, Failure};
use crate::state::AppState;

/// Forecast values of two runs agree within this relative tolerance (CPU and GPU kernels, or
/// two ONNX Runtime builds, differ in the last bits).
const FORECAST_TOLERANCE: f64 = 1e-3;
/// Two detections are the same face when their boxes overlap at least this much (IoU).
const BOX_IOU: f64 = 0.5;
/// Two video runs agree when at least this share of frames has matching detections.
const FRAMES_AGREEING: f64 = 0.95;

/// Whether a primary result of `model` from `node` (which had done `done_before` shards) should
/// wait for a replica: sampled, or the node is new — and another live node holds the model (a
/// lone node cannot be checked; its results are taken as they are).
pub async fn wanted(
    state: &AppState,
    node: &str,
    done_before: i64,
    model: &str,
) -> anyhow::Result<bool> {
    let config = &state.config;
    let sampled = rand::random::<u32>() % 10_000 < config.redundancy_bps;
    if !sampled && done_before >= config.verify_new_node_shards {
        return Ok(false);
    }
    nodes::another_serves(&state.db, &state.liveness, model, node).await
}

/// Queues one more run of `primary` (same task, no fee) for a node not in `ran_on`.
pub async fn add_replica(
    conn: &mut PgConnection,
    primary: Uuid,
    ran_on: &[String],
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO shards (id, job_id, idx, row_offset, row_count, model, task, fee, status,
                             excluded_nodes, replica_of)
         SELECT $1, job_id, idx, row_offset, row_count, model, task, 0, 'pending', $3, id
         FROM shards WHERE id = $2",
    )
    .bind(Uuid::now_v7())
    .bind(primary)
    .bind(ran_on)
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

#[derive(sqlx::FromRow)]
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

/// Decides a `verifying` primary from its finished runs, in the caller's transaction (which holds
/// the job row lock). Records the challenge and charges the loser when a third run settled a
/// disagreement.
pub async fn resolve(
    conn: &mut PgConnection,
    config: &Config,
    job_id: Uuid,
    primary: Uuid,
) -> anyhow::Result<Verdict> {
    let head: Option<(String, sqlx::types::Json<ShardTask>)> = sqlx::query_as(
        "SELECT status, task FROM shards WHERE id = $1 AND status = 'verifying' FOR UPDATE",
    )
    .bind(primary)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((_, task)) = head else {
        return Ok(Verdict::Open);
    };
    let runs: Vec<Run> = sqlx::query_as(
        "SELECT node_id, output, output_sha256 FROM shards
         WHERE (id = $1 OR (replica_of = $1 AND status = 'done' AND NOT speculative))
         ORDER BY replica_of NULLS FIRST, completed_at",
    )
    .bind(primary)
    .fetch_all(&mut *conn)
    .await?;
    let agree = |a: &Run, b: &Run| outputs_agree(&task.0, &a.output.0, &b.output.0);
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
            record_challenge(conn, config, job_id, primary, loser, [winner, other]).await?;
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
    config: &Config,
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
    let topic = format!("{}/v1/challenges", config.topic_prefix);
    let envelope = config.gateway_key.seal(&topic, &challenge);
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

/// The per-kind rule for "the same answer".
pub fn outputs_agree(task: &ShardTask, a: &ShardOutput, b: &ShardOutput) -> bool {
    match (task, a, b) {
        (
            ShardTask::Forecast { .. },
            ShardOutput::Forecast { forecasts: x },
            ShardOutput::Forecast { forecasts: y },
        ) => {
            x.len() == y.len()
                && x.iter().zip(y).all(|(r, s)| {
                    r.len() == s.len()
                        && r.iter().zip(s).all(|(u, v)| {
                            (u - v).abs() <= FORECAST_TOLERANCE * u.abs().max(v.abs()).max(1.0)
                        })
                })
        }
        (
            ShardTask::Anonymize(_),
            ShardOutput::Anonymize { detections: x, .. },
            ShardOutput::Anonymize { detections: y, .. },
        ) => {
            if x.len() != y.len() {
                return false;
            }
            let matching = x.iter().zip(y).filter(|(f, g)| same_faces(f, g)).count();
            matching as f64 >= FRAMES_AGREEING * x.len() as f64
        }
        _ => false,
    }
}

fn same_faces(a: &[Detection], b: &[Detection]) -> bool {
    a.len() == b.len() && a.iter().all(|d| b.iter().any(|e| iou(d, e) >= BOX_IOU))
}

fn iou(a: &Detection, b: &Detection) -> f64 {
    let w = (a.x2.min(b.x2) - a.x1.max(b.x1)).max(0) as f64;
    let h = (a.y2.min(b.y2) - a.y1.max(b.y1)).max(0) as f64;
    let inter = w * h;
    let area = |d: &Detection| ((d.x2 - d.x1) * (d.y2 - d.y1)) as f64;
    let union = area(a) + area(b) - inter;
    if union <= 0.0 {
        0.0
    } else {
        inter / union
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forecast(values: &[f64]) -> ShardOutput {
        ShardOutput::Forecast {
            forecasts: vec![values.to_vec()],
        }
    }

    #[test]
    fn forecasts_agree_within_tolerance_only() {
        let task = ShardTask::Forecast {
            series: vec![vec![1.0, 2.0, 3.0]],
            horizon: 2,
        };
        assert!(outputs_agree(
            &task,
            &forecast(&[100.0, 0.5]),
            &forecast(&[100.05, 0.5004])
        ));
        assert!(!outputs_agree(
            &task,
            &forecast(&[100.0, 0.5]),
            &forecast(&[101.0, 0.5])
        ));
        assert!(!outputs_agree(
            &task,
            &forecast(&[100.0]),
            &forecast(&[100.0, 1.0])
        ));
    }

    #[test]
    fn detections_agree_by_overlap() {
        let d = |x1, y1, x2, y2| Detection {
            x1,
            y1,
            x2,
            y2,
            score: 900,
        };
        let video = |frames: Vec<Vec<Detection>>| ShardOutput::Anonymize {
            detections: frames,
            video_sha256: String::new(),
            video_bytes: 1,
        };
        let task = ShardTask::Anonymize(xpand_protocol::AnonymizeTask {
            input_url: String::new(),
            output_url: String::new(),
            frames: 20,
            width: 640,
            height: 360,
            fps_num: 25,
            fps_den: 1,
            style: xpand_protocol::MaskStyle::Blur,
            threshold: 0.2,
            crf: 23,
        });
        let a = video(vec![vec![d(100, 100, 200, 200)]; 20]);
        let nudged = video(vec![vec![d(104, 98, 203, 199)]; 20]);
        assert!(outputs_agree(&task, &a, &nudged));
        let mut one_off = vec![vec![d(100, 100, 200, 200)]; 20];
        one_off[3] = vec![];
        assert!(outputs_agree(&task, &a, &video(one_off)), "19 of 20 frames");
        let elsewhere = video(vec![vec![d(300, 100, 400, 200)]; 20]);
        assert!(!outputs_agree(&task, &a, &elsewhere));
        let none = video(vec![vec![]; 20]);
        assert!(!outputs_agree(&task, &a, &none));
    }
}
