//! The sealed ledger: blocks verify from the public API alone, entries and settlements prove
//! their inclusion with nothing but the public key, and rewriting sealed history is caught.

use serde_json::Value;
use xpand::http::ledger::RecordPage;
use xpand::ledger::blocks;
use xpand::verify::{Credential, Verifier, VerifyError};
use xpand_chain::InclusionProof;

use crate::common::{forecast_job, TestApp};

async fn seal(app: &TestApp) -> Vec<xpand_chain::Block> {
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

/// A forecast job whose input holds a value that must never appear on the public surface.
const SECRET_CELL: f64 = 31337.25;

fn secret_job() -> Value {
    let mut job = forecast_job(8, 3);
    job["input"]["series"][0][0] = serde_json::json!(SECRET_CELL);
    job
}

#[tokio::test]
async fn the_public_ledger_proves_history_without_showing_it() {
    let mut app = TestApp::spawn().await;
    let node_key = xpand_protocol::NodeKey::generate();
    xpand::nodes::register(&app.db, node_key.id(), "records")
        .await
        .unwrap();
    app.run_worker(node_key.clone()).await;
    app.wait_until_alive(node_key.id()).await;
    let (account, key) = app.customer(50_000_000).await;
    let mut jobs = run_jobs(&app, &key, 1).await;
    let secret: Value = app
        .post_json(&key, "/v1/jobs", &secret_job())
        .await
        .json()
        .await
        .unwrap();
    let secret_id = secret["id"].as_str().unwrap().to_string();
    app.wait_for_job(&key, &secret_id).await;
    jobs.push(secret_id.clone());

    // Not sealed yet: the settlement cannot be proven.
    let resp = app
        .get(&key, &format!("/v1/jobs/{}/settlement-proof", jobs[0]))
        .await;
    assert_eq!(resp.status(), 409);
    assert_eq!(seal(&app).await.len(), 1);
    let (_, other) = app.customer(1_000).await;
    assert_eq!(seal(&app).await.len(), 1);

    // Public mode: the chain and every root check out from headers and leaves alone.
    let gateway = app.config.gateway_key.id().to_string();
    let public = Verifier::connect(&app.base, Some(&gateway), Credential::Public)
        .await
        .unwrap();
    let report = public.verify().await.unwrap();
    let (entries, records, ledger_accounts): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM ledger_entries), (SELECT count(*) FROM chain_records),
                (SELECT count(*) FROM ledger_accounts)",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(
        (report.blocks, report.entries as i64, report.records as i64),
        (2, entries, records)
    );

    // What a stranger can read says nothing of whose money moved, for what, or on what data.
    let mut public_text = String::new();
    for path in [
        "/v1/ledger/blocks",
        "/v1/ledger/blocks/1",
        "/v1/ledger/blocks/1/leaves",
        "/v1/ledger/blocks/2/leaves",
    ] {
        let resp = app.get_public(path).await;
        assert_eq!(resp.status(), 200, "{path}");
        public_text.push_str(&resp.text().await.unwrap());
    }
    for needle in [
        account.to_string(),
        jobs[0].clone(),
        secret_id.clone(),
        "31337".into(),
    ] {
        assert!(
            !public_text.contains(&needle),
            "the public ledger shows {needle}"
        );
    }
    for path in [
        "/v1/ledger/blocks/1/entries",
        "/v1/ledger/blocks/1/records",
        "/v1/ledger/audit",
        "/v1/ledger/entries/1/proof",
    ] {
        let resp = app.get_public(path).await;
        assert_eq!(resp.status(), 401, "{path} without credentials");
    }
    for path in [
        "/v1/ledger/blocks/1/entries",
        "/v1/ledger/blocks/1/records",
        "/v1/ledger/audit",
    ] {
        assert_eq!(
            app.get(&key, path).await.status(),
            403,
            "{path} for a customer"
        );
    }

    // Even sealed records keep no payload: assignments are committed to by digest only.
    let (with_envelope, assignments): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE envelope IS NOT NULL),
                count(*) FILTER (WHERE kind = 'assignment' AND digest IS NOT NULL)
         FROM chain_records",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(with_envelope, 0);
    assert!(assignments >= 2);
    let audited = app
        .get(&app.config.auditor_key, "/v1/ledger/blocks/1/records")
        .await;
    assert_eq!(audited.status(), 200);
    assert!(!audited.text().await.unwrap().contains("31337"));

    // Account mode: every entry of the account proves, and its balances are its entries.
    let mine = Verifier::connect(&app.base, Some(&gateway), Credential::Account(key.clone()))
        .await
        .unwrap();
    let report = mine.verify().await.unwrap();
    let own: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ledger_entries e JOIN ledger_accounts a ON a.id = e.ledger_account_id
         WHERE a.owner = $1",
    )
    .bind(account)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!((report.own_proven as i64, report.own_unsealed), (own, 0));
    assert_eq!(report.balances_checked, 2);

    // Another account's entry is not found, not forbidden: its existence stays private.
    let own_entry: i64 = sqlx::query_scalar(
        "SELECT e.id FROM ledger_entries e JOIN ledger_accounts a ON a.id = e.ledger_account_id
         WHERE a.owner = $1 LIMIT 1",
    )
    .bind(account)
    .fetch_one(&app.db)
    .await
    .unwrap();
    let path = format!("/v1/ledger/entries/{own_entry}/proof");
    assert_eq!(app.get(&key, &path).await.status(), 200);
    assert_eq!(app.get(&other, &path).await.status(), 404);
    assert_eq!(app.get(&app.config.auditor_key, &path).await.status(), 200);

    // Auditor mode: every leaf from its content, every balance from its entries.
    let auditor = Credential::Auditor(app.config.auditor_key.clone());
    let audit = Verifier::connect(&app.base, Some(&gateway), auditor)
        .await
        .unwrap();
    let report = audit.verify().await.unwrap();
    assert_eq!(report.balances_checked as i64, ledger_accounts);
    assert_eq!(report.entries as i64, entries);

    // A settlement proof, checked the way a third party would: JSON in, public key, nothing else.
    let proof: Value = app
        .get_json(&key, &format!("/v1/jobs/{}/settlement-proof", jobs[0]))
        .await;
    let gateway_key = xpand_protocol::parse_node_id(&gateway).unwrap();
    let proofs: Vec<InclusionProof> = serde_json::from_value(proof["proofs"].clone()).unwrap();
    assert!(!proofs.is_empty());
    for p in &proofs {
        assert_eq!(p.entry.job_id.unwrap().to_string(), jobs[0]);
        p.verify(&gateway_key).unwrap();
        let mut lie = p.clone();
        lie.entry.amount += 1;
        assert!(
            lie.verify(&gateway_key).is_err(),
            "a changed amount does not prove"
        );
        let mut lie = p.clone();
        lie.entry.salt = Some("00".repeat(16));
        assert!(
            lie.verify(&gateway_key).is_err(),
            "a guessed salt does not prove"
        );
    }
    let resp = app
        .get(&other, &format!("/v1/jobs/{}/settlement-proof", jobs[0]))
        .await;
    assert_eq!(resp.status(), 404);

    // A node operator reads its own records, signed with its node key, and proves them.
    let path = format!("/v1/nodes/{}/records?limit=200", node_key.id());
    let signed = |key: &xpand_protocol::NodeKey, path: &str| {
        app.http
            .get(format!("{}{path}", app.base))
            .header("Authorization", key.request_authorization("GET", path))
            .send()
    };
    let page: RecordPage = signed(&node_key, &path)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(page.records.iter().any(|r| r.record.kind == "capability"));
    assert!(
        page.records
            .iter()
            .filter(|r| r.record.kind == "assignment")
            .count()
            >= 2
    );
    for r in &page.records {
        assert_eq!(r.record.node_id, node_key.id());
        r.verify(&gateway_key).unwrap();
    }
    let stranger = xpand_protocol::NodeKey::generate();
    assert_eq!(signed(&stranger, &path).await.unwrap().status(), 403);
    let other_path = format!("/v1/nodes/{}/records", node_key.id());
    let resp = app
        .http
        .get(format!("{}{other_path}", app.base))
        .header(
            "Authorization",
            node_key.request_authorization("GET", &path),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        401,
        "a signature covers its own path and query only"
    );
    assert_eq!(app.get(&key, &path).await.status(), 401);

    // A pinned key that is not the server's is refused.
    let wrong = xpand_protocol::NodeKey::generate();
    assert!(matches!(
        Verifier::connect(&app.base, Some(wrong.id()), Credential::Public).await,
        Err(VerifyError::Key(_))
    ));
    app.assert_ledger_invariants().await;
    app.teardown().await;
}

