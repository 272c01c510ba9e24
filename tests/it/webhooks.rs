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
