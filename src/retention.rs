//! Customer data has a lifetime (`XPAND_RETENTION_HOURS`, default 7 days): files are deleted
//! that long after they were stored, and a finished job's input and output (with its shards'
//! tasks and outputs, which hold the same rows) are erased that long after it finished. What
//! the money needs stays: the job's price, status and times, and its ledger entries. A file
//! an unfinished job still reads outlives its retention until the job ends.

use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;
use sqlx::PgPool;
use uuid::Uuid;

use crate::shutdown::Shutdown;

/// Rows handled per statement, so one round never holds locks for long.
const BATCH: i64 = 500;

/// What one [`expire`] call removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    pub files: usize,
    pub jobs: usize,
}

/// Deletes files and erases finished jobs' data older than `retention`.
pub async fn expire(
    db: &PgPool,
    store: &Arc<dyn ObjectStore>,
    retention: Duration,
) -> sqlx::Result<Expired> {
    let secs = retention.as_secs_f64();
    let mut expired = Expired::default();
    // A file an unfinished job still reads waits for the job. Rows are locked first, then
    // re-checked against the jobs in a new statement, which sees every job committed by then
    // (a submit holds its files until it commits).
    const NOT_READ: &str = "NOT EXISTS (SELECT 1 FROM jobs j WHERE j.input_files @> ARRAY[f.id]
                                        AND j.status IN ('queued', 'running'))";
    loop {
        let mut tx = db.begin().await?;
        let due: Vec<Uuid> = sqlx::query_scalar(&format!(
            "SELECT id FROM files f WHERE created_at < now() - $1 * interval '1 second'
               AND {NOT_READ}
             LIMIT $2 FOR UPDATE SKIP LOCKED"
        ))
        .bind(secs)
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await?;
        let files: Vec<Uuid> = sqlx::query_scalar(&format!(
            "DELETE FROM files f WHERE f.id = ANY($1) AND {NOT_READ} RETURNING id"
        ))
        .bind(&due)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        for id in &files {
            crate::files::remove_object(store, *id).await;
        }
        expired.files += files.len();
        if (due.len() as i64) < BATCH {
            break;
        }
    }
    loop {
        let mut tx = db.begin().await?;
        let jobs: Vec<Uuid> = sqlx::query_scalar(
            "UPDATE jobs SET input = '{}'::jsonb, output = NULL, data_expired_at = now()
             WHERE id IN (
                 SELECT id FROM jobs
                 WHERE data_expired_at IS NULL AND finished_at < now() - $1 * interval '1 second'
                 LIMIT $2 FOR UPDATE SKIP LOCKED)
             RETURNING id",
        )
        .bind(secs)
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query("UPDATE shards SET task = '{}'::jsonb, output = NULL WHERE job_id = ANY($1)")
            .bind(&jobs)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        expired.jobs += jobs.len();
        if (jobs.len() as i64) < BATCH {
            return Ok(expired);
        }
    }
}

/// Expires what is due every minute (or sooner for short retentions) until `shutdown`.
pub async fn run_expirer(
    db: PgPool,
    store: Arc<dyn ObjectStore>,
    retention: Duration,
    shutdown: Shutdown,
) {
    let every = (retention / 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait() => return,
        }
        match expire(&db, &store, retention).await {
            Ok(e) if e != Expired::default() => {
                tracing::info!(files = e.files, jobs = e.jobs, "expired customer data");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "expiring customer data failed"),
        }
    }
}
