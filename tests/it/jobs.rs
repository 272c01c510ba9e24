//! Jobs over REST: the happy path with money checks, and every way a request can be refused.

use serde_json::{json, Value};
use uuid::Uuid;
use xpand::http::account::LedgerPage;
use xpand::http::jobs::JobPage;
use xpand::jobs::{Job, JobEvent, JobStatus};

use crate::common::{forecast_job, forecasts, parse, partial_rows, problem, read, sheet, TestApp};

const CREDIT: i64 = 50_000_000;

#[tokio::test]
async fn forecast_over_rest_settles_and_pays_workers() {
    let mut app = TestApp::spawn().await;
    app.start_worker().await;
    app.start_worker().await;
    let (_, key) = app.customer(CREDIT).await;

    let resp = app.post_json(&key, "/v1/jobs", &forecast_job(40, 12)).await;
    assert_eq!(resp.status(), 201);
    assert!(resp.headers()["location"]
        .to_str()
        .unwrap()
        .starts_with("/v1/jobs/"));
    let job: Job = read(resp).await;
    let quote = job.quote;
    assert_eq!(job.escrow, quote);
    assert_eq!(job.progress.shards_total, 5);
    assert_eq!(job.cost, None);

    let done = app.wait_for(&key, job.id).await;
    assert_eq!(done.status, JobStatus::Succeeded, "{done:?}");
    assert_eq!(done.progress.shards_done, 5);
    let forecasts = forecasts(&done);
    assert_eq!(forecasts.len(), 40);
    let input = sheet(40, 36);
    for (row, f) in input.iter().zip(&forecasts) {
        assert_eq!(f.len(), 12);
        assert!(f.iter().all(|v| v.is_finite()));
        // Each row has its own level (100 + 10·r): a forecast in the right row order stays
        // near its own row's level, not a neighbour's.
        let last = row[row.len() - 12..].iter().sum::<f64>() / 12.0;
        let mean = f.iter().sum::<f64>() / 12.0;
        assert!(
            (mean - last).abs() < 15.0,
            "forecast mean {mean} vs recent mean {last}"
        );
    }

    let cost = done.cost.unwrap();
    assert_eq!(cost, quote, "a succeeded job costs its quote");
    assert_eq!(app.balances(&key).await, (CREDIT - cost, 0));

    // Workers earned the shard fees; the gateway kept its job fee.
    let earned: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(balance), 0)::bigint FROM ledger_accounts WHERE purpose = 'earnings'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(earned, cost - xpand::kinds::forecast::PRICE_PER_JOB);
    let ledger: LedgerPage = app.get_as(&key, "/v1/account/ledger").await;
    let kinds: Vec<&str> = ledger.entries.iter().map(|e| e.kind.as_str()).collect();
    // Success refunds nothing, so the release moves only the held balance.
    assert_eq!(
        kinds,
        ["escrow_release", "escrow_hold", "escrow_hold", "deposit"]
    );
    app.assert_ledger_invariants().await;
    app.teardown().await;
}

#[tokio::test]
async fn short_balance_or_low_max_fee_is_refused_with_nothing_changed() {
    let app = TestApp::spawn().await;
    let (_, poor) = app.customer(100).await;
    let resp = app.post_json(&poor, "/v1/jobs", &forecast_job(8, 6)).await;
    assert_eq!(resp.status(), 402);
    let problem = problem(resp).await;
    assert_eq!(
        problem.type_uri,
        "https://xpand.dev/problems/insufficient-funds"
    );
    assert_eq!(problem.available, Some(100));
    assert_eq!(app.balances(&poor).await, (100, 0));

    let (_, rich) = app.customer(CREDIT).await;
    let mut job = forecast_job(8, 6);
    job["max_fee"] = json!(10);
    let resp = app.post_json(&rich, "/v1/jobs", &job).await;
    assert_eq!(resp.status(), 402);
    let problem = crate::common::problem(resp).await;
    assert_eq!(
        problem.type_uri,
        "https://xpand.dev/problems/max-fee-below-quote"
    );
    assert!(problem.quote.unwrap() > 10);
    assert_eq!(app.balances(&rich).await, (CREDIT, 0));

    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let shards: i64 = sqlx::query_scalar("SELECT count(*) FROM shards")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(
        (jobs, shards),
        (0, 0),
        "a refused job leaves nothing behind"
    );
    app.assert_ledger_invariants().await;
    app.teardown().await;
}

