//! Sync mode: `Prefer: wait` on `POST /v1/jobs` answers with the finished job when it ends in
//! time, with the running one when it does not, and refuses a malformed wait before anything
//! is charged.

use reqwest::header::HeaderValue;
use xpand::jobs::{Job, JobStatus};

use crate::common::{forecast_job, forecasts, problem, read, TestApp};

const CREDIT: i64 = 50_000_000;

/// `POST /v1/jobs` with `Prefer: <prefer>`.
async fn submit_preferring(
    app: &TestApp,
    key: &str,
    prefer: &str,
    rows: usize,
) -> reqwest::Response {
    app.http
        .post(format!("{}/v1/jobs", app.base))
        .bearer_auth(key)
        .header("prefer", prefer)
        .json(&forecast_job(rows, 6))
        .send()
        .await
        .unwrap()
}

fn applied(resp: &reqwest::Response) -> Option<&HeaderValue> {
    resp.headers().get("preference-applied")
}

#[tokio::test]
async fn a_job_that_ends_in_time_comes_back_finished_and_settled() {
    let mut app = TestApp::spawn().await;
    app.start_worker().await;
    app.start_worker().await;
    let (_, key) = app.customer(CREDIT).await;

    let resp = submit_preferring(&app, &key, "wait=30", 40).await;
    assert_eq!(resp.status(), 201);
    assert_eq!(applied(&resp).unwrap(), "wait=30");
    let job: Job = read(resp).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    assert_eq!(forecasts(&job).len(), 40);
    assert_eq!(job.cost, Some(job.quote));
    // What the response said is what the job is, and the money moved with it.
    assert_eq!(app.job(&key, job.id).await.output, job.output);
    assert_eq!(app.balances(&key).await, (CREDIT - job.quote, 0));

    // A bare `wait` among other preferences means the longest wait.
    let resp = submit_preferring(&app, &key, "respond-async, wait; foo=bar", 8).await;
    assert_eq!(applied(&resp).unwrap(), "wait=60");
    assert_eq!(read::<Job>(resp).await.status, JobStatus::Succeeded);
    app.assert_ledger_invariants().await;
    app.teardown().await;
}

#[tokio::test]
async fn a_job_that_cannot_end_in_time_comes_back_running_after_the_wait() {
    // No worker: the job can only wait.
    let app = TestApp::spawn().await;
    let (_, key) = app.customer(CREDIT).await;

    let resp = submit_preferring(&app, &key, "wait=1", 8).await;
    assert_eq!(resp.status(), 201);
    assert_eq!(applied(&resp).unwrap(), "wait=1");
    let job: Job = read(resp).await;
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(job.escrow, job.quote);

    // A zero wait answers at once; other preferences alone change nothing.
    let resp = submit_preferring(&app, &key, "wait=0", 8).await;
    assert_eq!(applied(&resp).unwrap(), "wait=0");
    let resp = submit_preferring(&app, &key, "respond-async", 8).await;
    assert!(applied(&resp).is_none());
    assert_eq!(read::<Job>(resp).await.status, JobStatus::Queued);
    app.teardown().await;
}

#[tokio::test]
async fn a_malformed_wait_is_refused_naming_the_header_and_charges_nothing() {
    let app = TestApp::spawn().await;
    let (_, key) = app.customer(CREDIT).await;
    for prefer in ["wait=soon", "wait=-1", "wait=1.5"] {
        let resp = submit_preferring(&app, &key, prefer, 8).await;
        assert_eq!(resp.status(), 422, "{prefer}");
        let problem = problem(resp).await;
        assert_eq!(problem.errors[0].field, "Prefer", "{prefer}");
    }
    assert_eq!(app.balances(&key).await, (CREDIT, 0));
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(jobs, 0, "a refused request leaves no job");
    app.teardown().await;
}