/// Rows written before salting (migration 0011) seal as v1 leaves, and a chain mixing them
/// with salted blocks verifies in every mode.
#[tokio::test]
async fn history_sealed_before_salting_still_verifies() {
    let mut app = TestApp::spawn().await;
    app.start_worker().await;
    let (_, key) = app.customer(50_000_000).await;
    run_jobs(&app, &key, 1).await;
    for sql in [
        "UPDATE ledger_entries SET salt = NULL",
        "UPDATE chain_records SET salt = NULL, envelope = '{\"legacy\":true}', digest = NULL",
    ] {
        sqlx::query(sql).execute(&app.db).await.unwrap();
    }
    assert_eq!(seal(&app).await.len(), 1);
    run_jobs(&app, &key, 1).await;
    assert_eq!(seal(&app).await.len(), 1);
    for credential in [
        Credential::Public,
        Credential::Account(key.clone()),
        Credential::Auditor(app.config.auditor_key.clone()),
    ] {
        let verifier = Verifier::connect(&app.base, None, credential.clone())
            .await
            .unwrap();
        let report = verifier.verify().await.unwrap();
        assert_eq!(report.blocks, 2, "{credential:?}");
    }
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
    let verifier = Verifier::connect(&app.base, None, Credential::Public)
        .await
        .unwrap();
    verifier.verify().await.unwrap();
    let auditor = Credential::Auditor(app.config.auditor_key.clone());
    let auditor = Verifier::connect(&app.base, None, auditor).await.unwrap();

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
    let reason = expect_block_2(verifier.verify().await, "changed amount");
    assert!(reason.contains("Merkle root"), "{reason}");
    assert!(matches!(
        auditor.verify_entry(a).await,
        Err(VerifyError::Entry { id, .. }) if id == a
    ));
    exec(format!(
        "UPDATE ledger_entries SET amount = amount - 1 WHERE id = {a}"
    ))
    .await;
    verifier.verify().await.unwrap();

    // Reorder two: swap which entry moved what.
    exec(format!(
        "UPDATE ledger_entries e SET amount = o.amount, ledger_account_id = o.ledger_account_id
         FROM ledger_entries o
         WHERE (e.id, o.id) IN (({a}, {b}), ({b}, {a}))"
    ))
    .await;
    expect_block_2(verifier.verify().await, "swapped entries");
    exec(format!(
        "UPDATE ledger_entries e SET amount = o.amount, ledger_account_id = o.ledger_account_id
         FROM ledger_entries o
         WHERE (e.id, o.id) IN (({a}, {b}), ({b}, {a}))"
    ))
    .await;
    verifier.verify().await.unwrap();

    // Rewrite the block itself to match: its signature no longer verifies.
    exec("UPDATE ledger_blocks SET entry_count = entry_count + 1 WHERE height = 2".into()).await;
    let reason = expect_block_2(verifier.verify().await, "edited header");
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
    let reason = expect_block_2(verifier.verify().await, "rewritten assignment");
    assert!(reason.contains("records root"), "{reason}");
    exec(format!(
        "UPDATE chain_records SET node_id = reverse(node_id) WHERE id = {record}"
    ))
    .await;
    verifier.verify().await.unwrap();

    // Delete one entry.
    exec(format!("DELETE FROM ledger_entries WHERE id = {b}")).await;
    let reason = expect_block_2(verifier.verify().await, "deleted entry");
    assert!(reason.contains("were sealed"), "{reason}");
    app.teardown().await;
}

/// `xpand verify --api-key` proves each entry with its own request: on an account with more
/// entries than the rate limit allows requests in a second, it waits out the 429s (their
/// `Retry-After`) and completes.
#[tokio::test]
async fn account_verification_paces_itself_to_the_rate_limit() {
    let app = TestApp::spawn_with(|c| c.limits.requests_per_sec = 10).await;
    let (account, key) = app.customer(1_000).await;
    let mut conn = app.db.acquire().await.unwrap();
    for i in 0..40 {
        xpand::ledger::deposit(&mut conn, account, 1, &format!("top-up {i}"))
            .await
            .unwrap();
    }
    drop(conn);
    assert!(!seal(&app).await.is_empty());

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_xpand"))
        .args(["verify", "--url", &app.base, "--api-key", &key])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "xpand verify: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("41 proven in verified blocks, 0 not sealed yet"),
        "{stdout}"
    );
    let limited: u64 = app
        .metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("xpand_http_requests_total") && l.contains("status=\"429\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert!(limited > 0, "the limit was reached, and waited out");
    app.teardown().await;
}