#[tokio::test]
async fn cancel_refunds_the_unspent_escrow() {
    // No workers: the job waits in the queue until canceled.
    let app = TestApp::spawn().await;
    let (_, key) = app.customer(CREDIT).await;
    let (_, job) = app.submit(&key, &forecast_job(20, 4)).await;
    let id = job.id;
    let quote = job.quote;
    assert_eq!(app.balances(&key).await, (CREDIT - quote, quote));

    let resp = app
        .post_json(&key, &format!("/v1/jobs/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(resp.status(), 200);
    let canceled: Job = read(resp).await;
    assert_eq!(canceled.status, JobStatus::Canceled);
    assert_eq!(canceled.cost, Some(0));
    assert_eq!(app.balances(&key).await, (CREDIT, 0));

    let again = app
        .post_json(&key, &format!("/v1/jobs/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(again.status(), 409);
    assert_eq!(
        app.balances(&key).await,
        (CREDIT, 0),
        "refunded exactly once"
    );
    let live_shards: i64 =
        sqlx::query_scalar("SELECT count(*) FROM shards WHERE status IN ('pending', 'assigned')")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(live_shards, 0);
    app.assert_ledger_invariants().await;
    app.teardown().await;
}

/// A job that no node can take before its deadline is canceled then, refunded, and says why.
#[tokio::test]
async fn a_deadline_cancels_a_job_still_waiting_and_refunds_it() {
    let app = TestApp::spawn().await;
    let (_, key) = app.customer(CREDIT).await;
    let mut job = forecast_job(4, 3);
    let deadline = chrono::Utc::now() + chrono::Duration::seconds(2);
    job["deadline"] = json!(deadline.to_rfc3339());
    let (_, queued) = app.submit(&key, &job).await;
    assert_eq!(
        queued.deadline.map(|d| d.timestamp()),
        Some(deadline.timestamp())
    );
    let ended = app.wait_for(&key, queued.id).await;
    assert_eq!(ended.status, JobStatus::Canceled);
    assert!(ended.finished_at.unwrap() >= deadline);
    let error = ended.error.expect("the job says why it ended");
    assert_eq!(error.code, "deadline_exceeded");
    assert_eq!(ended.cost, Some(0));
    assert_eq!(ended.output, None, "nothing was done, nothing to hand back");
    assert_eq!(app.balances(&key).await, (CREDIT, 0));
    app.assert_ledger_invariants().await;
    app.teardown().await;
}

#[tokio::test]
async fn idempotency_key_returns_the_same_job_and_charges_once() {
    let app = TestApp::spawn().await;
    let (_, key) = app.customer(CREDIT).await;
    let body = forecast_job(8, 3);
    let send = |body: Value| {
        app.http
            .post(format!("{}/v1/jobs", app.base))
            .bearer_auth(&key)
            .header("Idempotency-Key", "sheet-42-refresh-7")
            .json(&body)
            .send()
    };
    let first = send(body.clone()).await.unwrap();
    assert_eq!(first.status(), 201);
    let first: Job = read(first).await;
    let second = send(body.clone()).await.unwrap();
    assert_eq!(second.status(), 200);
    let second: Job = read(second).await;
    assert_eq!(first.id, second.id);
    let quote = first.quote;
    assert_eq!(app.balances(&key).await, (CREDIT - quote, quote));

    let mut different = body;
    different["params"]["horizon"] = json!(4);
    let resp = send(different).await.unwrap();
    assert_eq!(resp.status(), 422);
    let problem = problem(resp).await;
    assert_eq!(
        problem.type_uri,
        "https://xpand.dev/problems/idempotency-key-reused"
    );
    app.teardown().await;
}

#[tokio::test]
async fn another_accounts_job_is_not_found() {
    let app = TestApp::spawn().await;
    let (_, alice) = app.customer(CREDIT).await;
    let (_, mallory) = app.customer(CREDIT).await;
    let (_, job) = app.submit(&alice, &forecast_job(8, 3)).await;
    let id = job.id;
    for path in [format!("/v1/jobs/{id}"), format!("/v1/jobs/{id}/events")] {
        let resp = app.get(&mallory, &path).await;
        assert_eq!(resp.status(), 404, "{path}");
    }
    let resp = app
        .post_json(&mallory, &format!("/v1/jobs/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(resp.status(), 404);
    let listed: JobPage = app.get_as(&mallory, "/v1/jobs").await;
    assert_eq!(listed.jobs.len(), 0);
    assert_eq!(
        app.get(&alice, &format!("/v1/jobs/{id}")).await.status(),
        200
    );
    app.teardown().await;
}

#[tokio::test]
async fn bad_input_is_a_clear_problem_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let (_, key) = app.customer(CREDIT).await;
    let ok = forecast_job(2, 3);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = ok.clone();
        f(&mut v);
        v
    };
    // Raw JSON bodies on purpose: they are not valid `SubmitJob`s, so no typed value holds them.
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "wrong type",
            with(&|v| v["max_fee"] = json!("lots")),
            422,
            "max_fee",
        ),
        (
            "non-numeric cell",
            with(&|v| v["input"]["series"][1][7] = json!("n/a")),
            422,
            "input.series[1][7]",
        ),
        (
            "more blanks than a row may have",
            with(&|v| {
                for c in 2..14 {
                    v["input"]["series"][0][c] = Value::Null;
                }
            }),
            422,
            "input.series[0][12]",
        ),
        (
            "a deadline already past",
            with(&|v| v["deadline"] = json!("2020-01-01T00:00:00Z")),
            422,
            "deadline",
        ),
        (
            "an interval level as a fraction",
            with(&|v| v["params"]["level"] = json!([80, 0.95])),
            422,
            "params.level[1]",
        ),
        (
            "a season longer than the model reads",
            with(&|v| v["params"]["season_length"] = json!(365)),
            422,
            "params.season_length",
        ),
        (
            "empty series",
            with(&|v| v["input"]["series"] = json!([])),
            422,
            "input.series",
        ),
        (
            "empty row",
            with(&|v| v["input"]["series"][0] = json!([])),
            422,
            "input.series[0]",
        ),
        (
            "horizon 0",
            with(&|v| v["params"]["horizon"] = json!(0)),
            422,
            "params.horizon",
        ),
        (
            "horizon too large",
            with(&|v| v["params"]["horizon"] = json!(1000)),
            422,
            "params.horizon",
        ),
        (
            "unknown kind",
            with(&|v| v["kind"] = json!("divine")),
            422,
            "kind",
        ),
        (
            "unknown field",
            with(&|v| v["colour"] = json!("red")),
            422,
            "body",
        ),
        (
            "missing input",
            with(&|v| {
                v.as_object_mut().unwrap().remove("input");
            }),
            422,
            "body",
        ),
        (
            "negative max_fee",
            with(&|v| v["max_fee"] = json!(-1)),
            422,
            "max_fee",
        ),
        (
            "bad webhook",
            with(&|v| v["webhook"] = json!("ftp://x")),
            422,
            "webhook",
        ),
    ];
    for (name, body, status, field) in cases {
        let resp = app.post_json(&key, "/v1/jobs", &body).await;
        assert_eq!(resp.status().as_u16(), status, "{name}");
        assert_eq!(
            resp.headers()["content-type"],
            "application/problem+json",
            "{name}"
        );
        let problem = problem(resp).await;
        assert_eq!(problem.status, status, "{name}");
        let fields: Vec<&str> = problem.errors.iter().map(|e| e.field.as_str()).collect();
        assert!(
            fields.contains(&field) || (field == "body" && !fields.is_empty()),
            "{name}: {problem:?}"
        );
        assert!(!problem.detail.is_empty());
    }
    // The cell is located for a spreadsheet to highlight.
    let resp = app
        .post_json(
            &key,
            "/v1/jobs",
            &with(&|v| v["input"]["series"][1][7] = json!(true)),
        )
        .await;
    let problem = crate::common::problem(resp).await;
    assert_eq!(problem.errors[0].row, Some(1));
    assert_eq!(problem.errors[0].column, Some(7));

    let raw = |body: Vec<u8>| {
        app.http
            .post(format!("{}/v1/jobs", app.base))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let resp = raw(b"{\"kind\": \"forecast\", ".to_vec()).await.unwrap();
    assert_eq!(resp.status(), 400);
    let problem = crate::common::problem(resp).await;
    assert_eq!(
        problem.type_uri,
        "https://xpand.dev/problems/malformed-json"
    );

    let huge = format!(
        "{{\"kind\":\"forecast\",\"input\":{{\"series\":[[{}]]}},\"params\":{{\"horizon\":1}},\"max_fee\":1}}",
        vec!["1.0"; 400_000].join(",")
    );
    let resp = raw(huge.into_bytes()).await.unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");

    let resp = app
        .http
        .post(format!("{}/v1/jobs", app.base))
        .json(&ok)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = app.post_json("xp_not-a-real-key", "/v1/jobs", &ok).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(app.get(&key, "/v1/jobs/not-a-uuid").await.status(), 422);
    assert_eq!(app.get(&key, "/v1/nope").await.status(), 404);

    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(jobs, 0);
    assert_eq!(app.balances(&key).await, (CREDIT, 0));
    app.teardown().await;
}

/// A sheet with gaps and rows of different lengths, as a range reads: blank cells inside a row
/// are filled on the line between their neighbours, blanks at a row's ends are not part of it,
/// and the forecasts are exactly those of the completed rows.
#[tokio::test]
async fn blank_cells_are_completed_as_the_documented_rule_says() {
    let mut app = TestApp::spawn().await;
    app.start_worker().await;
    let (_, key) = app.customer(CREDIT).await;
    let with_blanks = json!([
        [112, 118, null, 129, 121, 135, 148, "", "", 118, 104, 118],
        [null, "  ", 50, 52, 54, null, 58, 60, null, null, null, null],
    ]);
    let completed = json!([
        [112, 118, 123.5, 129, 121, 135, 148, 138, 128, 118, 104, 118],
        [50, 52, 54, 56, 58, 60],
    ]);
    let mut outputs = Vec::new();
    for series in [with_blanks, completed] {
        let body = json!({"kind": "forecast", "input": {"series": series},
                          "params": {"horizon": 4}, "max_fee": 100_000});
        let resp = app.post_json(&key, "/v1/jobs", &body).await;
        assert_eq!(resp.status(), 201);
        let job: Job = read(resp).await;
        let done = app.wait_for(&key, job.id).await;
        assert_eq!(done.status, JobStatus::Succeeded, "{done:?}");
        outputs.push(forecasts(&done));
    }
    assert_eq!(outputs[0].len(), 2);
    assert_eq!(outputs[0], outputs[1]);
    app.teardown().await;
}

#[tokio::test]
async fn jobs_list_with_cursor_pagination_and_filters() {
    let app = TestApp::spawn().await;
    let (_, key) = app.customer(CREDIT).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (_, job) = app.submit(&key, &forecast_job(8, 2)).await;
        ids.push(job.id);
    }
    let page: JobPage = app.get_as(&key, "/v1/jobs?limit=2").await;
    let first: Vec<Uuid> = page.jobs.iter().map(|j| j.id).collect();
    assert_eq!(first, [ids[2], ids[1]], "newest first");
    let cursor = page.next_cursor.unwrap();
    let page: JobPage = app
        .get_as(&key, &format!("/v1/jobs?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(page.jobs[0].id, ids[0]);
    assert_eq!(page.next_cursor, None);

    let queued: JobPage = app
        .get_as(&key, "/v1/jobs?status=queued&kind=forecast")
        .await;
    assert_eq!(queued.jobs.len(), 3);
    let done: JobPage = app.get_as(&key, "/v1/jobs?status=succeeded").await;
    assert_eq!(done.jobs.len(), 0);
    assert_eq!(app.get(&key, "/v1/jobs?status=bogus").await.status(), 422);
    assert_eq!(app.get(&key, "/v1/jobs?limit=0").await.status(), 422);
    app.teardown().await;
}

#[tokio::test]
async fn server_sent_events_follow_a_job_to_the_end() {
    use futures::StreamExt;
    let mut app = TestApp::spawn().await;
    let (_, key) = app.customer(CREDIT).await;
    let (_, job) = app.submit(&key, &forecast_job(24, 5)).await;
    let id = job.id;
    let resp = app.get(&key, &format!("/v1/jobs/{id}/events")).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    // The worker starts after the stream opened: every event must come through it.
    app.start_worker().await;
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, body.next()).await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let events: Vec<JobEvent> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(parse)
        .collect();
    assert!(
        matches!(events[0], JobEvent::Progress { .. }),
        "{:?}",
        events[0]
    );
    let rows: usize = events
        .iter()
        .filter_map(|e| match e {
            JobEvent::Partial { rows, .. } => Some(partial_rows(rows).len()),
            _ => None,
        })
        .sum();
    assert_eq!(rows, 24);
    let last = events.last().unwrap();
    let JobEvent::Succeeded { job } = last else {
        panic!("the stream ends with the outcome: {last:?}");
    };
    assert_eq!(forecasts(job).len(), 24);
    app.teardown().await;
}

/// A node whose last epoch scored below the floor gets no work while a better one is alive; the
/// job's shards spread over the nodes that qualify.
#[tokio::test]
async fn nodes_below_the_power_score_floor_get_no_shards() {
    let mut app = TestApp::spawn_with(|c| c.scheduling.min_power_score = 0).await;
    let penalised = app.start_worker().await;
    let good = [app.start_worker().await, app.start_worker().await];
    sqlx::query(
        "INSERT INTO epochs (number, starts_at, ends_at, issuance, fee_share, pool)
         VALUES (0, now() - interval '2 hours', now() - interval '1 hour', 0, 0, 0)",
    )
    .execute(&app.db)
    .await
    .unwrap();
    for (node, score) in [(&penalised, -1_500), (&good[0], 300), (&good[1], 200)] {
        sqlx::query(
            "INSERT INTO epoch_scores (epoch, node_id, alive_slots, total_slots, capacity,
                                       shards_done, failures, score, reward)
             VALUES (0, $1, 0, 360, 1, 0, 3, $2, 0)",
        )
        .bind(node)
        .bind(score)
        .execute(&app.db)
        .await
        .unwrap();
    }
    let (_, key) = app.customer(50_000_000).await;
    let (_, job) = app.submit(&key, &forecast_job(64, 6)).await;
    let job = app.wait_for(&key, job.id).await;
    assert_eq!(job.status, JobStatus::Succeeded);
    let ran_on: Vec<(String, i64)> = sqlx::query_as(
        "SELECT node_id, count(*) FROM shards WHERE job_id = $1::uuid GROUP BY node_id",
    )
    .bind(job.id)
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert!(
        ran_on.iter().all(|(node, _)| node != &penalised),
        "{ran_on:?}"
    );
    assert_eq!(
        ran_on.len(),
        2,
        "the shards spread over both good nodes: {ran_on:?}"
    );
    app.teardown().await;
}
