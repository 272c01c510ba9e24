//! Webhooks, per Standard Webhooks: a finished job is POSTed to its URL, signed by the gateway,
//! retried until accepted; a registered endpoint gets the events it chose, signed with its own
//! secret, as the specification's own Python library checks; a 410 stops them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use ed25519_dalek::Verifier;
use serde_json::Value;

use crate::common::{forecast_job, TestApp};

type Received = Arc<Mutex<Vec<(HeaderMap, Vec<u8>)>>>;

/// A receiver that answers its `n`th request (from 1) with `answer(n)`, keeping every request.
async fn receiver_answering(
    answer: impl Fn(usize) -> StatusCode + Clone + Send + Sync + 'static,
) -> (String, Received) {
    let received: Received = Default::default();
    let log = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let (log, answer) = (log.clone(), answer.clone());
            async move {
                let mut log = log.lock().unwrap();
                log.push((headers, body.to_vec()));
                answer(log.len())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

#[tokio::test]
async fn a_finished_job_is_posted_signed_and_retried_until_accepted() {
    let mut app = TestApp::spawn().await;
    app.start_worker().await;
    // Fails the first request, as a deploying service would, and accepts the rest.
    let (url, received) = receiver_answering(|n| match n {
        1 => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::NO_CONTENT,
    })
    .await;
    let (_, key) = app.customer(50_000_000).await;
    let mut body = forecast_job(8, 3);
    body["webhook"] = Value::String(url);
    let job: Value = app
        .post_json(&key, "/v1/jobs", &body)
        .await
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap();
    app.wait_for_job(&key, id).await;

    for _ in 0..100 {
        if received.lock().unwrap().len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let received = received.lock().unwrap().clone();
    assert_eq!(received.len(), 2, "one failure, then the accepted retry");
    let (headers, payload) = &received[1];
    assert_eq!(
        headers["webhook-id"], received[0].0["webhook-id"],
        "a retry is the same message"
    );
    assert_eq!(received[0].1, *payload, "a retry sends the same body");
    let posted = verify_gateway_signed(&app, headers, payload);
    assert_eq!(posted["type"], "job.completed");
    assert_eq!(posted["data"]["id"], id);
    assert_eq!(posted["data"]["status"], "succeeded");
    assert_eq!(
        posted["data"]["output"]["forecasts"]
            .as_array()
            .unwrap()
            .len(),
        8
    );

    // The deliverer records the attempt after the receiver answered: wait for that write.
    let deliveries = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let list = app
                .get_json(&key, &format!("/v1/jobs/{id}/deliveries"))
                .await;
            if !list["deliveries"][0]["delivered_at"].is_null() {
                return list;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the delivery is recorded");
    let delivery = &deliveries["deliveries"][0];
    assert_eq!(deliveries["deliveries"].as_array().unwrap().len(), 1);
    assert_eq!(delivery["id"], headers["webhook-id"].to_str().unwrap());
    assert_eq!(delivery["event"], "completed");
    let statuses: Vec<i64> = delivery["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status"].as_i64().unwrap())
        .collect();
    assert_eq!(statuses, [503, 204]);
    app.teardown().await;
}

/// Checks a message a URL registered nowhere got: the Standard Webhooks headers, the
/// `v1a` signature over `{id}.{timestamp}.{body}` under the gateway's public key (and not over
/// anything else). Returns the body.
fn verify_gateway_signed(app: &TestApp, headers: &HeaderMap, payload: &[u8]) -> Value {
    let id = headers["webhook-id"].to_str().unwrap();
    let timestamp: i64 = headers["webhook-timestamp"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((chrono::Utc::now().timestamp() - timestamp).abs() < 300);
    let signature = headers["webhook-signature"].to_str().unwrap();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(
            signature
                .strip_prefix("v1a,")
                .expect("signed with the gateway key"),
        )
        .unwrap();
    let signature = ed25519_dalek::Signature::from_slice(&raw).unwrap();
    let mut signed = format!("{id}.{timestamp}.").into_bytes();
    signed.extend_from_slice(payload);
    let public = app.config.gateway_key.verifying_key();
    public
        .verify(&signed, &signature)
        .expect("signed by the gateway");
    let mut forged = signed.clone();
    *forged.last_mut().unwrap() ^= 1;
    assert!(public.verify(&forged, &signature).is_err());
    serde_json::from_slice(payload).unwrap()
}

/// IPv6 addresses that carry an internal IPv4 address are refused at submit, naming the field,
/// and nothing is stored. (Nothing is sent to them: the submit is refused before any job exists.)
#[tokio::test]
async fn webhooks_to_ipv6_forms_of_internal_addresses_are_refused_at_submit() {
    // No allow-list: the production default.
    let app = TestApp::spawn_with(|c| c.egress.allow.clear()).await;
    let (_, key) = app.customer(10_000_000).await;
    for (url, inside) in [
        ("http://[64:ff9b::7f00:1]/", "NAT64 form of 127.0.0.1"),
        ("http://[64:ff9b::a00:1]/hook", "NAT64 form of 10.0.0.1"),
        ("http://[::127.0.0.1]/", "IPv4-compatible form of 127.0.0.1"),
        (
            "http://[::ffff:a9fe:a9fe]/",
            "IPv4-mapped form of 169.254.169.254",
        ),
        ("http://[2002:7f00:1::]/", "6to4 form of 127.0.0.1"),
        (
            "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/",
            "Teredo client form of 127.0.0.1",
        ),
    ] {
        let mut job = forecast_job(2, 3);
        job["webhook"] = Value::String(url.into());
        let resp = app.post_json(&key, "/v1/jobs", &job).await;
        assert_eq!(resp.status(), 422, "{url}");
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
        let problem: Value = resp.json().await.unwrap();
        assert_eq!(problem["errors"][0]["field"], "webhook", "{url}: {problem}");
        let detail = problem["errors"][0]["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(inside), "{url}: {problem}");
    }
    let (jobs, outbox): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM webhook_messages)",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!((jobs, outbox), (0, 0), "a refused submit stores nothing");
    app.teardown().await;
}

/// A receiver that answers every request with `status`.
async fn receiver(status: StatusCode) -> (String, Received) {
    receiver_answering(move |_| status).await
}

/// Waits until `received` holds `n` requests.
async fn requests(received: &Received, n: usize) -> Vec<(HeaderMap, Vec<u8>)> {
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let log = received.lock().unwrap().clone();
            if log.len() >= n {
                return log;
            }
            drop(log);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("fewer than {n} webhook requests within 15 s"))
}

#[tokio::test]
async fn canceled_and_failed_jobs_are_posted_too() {
    // No worker: one job is canceled while it waits, the other runs out of time.
    let app = TestApp::spawn_with(|c| c.scheduling.job_timeout = Duration::from_secs(2)).await;
    let (url, received) = receiver(StatusCode::NO_CONTENT).await;
    let (_, key) = app.customer(50_000_000).await;
    let mut body = forecast_job(4, 3);
    body["webhook"] = Value::String(url);
    let submit = || async {
        let job: Value = app
            .post_json(&key, "/v1/jobs", &body)
            .await
            .json()
            .await
            .unwrap();
        job["id"].as_str().unwrap().to_string()
    };

    let canceled = submit().await;
    let resp = app
        .post_json(&key, &format!("/v1/jobs/{canceled}/cancel"), &Value::Null)
        .await;
    assert_eq!(resp.status(), 200);
    let log = requests(&received, 1).await;
    let (headers, payload) = &log[0];
    let posted = verify_gateway_signed(&app, headers, payload);
    assert_eq!(posted["type"], "job.completed");
    assert_eq!(
        (
            posted["data"]["id"].as_str(),
            posted["data"]["status"].as_str()
        ),
        (Some(canceled.as_str()), Some("canceled"))
    );

    let failed = submit().await;
    let job = app.wait_for_job(&key, &failed).await;
    assert_eq!(job["status"], "failed", "{job}");
    let log = requests(&received, 2).await;
    let (headers, payload) = &log[1];
    let posted = verify_gateway_signed(&app, headers, payload);
    assert_eq!(posted["data"]["id"], failed.as_str());
    assert_eq!(posted["data"]["error"]["code"], "timed_out", "{posted}");
    app.teardown().await;
}

#[tokio::test]
async fn a_delivery_is_given_up_after_its_last_attempt() {
    let mut app = TestApp::spawn().await;
    app.start_worker().await;
    let (url, received) = receiver(StatusCode::INTERNAL_SERVER_ERROR).await;
    let (_, key) = app.customer(50_000_000).await;
    let mut body = forecast_job(4, 3);
    body["webhook"] = Value::String(url);
    let job: Value = app
        .post_json(&key, "/v1/jobs", &body)
        .await
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap();
    app.wait_for_job(&key, id).await;
    requests(&received, 1).await;

    // The wait before the last attempt is ten hours: skip to it.
    let last = xpand::webhooks::MAX_ATTEMPTS;
    let skip_ahead = |attempts: Option<i32>| {
        sqlx::query(
            "UPDATE webhook_messages SET attempts = COALESCE($2, attempts), next_attempt_at = now()
             WHERE job_id = $1::uuid",
        )
        .bind(id)
        .bind(attempts)
        .execute(&app.db)
    };
    skip_ahead(Some(last - 1)).await.unwrap();
    requests(&received, 2).await;
    // Once that attempt is recorded (the message given up), nothing is sent again, even when
    // it falls due.
    let recorded = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let row: (i32, bool, Option<String>, bool) = sqlx::query_as(
                "SELECT attempts, delivered_at IS NULL, last_error, abandoned_at IS NOT NULL
                 FROM webhook_messages WHERE job_id = $1::uuid",
            )
            .bind(id)
            .fetch_one(&app.db)
            .await
            .unwrap();
            if row.3 {
                return row;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the last attempt is recorded");
    assert_eq!((recorded.0, recorded.1), (last, true));
    assert!(
        recorded.2.as_deref().is_some_and(|e| e.contains("500")),
        "{recorded:?}"
    );
    skip_ahead(None).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        received.lock().unwrap().len(),
        2,
        "a given-up delivery was tried again"
    );
    app.teardown().await;
}

/// Checks messages with the Standard Webhooks reference library (PyPI `standardwebhooks`, in
/// the Python SDK's venv that `make test` builds): one JSON line in per message (`headers`,
/// `body`), one line out (the verified body's `type`, or `invalid`).
const VERIFIER: &str = r#"
import json, sys
from standardwebhooks.webhooks import Webhook
hook = Webhook(sys.argv[1])
for line in sys.stdin:
    message = json.loads(line)
    try:
        print(hook.verify(message["body"], message["headers"])["type"])
    except Exception:
        print("invalid")
"#;

/// What the reference library says of each message, in order.
async fn verified_types(secret: &str, messages: &[(HeaderMap, Vec<u8>)]) -> Vec<String> {
    let python = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/clients/python/.venv/bin/python"
    );
    assert!(
        std::path::Path::new(python).is_file(),
        "no {python}: run scripts/setup-python-sdk.sh (make test does)"
    );
    let mut input = String::new();
    for (headers, body) in messages {
        let headers: serde_json::Map<String, Value> =
            ["webhook-id", "webhook-timestamp", "webhook-signature"]
                .iter()
                .map(|h| (h.to_string(), Value::from(headers[*h].to_str().unwrap())))
                .collect();
        let line = serde_json::json!({ "headers": headers, "body": String::from_utf8_lossy(body) });
        input.push_str(&format!("{line}\n"));
    }
    let mut child = tokio::process::Command::new(python)
        .args(["-c", VERIFIER, secret])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use tokio::io::AsyncWriteExt as _;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success(), "the verifier failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

#[tokio::test]
async fn a_registered_endpoint_gets_the_events_it_chose_verifiable_with_its_secret() {
    let mut app = TestApp::spawn().await;
    app.start_worker().await;
    let (url, received) = receiver(StatusCode::NO_CONTENT).await;
    let (_, key) = app.customer(50_000_000).await;
    let resp = app
        .post_json(
            &key,
            "/v1/webhooks",
            &serde_json::json!({ "url": url, "events": ["partial", "completed", "start", "progress"] }),
        )
        .await;
    assert_eq!(resp.status(), 201);
    let endpoint: Value = resp.json().await.unwrap();
    let secret = endpoint["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));
    assert_eq!(
        endpoint["events"],
        serde_json::json!(["start", "progress", "partial", "completed"])
    );
    let listed = app.get_json(&key, "/v1/webhooks").await;
    assert_eq!(listed["endpoints"][0]["url"], url.as_str());
    assert!(
        listed["endpoints"][0].get("secret").is_none(),
        "never shown again"
    );
    let bad = app
        .post_json(
            &key,
            "/v1/webhooks",
            &serde_json::json!({ "url": url, "events": ["finished"] }),
        )
        .await;
    assert_eq!(bad.status(), 422);
    let problem: Value = bad.json().await.unwrap();
    assert_eq!(problem["errors"][0]["field"], "events[0]");

    // 16 rows in shards of 8: a start, a progress for the first shard, two partials, the end.
    let mut body = forecast_job(16, 3);
    body["webhook"] = Value::String(url.clone());
    let (_, job) = app.submit(&key, &body).await;
    app.wait_for(&key, job.id).await;
    requests(&received, 5).await;
    // Nothing more comes than the five.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = received.lock().unwrap().clone();
    let mut types = verified_types(&secret, &log).await;
    assert!(types.iter().all(|t| t != "invalid"), "{types:?}");
    // Messages are not ordered (a receiver orders by the body's `timestamp`).
    types.sort();
    assert_eq!(
        types,
        [
            "job.completed",
            "job.partial",
            "job.partial",
            "job.progress",
            "job.start"
        ]
    );
    let partial_rows: usize = log
        .iter()
        .map(|(_, b)| serde_json::from_slice::<Value>(b).unwrap())
        .filter(|m| m["type"] == "job.partial")
        .map(|m| m["data"]["rows"].as_array().unwrap().len())
        .sum();
    assert_eq!(partial_rows, 16);
    // Another secret, or a changed body, does not verify.
    let other = app
        .post_json(
            &key,
            "/v1/webhooks",
            &serde_json::json!({ "url": format!("{url}?other") }),
        )
        .await;
    let other: Value = other.json().await.unwrap();
    let mut tampered = log[0].clone();
    tampered.1.push(b' ');
    assert_eq!(
        verified_types(other["secret"].as_str().unwrap(), &log[..1]).await,
        ["invalid"]
    );
    assert_eq!(verified_types(&secret, &[tampered]).await, ["invalid"]);
    let deliveries = app
        .get_json(&key, &format!("/v1/jobs/{}/deliveries", job.id))
        .await;
    assert_eq!(deliveries["deliveries"].as_array().unwrap().len(), 5);
    app.teardown().await;
}

/// A receiver that answers 410 Gone is never called again: the message is given up at once
/// and its endpoint disabled, so later jobs send it nothing.
#[tokio::test]
async fn a_410_stops_the_messages_and_disables_the_endpoint() {
    let mut app = TestApp::spawn().await;
    app.start_worker().await;
    let (url, received) = receiver(StatusCode::GONE).await;
    let (_, key) = app.customer(50_000_000).await;
    let resp = app
        .post_json(&key, "/v1/webhooks", &serde_json::json!({ "url": url }))
        .await;
    assert_eq!(resp.status(), 201);
    let mut body = forecast_job(4, 3);
    body["webhook"] = Value::String(url.clone());
    let (_, first) = app.submit(&key, &body).await;
    app.wait_for(&key, first.id).await;
    requests(&received, 1).await;
    let disabled = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let list = app.get_json(&key, "/v1/webhooks").await;
            if !list["endpoints"][0]["disabled_at"].is_null() {
                return list;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the endpoint is disabled");
    assert_eq!(disabled["endpoints"].as_array().unwrap().len(), 1);
    let (_, second) = app.submit(&key, &body).await;
    app.wait_for(&key, second.id).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(received.lock().unwrap().len(), 1, "nothing after the 410");
    let deliveries = app
        .get_json(&key, &format!("/v1/jobs/{}/deliveries", first.id))
        .await;
    let delivery = &deliveries["deliveries"][0];
    assert!(!delivery["abandoned_at"].is_null(), "{deliveries}");
    assert_eq!(delivery["attempts"][0]["status"], 410);
    assert!(delivery["next_attempt_at"].is_null());
    app.teardown().await;
}
