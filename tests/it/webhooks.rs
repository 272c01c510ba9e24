//! Webhooks: a finished job is POSTed to its URL, signed by the gateway, retried until accepted.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use ed25519_dalek::Verifier;
use serde_json::Value;

use crate::common::{forecast_job, TestApp};

type Received = Arc<Mutex<Vec<(HeaderMap, Vec<u8>)>>>;

/// A receiver that fails its first request (as a deploying service would) and accepts the rest.
async fn flaky_receiver() -> (String, Received) {
    let received: Received = Default::default();
    let log = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let log = log.clone();
            async move {
                let mut log = log.lock().unwrap();
                log.push((headers, body.to_vec()));
                if log.len() == 1 {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::NO_CONTENT
                }
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
    let (url, received) = flaky_receiver().await;
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
    assert_eq!(headers["x-xpand-event"], "job.succeeded");
    assert_eq!(headers["x-xpand-delivery"], id);
    assert_eq!(received[0].1, *payload, "a retry sends the same job");

    let posted: Value = serde_json::from_slice(payload).unwrap();
    assert_eq!(posted["id"], id);
    assert_eq!(posted["output"]["forecasts"].as_array().unwrap().len(), 8);

    // The signature covers timestamp and body, under the gateway's public key.
    let timestamp = headers["x-xpand-timestamp"].to_str().unwrap();
    let signature = base64::engine::general_purpose::STANDARD
        .decode(headers["x-xpand-signature"].as_bytes())
        .unwrap();
    let signature = ed25519_dalek::Signature::from_slice(&signature).unwrap();
    let mut signed = format!("{timestamp}.").into_bytes();
    signed.extend_from_slice(payload);
    let public = app.config.gateway_key.verifying_key();
    public
        .verify(&signed, &signature)
        .expect("signed by the gateway");
    let mut forged = signed.clone();
    *forged.last_mut().unwrap() ^= 1;
    assert!(public.verify(&forged, &signature).is_err());

    // The deliverer records the delivery after the receiver answered: wait for that write.
    let mut recorded = (0, false);
    for _ in 0..100 {
        recorded = sqlx::query_as(
            "SELECT attempts, delivered_at IS NOT NULL FROM webhook_deliveries
             WHERE job_id = $1::uuid",
        )
        .bind(id)
        .fetch_one(&app.db)
        .await
        .unwrap();
        if recorded.1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(recorded, (2, true));
    app.teardown().await;
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
        "SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM webhook_deliveries)",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!((jobs, outbox), (0, 0), "a refused submit stores nothing");
    app.teardown().await;
}

/// A receiver that answers every request with `status`.
async fn receiver(status: StatusCode) -> (String, Received) {
    let received: Received = Default::default();
    let log = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push((headers, body.to_vec()));
                status
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
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
    assert_eq!(headers["x-xpand-event"], "job.canceled");
    assert_eq!(headers["x-xpand-delivery"], canceled.as_str());
    let posted: Value = serde_json::from_slice(payload).unwrap();
    assert_eq!(
        (posted["id"].as_str(), posted["status"].as_str()),
        (Some(canceled.as_str()), Some("canceled"))
    );

    let failed = submit().await;
    let job = app.wait_for_job(&key, &failed).await;
    assert_eq!(job["status"], "failed", "{job}");
    let log = requests(&received, 2).await;
    let (headers, payload) = &log[1];
    assert_eq!(headers["x-xpand-event"], "job.failed");
    assert_eq!(headers["x-xpand-delivery"], failed.as_str());
    let posted: Value = serde_json::from_slice(payload).unwrap();
    assert_eq!(posted["error"]["code"], "timed_out", "{posted}");
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

    // The back-off before the last attempt is over half an hour: skip to it.
    let last = xpand::webhooks::MAX_ATTEMPTS;
    let skip_ahead = |attempts: Option<i32>| {
        sqlx::query(
            "UPDATE webhook_deliveries SET attempts = COALESCE($2, attempts), next_attempt_at = now()
             WHERE job_id = $1::uuid",
        )
        .bind(id)
        .bind(attempts)
        .execute(&app.db)
    };
    skip_ahead(Some(last - 1)).await.unwrap();
    requests(&received, 2).await;
    // Once that attempt is recorded (its next one far ahead), nothing is sent again, even when
    // it falls due.
    let recorded = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let row: (i32, bool, Option<String>, bool) = sqlx::query_as(
                "SELECT attempts, delivered_at IS NULL, last_error, next_attempt_at > now() + interval '10 minutes'
                 FROM webhook_deliveries WHERE job_id = $1::uuid",
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
