//! Epochs: power scores from what the gateway observed, the whole pool paid in proportion, and
//! closing that is safe when replicas race.

use std::time::Duration;

use serde_json::Value;

use crate::common::{forecast_job, TestApp};

#[tokio::test]
async fn each_epoch_pays_its_whole_pool_by_power_score_exactly_once() {
    let mut app = TestApp::spawn_with(|c| c.epoch_length = Duration::from_secs(2)).await;
    let busy = app.start_worker().await;
    let (_, key) = app.customer(50_000_000).await;
    for _ in 0..3 {
        let job: Value = app
            .post_json(&key, "/v1/jobs", &forecast_job(16, 4))
            .await
            .json()
            .await
            .unwrap();
        app.wait_for_job(&key, job["id"].as_str().unwrap()).await;
    }
    // Two closers race the background one on every epoch that ends meanwhile.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let closer = xpand::epochs::EpochCloser {
        db: app.db.clone(),
        clock: xpand::epochs::EpochClock::load(&app.db, app.config.epoch_length)
            .await
            .unwrap(),
        presence: std::sync::Arc::new(app.state.presence.clone()),
        pool: app.config.pool,
        key: app.config.gateway_key.signing_key().clone(),
    };
    let (a, b) = tokio::join!(closer.close_due(), closer.close_due());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(
        a.iter().all(|n| !b.contains(n)),
        "no epoch closed twice: {a:?} {b:?}"
    );

    let closed: Vec<i64> = sqlx::query_scalar("SELECT number FROM epochs ORDER BY number")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert!(closed.len() >= 2, "{closed:?}");
    assert_eq!(
        closed,
        (0..closed.len() as i64).collect::<Vec<_>>(),
        "closed in order, none skipped"
    );
    let paid_twice: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT epoch FROM ledger_transactions WHERE kind = 'epoch_reward'
                               GROUP BY epoch HAVING count(*) > 1) t",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(paid_twice, 0);

    let mut rewards_total = 0;
    let mut worked = false;
    for n in &closed {
        let epoch = app.get_json(&key, &format!("/v1/epochs/{n}")).await;
        let pool = epoch["pool"].as_i64().unwrap();
        let scores = epoch["scores"].as_array().unwrap();
        let paid: i64 = scores.iter().map(|s| s["reward"].as_i64().unwrap()).sum();
        assert_eq!(paid, pool, "epoch {n} pays exactly its pool");
        for s in scores {
            if s["score"].as_i64().unwrap() <= 0 {
                assert_eq!(s["reward"], 0);
            }
        }
        if let Some(s) = scores.iter().find(|s| s["node_id"] == busy.as_str()) {
            if s["shards_done"].as_i64().unwrap() > 0 {
                worked = true;
                assert!(s["score"].as_i64().unwrap() >= 100 * s["shards_done"].as_i64().unwrap());
            }
        }
        rewards_total += pool;
    }
    assert!(worked, "the shards done were counted in some epoch");

    // The node's earnings are its shard fees plus its rewards; its view shows its scores.
    let node = app.get_json(&key, &format!("/v1/nodes/{busy}")).await;
    let fees: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(fee), 0)::bigint FROM shards WHERE node_id = $1 AND status = 'done'",
    )
    .bind(&busy)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(node["earnings"].as_i64().unwrap(), fees + rewards_total);
    assert!(!node["recent_epochs"].as_array().unwrap().is_empty());
    assert_eq!(app.get(&key, "/v1/epochs/999999").await.status(), 404);

    // Epoch closes are sealed and the chain verifies.
    xpand::ledger::blocks::seal_all(&app.db, app.config.gateway_key.signing_key())
        .await
        .unwrap();
    let auditor = xpand::verify::Credential::Auditor(app.config.auditor_key.clone());
    let verifier = xpand::verify::Verifier::connect(&app.base, None, auditor)
        .await
        .unwrap();
    let report = verifier.verify().await.unwrap();
    assert!(report.balances_checked > 0);
    app.assert_ledger_invariants().await;
    app.teardown().await;
}
