//! The sealed ledger: blocks verify from the public API alone, entries and settlements prove
//! their inclusion with nothing but the public key, and rewriting sealed history is caught.

use serde_json::Value;
use xpand::ledger::blocks::{self, InclusionProof};
use xpand::verify::{Verifier, VerifyError};

use crate::common::{forecast_job, TestApp};

async fn seal(app: &TestApp) -> Vec<xpand::ledger::chain::Block> {
    blocks::seal_all(&app.db, app.config.gateway_key.signing_key())
        .await
        .unwrap()
}

async fn run_jobs(app: &TestApp, key: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let job: Value = app
            .post_json(key, "/v1/jobs", &forecast_job(8, 3))
            .await
            .json()
            .await
            .unwrap();
        let id = job["id"].as_str().unwrap().to_string();
        app.wait_for_job(key, &id).await;
        ids.push(id);
    }
    ids
}

#[tokio::test]
async fn blocks_verify_and_entries_prove_with_only_the_public_key() {
    let mut app = TestApp::spawn().await;
    app.start_worker().await;
    let (_, key) = app.customer(50_000_000).await;
    let jobs = run_jobs(&app, &key, 2).await;

    // Not sealed yet: the settlement cannot be proven.
    let resp = app
        .get(&key, &format!("/v1/jobs/{}/settlement-proof", jobs[0]))
        .await;
    assert_eq!(resp.status(), 409);

    assert_eq!(seal(&app).await.len(), 1);
    run_jobs(&app, &key, 1).await;
    let (_, other) = app.customer(1_000).await;
    let second = seal(&app).await;
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].height, 2);
    assert!(seal(&app).await.is_empty(), "nothing left to seal");

    let gateway = app.config.gateway_key.id().to_string();
    let verifier = Verifier::connect(&app.base, Some(&gateway)).await.unwrap();
    let report = verifier.verify_chain().await.unwrap();
    let (entries, records): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM ledger_entries), (SELECT count(*) FROM chain_records)",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(
        (report.blocks, report.entries as i64, report.records as i64),
        (2, entries, records)
    );
    // The worker's capability statement is sealed as the envelope it signed.
    let block_one: Vec<Value> = app
        .get_json(&key, "/v1/ledger/blocks/1/records")
        .await
        .as_array()
        .unwrap()
        .clone();
    let capability = block_one
        .iter()
        .find(|r| r["kind"] == "capability")
        .unwrap();
    let topic = format!(
        "{}/v1/up/{}/announce",
        app.config.topic_prefix,
        capability["node_id"].as_str().unwrap()
    );
    let opened = xpand_protocol::Envelope::open(
        capability["envelope"].as_str().unwrap().as_bytes(),
        &topic,
        xpand_protocol::now_ms(),
        i64::MAX,
    )
    .expect("the sealed statement carries the node's signature");
    assert_eq!(opened.signer, capability["node_id"].as_str().unwrap());

    // A settlement proof, checked the way a third party would: JSON in, public key, nothing else.
    let proof: Value = app
        .get_json(&key, &format!("/v1/jobs/{}/settlement-proof", jobs[0]))
        .await;
    let public = xpand_protocol::parse_node_id(&gateway).unwrap();
    let proofs: Vec<InclusionProof> = serde_json::from_value(proof["proofs"].clone()).unwrap();
    assert!(!proofs.is_empty());
    for p in &proofs {
        assert_eq!(p.entry.job_id.unwrap().to_string(), jobs[0]);
        p.verify(&public).unwrap();
        let mut lie = p.clone();
        lie.entry.amount += 1;
        assert!(
            lie.verify(&public).is_err(),
            "a changed amount does not prove"
        );
    }
    // Another account cannot read this job's settlement.
    let resp = app
        .get(&other, &format!("/v1/jobs/{}/settlement-proof", jobs[0]))
        .await;
    assert_eq!(resp.status(), 404);

    // A pinned key that is not the server's is refused.
    let wrong = xpand_protocol::NodeKey::generate();
    assert!(matches!(
        Verifier::connect(&app.base, Some(wrong.id())).await,
        Err(VerifyError::Key(_))
    ));
    let resp = app
        .http
        .get(format!("{}/v1/ledger/entries/999999/proof", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    app.teardown().await;
}

#[tokio::test]
async fn rewriting_sealed_history_is_caught_and_located() {
    let mut app = TestApp::spawn().await;
    app.start_worker().await;
    let (_, key) = app.customer(50_000_000).await;
    run_jobs(&app, &key, 2).await;
    seal(&app).await;
    run_jobs(&app, &key, 2).await;
    let sealed = seal(&app).await;
    let block = &sealed[0];
    assert_eq!(block.height, 2);
    let verifier = Verifier::connect(&app.base, None).await.unwrap();
    verifier.verify_chain().await.unwrap();

    let ids: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM ledger_entries WHERE id BETWEEN $1 AND $2 ORDER BY id")
            .bind(block.first_entry_id)
            .bind(block.last_entry_id)
            .fetch_all(&app.db)
            .await
            .unwrap();
    let (a, b) = (ids[1], ids[2]);
    let exec = |sql: String| {
        let db = app.db.clone();
        async move { sqlx::query(&sql).execute(&db).await.unwrap() }
    };
    let expect_block_2 = |result: Result<_, VerifyError>, what: &str| match result {
        Err(VerifyError::Block { height: 2, reason }) => reason,
        other => panic!("{what}: expected a failure at block 2, got {other:?}"),
    };

    // Change one amount.
    exec(format!(
        "UPDATE ledger_entries SET amount = amount + 1 WHERE id = {a}"
    ))
    .await;
    let reason = expect_block_2(verifier.verify_chain().await, "changed amount");
    assert!(reason.contains("Merkle root"), "{reason}");
    assert!(matches!(
        verifier.verify_entry(a).await,
        Err(VerifyError::Entry { id, .. }) if id == a
    ));
    exec(format!(
        "UPDATE ledger_entries SET amount = amount - 1 WHERE id = {a}"
    ))
    .await;
    verifier.verify_chain().await.unwrap();

    // Reorder two: swap which entry moved what.
    exec(format!(
        "UPDATE ledger_entries e SET amount = o.amount, ledger_account_id = o.ledger_account_id
         FROM ledger_entries o
         WHERE (e.id, o.id) IN (({a}, {b}), ({b}, {a}))"
    ))
    .await;
    expect_block_2(verifier.verify_chain().await, "swapped entries");
    exec(format!(
        "UPDATE ledger_entries e SET amount = o.amount, ledger_account_id = o.ledger_account_id
         FROM ledger_entries o
         WHERE (e.id, o.id) IN (({a}, {b}), ({b}, {a}))"
    ))
    .await;
    verifier.verify_chain().await.unwrap();

    // Rewrite the block itself to match: its signature no longer verifies.
    exec("UPDATE ledger_blocks SET entry_count = entry_count + 1 WHERE height = 2".into()).await;
    let reason = expect_block_2(verifier.verify_chain().await, "edited header");
    assert!(
        reason.contains("hash") || reason.contains("signature"),
        "{reason}"
    );
    exec("UPDATE ledger_blocks SET entry_count = entry_count - 1 WHERE height = 2".into()).await;

    // Rewrite what a node was told: an assignment sealed in the block.
    let record: i64 = sqlx::query_scalar(
        "SELECT id FROM chain_records WHERE kind = 'assignment' AND id BETWEEN $1 AND $2 LIMIT 1",
    )
    .bind(block.first_record_id)
    .bind(block.last_record_id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    exec(format!(
        "UPDATE chain_records SET node_id = reverse(node_id) WHERE id = {record}"
    ))
    .await;
    let reason = expect_block_2(verifier.verify_chain().await, "rewritten assignment");
    assert!(reason.contains("records root"), "{reason}");
    exec(format!(
        "UPDATE chain_records SET node_id = reverse(node_id) WHERE id = {record}"
    ))
    .await;
    verifier.verify_chain().await.unwrap();

    // Delete one entry.
    exec(format!("DELETE FROM ledger_entries WHERE id = {b}")).await;
    let reason = expect_block_2(verifier.verify_chain().await, "deleted entry");
    assert!(reason.contains("were sealed"), "{reason}");
    app.teardown().await;
}
