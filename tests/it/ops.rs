//! Operations endpoints and the OpenAPI contract.

use serde_json::Value;

use crate::common::TestApp;

#[tokio::test]
async fn served_openapi_matches_the_committed_spec() {
    let app = TestApp::spawn().await;
    let served: Value = app
        .http
        .get(format!("{}/openapi.json", app.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json"))
            .expect("openapi/openapi.json exists");
    let committed: Value = serde_json::from_str(&committed).expect("openapi/openapi.json is JSON");
    assert!(
        served == committed,
        "openapi/openapi.json is stale: run `cargo run -q -- openapi > openapi/openapi.json`"
    );
    for path in [
        "/v1/jobs",
        "/v1/jobs/{id}/events",
        "/v1/ws",
        "/v1/auth/token",
        "/v1/account/ledger",
    ] {
        assert!(served["paths"].get(path).is_some(), "{path} is documented");
    }
    let docs = app
        .http
        .get(format!("{}/docs", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(docs.status(), 200);
    let html = docs.text().await.unwrap();
    assert!(html.contains("/openapi.json"));
    assert!(
        !html.contains("https://"),
        "the docs page loads nothing from elsewhere"
    );
    app.teardown().await;
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let app = TestApp::spawn().await;
    let health = app
        .http
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    // The broker connection comes up asynchronously.
    let mut ready = Value::Null;
    for _ in 0..100 {
        let resp = app
            .http
            .get(format!("{}/readyz", app.base))
            .send()
            .await
            .unwrap();
        ready = resp.json().await.unwrap();
        if ready["broker"] == true {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        ready,
        serde_json::json!({"postgres": true, "redis": true, "broker": true})
    );

    let (_, key) = app.customer(10_000_000).await;
    app.post_json(&key, "/v1/jobs", &crate::common::forecast_job(8, 2))
        .await;
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("xpand_jobs{status=\"queued\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains(
        "xpand_http_requests_total{method=\"POST\",route=\"/v1/jobs\",status=\"201\"} 1"
    ));
    app.teardown().await;
}
